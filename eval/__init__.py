"""Evaluation tools for Qwen-Merge checkpoints.

* ``eval.answers``: final-answer extraction from thinking-model generations (shared with the VLMEvalKit overlay).
* ``eval.generation``: checkpoint recognition and generation with transformers or vLLM (shared with the overlay).
* ``python -m eval.chat``: chat about an image in the terminal.

Benchmarks run through VLMEvalKit with the vlmeval overlay (``overlays/vlmeval``): ``python -m vlmeval.run --data
MMBench_DEV_EN --model Qwen-Merge-VL-4B [--use-vllm]`` with ``QWEN_MERGE_4B_PATH`` set.
"""
