"""Qwen-Merge on a Qwen3-MoE LLM in LLaMA-Factory's MoE switches (qwen-merge overlay).

LLaMA-Factory turns `moe_aux_loss_coef` into `output_router_logits` + `router_aux_loss_coef`, and under ZeRO-3 keeps
each sparse MoE block whole (a leaf module, so the experts a token skips are not all-gathered one by one), for the
model types it lists, `qwen3_moe` among them. A Qwen-Merge checkpoint has model_type `qwen2_5_vl_merge` whatever its
text side, so both switches ask this module which kind to treat it as. The two settings land in `text_config` (the
config's top-level text fields are views of it), where the MoE text model reads them.
"""
from __future__ import annotations

MODEL_TYPE = "qwen2_5_vl_merge"


def moe_model_type(config, model_type: str | None) -> str | None:
    """`qwen3_moe` for a Qwen-Merge config whose text side is Qwen3-MoE; `model_type` unchanged otherwise."""
    if model_type == MODEL_TYPE and getattr(getattr(config, "text_config", None), "is_moe", False):
        return "qwen3_moe"
    return model_type
