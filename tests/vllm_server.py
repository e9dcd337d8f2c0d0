"""Moved to examples/tiny/vllm_server.py (examples and bench must not import from tests); kept as a re-export."""
from examples.tiny.vllm_server import *  # noqa: F401,F403
