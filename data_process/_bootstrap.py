"""Lets ``python data_process/<script>.py`` import the ``data_process`` package like ``python -m`` does."""

import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
