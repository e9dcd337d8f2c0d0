"""Moved to examples/tiny/tiny_models.py (examples and bench must not import from tests); kept as a re-export."""
from examples.tiny.tiny_models import *  # noqa: F401,F403
from examples.tiny.tiny_models import _save_generation_config  # noqa: F401
