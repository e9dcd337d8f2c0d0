"""Gradient checkpointing only where something trains (qwen-merge overlay).

LLaMA-Factory enables gradient checkpointing on the whole model before the freeze flags are applied; its wrapper
then runs a frozen block without checkpointing anyway (nothing to recompute for). But the flag still changes how
the frozen block is called: the Qwen2.5-VL vision tower, for one, passes its blocks' inputs positionally through the
wrapper instead of as keywords, which is what DeepSpeed ZeRO-3's parameter hooks then see. On 2-rank ZeRO-3 with the
vision tower and LLM frozen (stage 1), the checkpointing run gathered a frozen vision weight with uninitialised values
in its first forward, while the same run without checkpointing trained exactly the projector. So after freezing, a stack whose blocks are all frozen
(the vision tower, a frozen LLM) is switched back to the plain call path; stacks with a trainable block keep
checkpointing. Memory is unchanged: frozen blocks were never checkpointed.

Wired in by one line after `init_adapter` in `model/loader.py`.
"""
from __future__ import annotations

from torch import nn

from ..extras import logging

logger = logging.get_logger(__name__)

BLOCK_LISTS = ("blocks", "layers")  # the checkpointed stacks: vision tower blocks, decoder layers


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def checkpoint_only_trainable_stacks(model: nn.Module) -> list[str]:
    """Turn gradient checkpointing off for every stack whose blocks are all frozen; returns their names."""
    switched = []
    for name, module in model.named_modules():
        if not getattr(module, "gradient_checkpointing", False):
            continue
        stacks = [getattr(module, attr) for attr in BLOCK_LISTS if isinstance(getattr(module, attr, None), nn.ModuleList)]
        if stacks and not any(_trains(block) for stack in stacks for block in stack):
            module.gradient_checkpointing = False
            for block in (b for stack in stacks for b in stack):
                if getattr(block, "gradient_checkpointing", False):
                    block.gradient_checkpointing = False
            switched.append(name or type(module).__name__)
    if switched:
        logger.info_rank0(f"Gradient checkpointing off for frozen stacks: {', '.join(switched)}.")
    return switched
