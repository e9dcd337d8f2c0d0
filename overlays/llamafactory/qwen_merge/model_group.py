"""Qwen-Merge model names for the LLaMA-Factory web UI (qwen-merge overlay).

The checkpoints are built locally (merge/model_merger.py, then the stage recipes in examples/), so there is no
download source: pick the name, then put the local path in "Model path". One registration, chat template default.
"""
from ..extras.constants import register_model_group

register_model_group(
    models={"Qwen-Merge-VL-4B": {}, "Qwen-Merge-VL-8B": {}, "Qwen-Merge-VL-30B-A3B": {}},
    template="qwen_merge_vl",
    multimodal=True,
)
