"""Liger kernels for Qwen-Merge (model_type ``qwen2_5_vl_merge``), behind LLaMA-Factory's ``enable_liger_kernel``.

What applies, and where (the text decoder is transformers' Qwen3 code, so Qwen3's module names are patched):

* RMSNorm  -> ``LigerRMSNorm`` for every Qwen3 norm (layer norms, per-head q/k norms, final norm);
* SwiGLU   -> ``LigerSwiGLUMLP`` for the Qwen3 MLP (gate/up/down, no bias, SiLU);
* RoPE     -> Liger's RoPE kernel. Our M-RoPE is folded into per-token cos/sin of shape (batch, seq, head_dim)
              whose two halves are identical (the t/h/w sections repeat), which is the layout Liger's kernel reads
              (it loads the first half only). Refused when ``sum(mrope_section) != head_dim / 2``;
* loss     -> fused linear + cross-entropy: the (tokens x 151k) fp32 logits are never materialised. Training
              forwards with labels go through it; inference and label-less calls keep the stock forward.

Not applied: the vision tower (its MLP has biases, which Liger's SwiGLU module lacks; its 2-D rotary is applied
inside our per-window attention). It is frozen in every recipe.

LLaMA-Factory calls this before the model is built, so the class-level patches reach every layer; passing
``model=`` also converts an already built model in place.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class LigerNotApplicable(ValueError):
    """A requested Liger kernel does not fit this model's configuration."""


def liger_kernel_for(config):
    """The patch function LLaMA-Factory calls, bound to this model's config (for the applicability checks)."""
    return functools.partial(apply_liger_kernel_to_qwen2_5_vl_merge, config=config)


def check_applicable(config, rope: bool, swiglu: bool, cross_entropy: bool, fused_linear_cross_entropy: bool) -> None:
    """Raise LigerNotApplicable with a one-line reason when a requested kernel would compute something else."""
    text = getattr(config, "text_config", config)
    if cross_entropy and fused_linear_cross_entropy:
        raise LigerNotApplicable("Liger: cross_entropy and fused_linear_cross_entropy are exclusive; pick one")
    if swiglu and text.hidden_act not in ("silu", "swish"):
        raise LigerNotApplicable(f"Liger SwiGLU needs hidden_act silu, this model has {text.hidden_act!r}; "
                                 "set enable_liger_kernel: false")
    if rope:
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        section = (getattr(text, "rope_scaling", None) or {}).get("mrope_section")
        if section is None or 2 * sum(section) != head_dim:
            raise LigerNotApplicable(f"Liger RoPE reads half of cos/sin; the folded M-RoPE needs sum(mrope_section)"
                                     f" = head_dim / 2 = {head_dim // 2}, got {section}")


def apply_liger_kernel_to_qwen2_5_vl_merge(rope: bool = True, cross_entropy: bool = False,
                                           fused_linear_cross_entropy: bool = True, rms_norm: bool = True,
                                           swiglu: bool = True, model: nn.Module | None = None,
                                           config=None) -> list[str]:
    """Patch the Qwen3 text stack and Qwen-Merge's loss with Liger kernels; returns the names of what was applied."""
    from liger_kernel.transformers.functional import liger_cross_entropy
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers.models.qwen2_5_vl_merge import modeling_qwen2_5_vl_merge as merge_modeling
    from transformers.models.qwen3 import modeling_qwen3

    config = config if config is not None else getattr(model, "config", None)
    if config is None:
        raise LigerNotApplicable("Liger for qwen2_5_vl_merge needs the model config (config= or model=)")
    check_applicable(config, rope, swiglu, cross_entropy, fused_linear_cross_entropy)
    applied = []
    if rope:
        modeling_qwen3.apply_rotary_pos_emb = liger_rotary_pos_emb
        applied.append("rope")
    if rms_norm:
        modeling_qwen3.Qwen3RMSNorm = LigerRMSNorm
        applied.append("rms_norm")
    if swiglu:
        modeling_qwen3.Qwen3MLP = LigerSwiGLUMLP
        applied.append("swiglu")
    if cross_entropy:
        from transformers.loss import loss_utils
        loss_utils.nn.functional.cross_entropy = liger_cross_entropy
        applied.append("cross_entropy")
    cls = merge_modeling.Qwen2_5_VL_MergeForConditionalGeneration
    if fused_linear_cross_entropy:
        if not getattr(cls.forward, "_qwen_merge_fused_loss", False):
            cls.forward = _fused_loss_forward(cls.forward)
        applied.append("fused_linear_cross_entropy")
    if model is not None:
        _convert_built_model(model, rms_norm=rms_norm, swiglu=swiglu)
    logger.info("Liger kernels applied to qwen2_5_vl_merge text decoder: %s (vision tower unchanged)", ", ".join(applied))
    return applied


def _convert_built_model(model: nn.Module, rms_norm: bool, swiglu: bool) -> None:
    """Swap the modules of an existing model in place: the same parameters, Liger forward."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers.models.qwen2_5_vl_merge.modeling_qwen2_5_vl_merge import Qwen2_5_VL_MergeRMSNorm

    text = model.model.language_model
    for module in text.modules():
        if rms_norm and isinstance(module, Qwen2_5_VL_MergeRMSNorm):
            module.__class__ = LigerRMSNorm
            module.offset, module.casting_mode, module.in_place = 0.0, "llama", True
        elif swiglu and type(module).__name__ == "Qwen3MLP" and not isinstance(module, LigerSwiGLUMLP):
            if module.gate_proj.bias is not None:
                raise LigerNotApplicable("Liger SwiGLU has no bias; this MLP has one")
            module.__class__ = LigerSwiGLUMLP


def _fused_loss_forward(stock_forward):
    """Qwen-Merge forward whose training loss is Liger's fused linear cross-entropy (same mean over labelled
    tokens as the stock loss, without the logits). Without labels, or in eval mode, the stock forward runs."""

    @functools.wraps(stock_forward)
    def forward(self, *args, labels=None, **kwargs):
        if labels is None or not self.training or args:
            return stock_forward(self, *args, labels=labels, **kwargs)
        from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLCausalLMOutputWithPast

        kwargs.pop("return_dict", None)
        outputs = self.model(**kwargs, return_dict=True)
        weight = self.lm_head.weight
        with _gathered_under_zero3(weight):
            loss = LigerForCausalLMLoss(hidden_states=outputs.last_hidden_state, lm_head_weight=weight, labels=labels,
                                        hidden_size=self.config.text_config.hidden_size)
        return Qwen2_5_VLCausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                                hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                                rope_deltas=outputs.rope_deltas)

    forward._qwen_merge_fused_loss = True
    return forward


def _gathered_under_zero3(weight: torch.Tensor):
    """Under ZeRO-3 the lm_head weight is partitioned and gathered only around lm_head's own forward, which the
    fused loss skips: gather it for the loss (the kernel computes its gradient in the forward pass). A tied weight
    is already gathered for the embedding that uses it and must not be released here."""
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed  # deepspeed.zero is an attribute of the package, not an importable module
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    if weight.ds_status == ZeroParamStatus.AVAILABLE:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
