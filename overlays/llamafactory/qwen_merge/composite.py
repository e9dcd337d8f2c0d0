"""Composite-model registration of Qwen-Merge, keyed by its real model_type (qwen-merge overlay).

LLaMA-Factory looks composite models up by ``config.model_type``; this is what makes ``freeze_vision_tower``,
``freeze_multi_modal_projector``, ``freeze_language_model`` and LoRA targeting act on the right modules. Keys are
matched as substrings of parameter names (``model.visual.merger.mlp.4.weight``, ``model.language_model.layers...``,
``lm_head.weight``).
"""
from ..model.model_utils.visual import _register_composite_model

MODEL_TYPE = "qwen2_5_vl_merge"
PROJECTOR_KEY = "visual.merger"
VISION_TOWER_KEYS = ["visual.patch_embed", "visual.blocks"]
LANGUAGE_MODEL_KEYS = ["language_model", "lm_head"]

_register_composite_model(
    model_type=MODEL_TYPE,
    projector_key=PROJECTOR_KEY,
    vision_model_keys=VISION_TOWER_KEYS,
    language_model_keys=LANGUAGE_MODEL_KEYS,
    lora_conflict_keys=["patch_embed"],
)
