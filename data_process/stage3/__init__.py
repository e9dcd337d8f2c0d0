"""Stage-3 distillation: teacher generation, judging and conversion to LLaMA-Factory parquet.

Shared pieces: ``client`` (async OpenAI-compatible HTTP with retries over several endpoints), ``runner``
(append-only checkpoint, resume, signals, progress, stats, and ``run_step``, the one driver of the four
request-making scripts), ``cli`` (common flags), ``judge`` (response format and verdict parsing, GLM markup),
``length`` (training length of a row, for the ``too_long`` policy), ``prompts``, ``render`` (text to image)
and ``records`` (files and parquet).
"""
