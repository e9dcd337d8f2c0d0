"""Stage-3 distillation: teacher generation, judging and conversion to LLaMA-Factory parquet.

Shared pieces: ``client`` (async OpenAI-compatible HTTP with retries over several endpoints), ``runner``
(append-only checkpoint, resume, signals, progress, stats), ``cli`` (common flags), ``judge`` (response
format and verdict parsing), ``prompts``, ``render`` (text to image) and ``records`` (files and parquet).
"""
