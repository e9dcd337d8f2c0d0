"""Attention over the documents of packed rows, without the seq x seq mask (qwen-merge overlay).

LLaMA-Factory's ``neat_packing`` packs several samples into one row and, with SDPA, hands the model a 4-D
block-diagonal causal mask. SDPA with an arbitrary mask cannot use its flash kernel, so it computes every
(query, key) pair of the row, and packed rows train slower than padded ones. Here the documents are read off that
mask (where a token stops seeing its left neighbour a new document starts) and attention runs per document:

* torch's ``varlen_attn`` (flash, one call for all documents; torch >= 2.9, CUDA), else
* flash-attn's ``flash_attn_varlen_func`` where that package is installed (CUDA), else
* one causal SDPA call per document (any torch; the flash kernel on a GPU).

The mask is checked once per batch against the block-diagonal causal mask rebuilt from the documents found; any
other 4-D mask (or no mask, or decoding with a cache) goes to the stock SDPA function unchanged, so the results
are those of SDPA with the mask. Registered as the attention implementation ``qwen_merge_packed``;
``use_for_packed_rows`` switches a model's text decoder to it.
"""
from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from ...modeling_utils import AttentionInterface

logger = logging.getLogger(__name__)
IMPLEMENTATION = "qwen_merge_packed"


@dataclass(frozen=True)
class Documents:
    """Documents of a (batch, seq) block: ``spans[row]`` = [(start, end, is_padding)], and the flattened
    cumulative lengths over all rows for varlen kernels (padding runs count as documents there)."""

    spans: tuple[tuple[tuple[int, int, bool], ...], ...]
    cu_seqlens: torch.Tensor
    longest: int


_LAST: list = [None, None]  # (weak reference to the last mask, its Documents): one mask serves a whole forward


def documents_of(mask: torch.Tensor) -> Documents | None:
    """Documents of a 4-D (batch, 1, seq, seq) mask (additive: 0 = attend; or boolean: True = attend) if it is
    exactly block-diagonal causal with padding rows fully masked; None otherwise. The last mask's answer is kept
    (the same mask object reaches every layer, and the recomputation of checkpointed layers)."""
    if _LAST[0] is not None and _LAST[0]() is mask:
        return _LAST[1]
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    _, seq, keys = allowed.shape
    found = None
    if seq == keys:
        real = allowed.diagonal(dim1=1, dim2=2)                                    # (batch, seq)
        sees_left = torch.cat([real[:, :1] & False, allowed.diagonal(offset=-1, dim1=1, dim2=2)], 1)  # i sees i-1
        starts = real & ~sees_left
        doc_ids = torch.where(real, starts.cumsum(dim=1), torch.zeros_like(starts, dtype=torch.long))
        expected = (doc_ids[:, :, None] == doc_ids[:, None, :]) & real[:, :, None] & real[:, None, :]
        expected &= torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
        if torch.equal(expected, allowed):
            found = _spans(doc_ids.cpu(), mask.device)
    _LAST[:] = [weakref.ref(mask), found]
    return found


def _spans(doc_ids: torch.Tensor, device: torch.device) -> Documents:
    rows, lengths = [], []
    for row in doc_ids.tolist():
        spans, start = [], 0
        for i in range(1, len(row) + 1):
            if i == len(row) or row[i] != row[start]:
                spans.append((start, i, row[start] == 0))
                lengths.append(i - start)
                start = i
        rows.append(tuple(spans))
    cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
    return Documents(tuple(rows), cu, max(lengths))


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def kernel_name(device_type: str) -> str:
    """Which path runs for packed rows on this device type."""
    if device_type == "cuda" and _torch_varlen() is not None:
        return "torch varlen_attn"
    if device_type == "cuda" and _flash_attn_varlen() is not None:
        return "flash-attn varlen"
    return "SDPA per document"


def _varlen(query, key, value, docs: Documents, scaling):
    """(batch, heads, seq, dim) inputs -> (batch, seq, heads, dim), all documents of all rows in one call."""
    batch, heads, seq, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (query, key, value))
    if (varlen_attn := _torch_varlen()) is not None:
        params = inspect.signature(varlen_attn).parameters
        extra = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        if "scale" in params:
            extra["scale"] = scaling
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        elif k.shape[1] != heads:
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
        out = varlen_attn(q, k, v, docs.cu_seqlens, docs.cu_seqlens, docs.longest, docs.longest, **extra)
    else:
        out = _flash_attn_varlen()(q, k, v, docs.cu_seqlens, docs.cu_seqlens, docs.longest, docs.longest,
                                   softmax_scale=scaling, causal=True)
    return out.reshape(batch, seq, heads, dim)


def _per_document(query, key, value, docs: Documents, scaling, dropout):
    """One causal SDPA call per document; padding runs give zeros (nothing attends to them)."""
    rows = []
    for row, spans in enumerate(docs.spans):
        pieces = []
        for start, end, padding in spans:
            if padding:
                pieces.append(query.new_zeros(query.shape[1], end - start, query.shape[3]))
                continue
            q, k, v = (t[row, :, start:end] for t in (query, key, value))
            pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True))
        rows.append(torch.cat(pieces, dim=1))
    return torch.stack(rows).transpose(1, 2)


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Drop-in for transformers' SDPA attention function (same arguments and output layout)."""
    docs = None
    if attention_mask is not None and attention_mask.dim() == 4 and query.shape[2] == key.shape[2] > 1:
        docs = documents_of(attention_mask)
    if docs is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.is_cuda and dropout == 0.0 and kernel_name("cuda") != "SDPA per document":
        return _varlen(query, key, value, docs, scaling), None
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return _per_document(query, key, value, docs, scaling, dropout), None


AttentionInterface.register(IMPLEMENTATION, packed_attention_forward)


def use_for_packed_rows(model: torch.nn.Module) -> int:
    """Switch the SDPA text-decoder attention of a Qwen-Merge model to ``qwen_merge_packed``; returns the number of
    attention layers switched (0 when the decoder does not run SDPA)."""
    configs = {id(m.config): m.config for m in model.modules()
               if hasattr(m, "num_key_value_groups") and hasattr(m, "config")}
    switched = [c for c in configs.values() if c._attn_implementation == "sdpa"]
    for config in switched:
        config._attn_implementation = IMPLEMENTATION
    return sum(1 for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "config")
               and m.config._attn_implementation == IMPLEMENTATION)
