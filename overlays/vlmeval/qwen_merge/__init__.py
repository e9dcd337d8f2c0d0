"""Qwen-Merge for VLMEvalKit (installed by the qwen-merge vlmeval overlay)."""
from .model import QwenMergeChat

__all__ = ["QwenMergeChat"]
