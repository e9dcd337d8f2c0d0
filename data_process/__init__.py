"""Stage 1/2 data preparation for Qwen-Merge: hub datasets and local formats to LLaMA-Factory parquet."""
