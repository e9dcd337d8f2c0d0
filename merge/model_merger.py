#!/usr/bin/env python3
"""Build a Qwen-Merge checkpoint: the vision tower + merger of a Qwen2.5-VL model, a new GELU + Linear projector to
the width of a Qwen3 LLM (dense, or Qwen3-MoE), and that LLM, streamed tensor by tensor from safetensors (neither
model is loaded).

    python merge/model_merger.py --vlm-path Qwen/Qwen2.5-VL-72B-Instruct --llm-path Qwen/Qwen3-4B \
        --output-path Qwen-Merge-VL-4B-base
    python merge/model_merger.py --vlm-path Qwen/Qwen2.5-VL-72B-Instruct --llm-path Qwen/Qwen3-30B-A3B-Instruct-2507 \
        --output-path Qwen-Merge-VL-30B-A3B-base

A Qwen3-MoE LLM is taken whole like a dense one (attention, routers `mlp.gate`, every expert `mlp.experts.{e}.*`,
dense `mlp.*` of `mlp_only_layers`); its MoE fields are carried into the merged config, where they select the MoE
text model in transformers and vLLM.

Memory stays at one tensor: tensors that keep their dtype are copied byte ranges from file to file, others are cast
one at a time. The output is built in a temporary sibling directory and renamed into place at the end; a run finds
and removes the temporary directories of merges that were killed.

Configs are read the way transformers 4.52.3 reads them (flat hub originals and the nested `text_config` layout of
later re-saves alike), every source shard is checked against its header before anything is written, and the tensor
set is checked against the configs. Every problem is reported as one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

HERE = Path(__file__).resolve().parent
CHAT_TEMPLATE_FILE = HERE / "chat_template.jinja"
MODEL_TYPE = "qwen2_5_vl_merge"
ARCHITECTURE = "Qwen2_5_VL_MergeForConditionalGeneration"
VISION_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                 "vision_token_id": "<|vision_pad|>"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")
VLM_PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")
SAFETENSORS_DTYPES = {"F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2)}
DTYPE_CODES = {name: code for code, (name, _) in SAFETENSORS_DTYPES.items()}
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 * 10**6  # the safetensors format's own limit


class MergeError(Exception):
    """A problem with the inputs or the output location, reported as one line."""


# ----------------------------------------------------------------------------------------------------------------
# Rename rules, as data (in the spirit of vLLM's WeightsMapper). A MoE LLM or another encoder plugs in here.

# Source tensors each source contributes: source prefix -> output prefix, first match wins; others are not read.
TAKE: dict[str, dict[str, str]] = {
    "vlm": {
        "model.visual.": "visual.",  # checkpoints saved in the nested layout (transformers >= 4.52 models, trainers)
        "visual.": "visual.",        # hub originals
    },
    "llm": {"": ""},                 # the whole LLM, names unchanged
}
# Output tensors dropped when the LLM ties its output embedding to the input embedding (tie_word_embeddings).
SKIP_IF_TIED = ("lm_head.weight",)
# New tensors: name -> (initialiser, shape from (LLM hidden size, vision merger width)).
NEW_TENSORS: dict[str, tuple[str, Callable[[int, int], list[int]]]] = {
    "visual.merger.mlp.4.weight": ("normal", lambda hidden, width: [hidden, width]),
    "visual.merger.mlp.4.bias": ("zeros", lambda hidden, width: [hidden]),
}

# Tensors the configs imply (names as transformers saves them; {i} = layer / block index, {e} = expert index).
QWEN3_GLOBAL = ("model.embed_tokens.weight", "model.norm.weight")
QWEN3_ATTENTION = tuple("model.layers.{i}." + n for n in (
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight"))
QWEN3_MLP = tuple("model.layers.{i}.mlp." + n for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
QWEN3_LAYER = QWEN3_ATTENTION + QWEN3_MLP
# A Qwen3-MoE sparse layer: attention, the router, and each expert's MLP in place of the dense MLP.
QWEN3_MOE_ROUTER = ("model.layers.{i}.mlp.gate.weight",)
QWEN3_MOE_EXPERT = tuple("model.layers.{i}.mlp.experts.{e}." + n for n in (
    "gate_proj.weight", "up_proj.weight", "down_proj.weight"))
QWEN3_LAYER_BIAS = tuple("model.layers.{i}.self_attn." + n for n in (
    "q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias"))  # only with attention_bias: true
VISION_GLOBAL = ("visual.patch_embed.proj.weight", "visual.merger.ln_q.weight", "visual.merger.mlp.0.weight",
                 "visual.merger.mlp.0.bias", "visual.merger.mlp.2.weight", "visual.merger.mlp.2.bias")
VISION_BLOCK = tuple("visual.blocks.{i}." + n for n in (
    "norm1.weight", "norm2.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias", "mlp.down_proj.weight",
    "mlp.down_proj.bias"))


def rename(source: str, name: str) -> str | None:
    """The output name of a source tensor, or None when the merge does not take it."""
    for prefix, new in TAKE[source].items():
        if name.startswith(prefix):
            return new + name[len(prefix):]
    return None


# ----------------------------------------------------------------------------------------------------------------
# Configs, resolved as transformers 4.52.3 resolves them. The defaults are the __init__ defaults of
# Qwen2_5_VLVisionConfig and Qwen3Config; tests/test_merge_conformance.py checks them against the installed classes.

VISION_DEFAULTS = {"depth": 32, "hidden_size": 3584, "hidden_act": "silu", "intermediate_size": 3420, "num_heads": 16,
                   "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                   "tokens_per_second": 4, "window_size": 112, "out_hidden_size": 3584,
                   "fullatt_block_indexes": [7, 15, 23, 31], "initializer_range": 0.02}
QWEN3_DEFAULTS = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
                  "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
                  "use_cache": True, "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
                  "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096,
                  "max_window_layers": 28, "attention_dropout": 0.0}
# Qwen3MoeConfig: other sizes, the MoE fields, and no head_dim parameter (it falls back to hidden / heads).
QWEN3_MOE_DEFAULTS = {**{k: v for k, v in QWEN3_DEFAULTS.items() if k != "head_dim"},
                      "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
                      "num_key_value_heads": 4, "decoder_sparse_step": 1, "moe_intermediate_size": 768,
                      "num_experts_per_tok": 8, "num_experts": 128, "norm_topk_prob": False,
                      "output_router_logits": False, "router_aux_loss_coef": 0.001, "mlp_only_layers": None}
LLM_DEFAULTS = {"qwen3": QWEN3_DEFAULTS, "qwen3_moe": QWEN3_MOE_DEFAULTS}  # the LLM kinds the merger takes
# Qwen2_5_VLConfig's own defaults for the two ids it declares; the other vision ids have none.
VLM_TOKEN_DEFAULTS = {"image_token_id": 151655, "video_token_id": 151656}
# Keys of the LLM config not carried into the merged config (replaced, or meaningless for the merged model).
LLM_KEYS_DROPPED = ("architectures", "model_type", "text_config", "torch_dtype", "dtype", "_name_or_path",
                    "transformers_version")


def rope_with_type(rope: dict | None, mrope_alias: bool = False) -> dict | None:
    """transformers' backward-compatible rope_scaling: a legacy `type` is copied over `rope_type`
    (Qwen2.5-VL also renames `mrope` to `default`)."""
    if not isinstance(rope, dict):
        return rope
    rope = dict(rope)
    if "type" in rope:
        if mrope_alias and rope["type"] == "mrope":
            rope["type"] = "default"
        rope["rope_type"] = rope["type"]
    return rope


def vlm_text_fields(config: dict) -> dict:
    """The text model's fields of a Qwen2.5-VL config, as Qwen2_5_VLConfig builds its text_config: a nested
    `text_config` dict, when present, is the whole text config (the top-level copies are ignored); a flat config's
    top-level fields are the text config."""
    nested = config.get("text_config")
    text = dict(nested) if isinstance(nested, dict) else dict(config)
    text["rope_scaling"] = rope_with_type(text.get("rope_scaling"), mrope_alias=True)
    return text


def vlm_token_ids(config: dict) -> dict:
    """Vision token ids as Qwen2_5_VLConfig reads them: top-level only (a nested text_config's copies, null after a
    transformers 4.52 re-save, are never read); image/video ids default to 151655/151656."""
    return {key: config[key] if key in config else VLM_TOKEN_DEFAULTS.get(key) for key in VISION_TOKENS}


def vision_fields(config: dict) -> dict:
    """vision_config as Qwen2_5_VLVisionConfig(**vision_config) resolves it: keys it lacks take the class defaults
    (the hub originals omit depth, window_size, ..., and Qwen2.5-VL-7B omits out_hidden_size)."""
    given = config.get("vision_config")
    return {**VISION_DEFAULTS, **(given if isinstance(given, dict) else {})}


def qwen3_fields(config: dict) -> dict:
    """Every Qwen3Config (or, for model_type qwen3_moe, Qwen3MoeConfig) field as transformers 4.52.3 resolves it: the
    config's value (null included), else the class default; a null num_key_value_heads means one per attention
    head. A MoE config without head_dim gets hidden_size / num_attention_heads, as its attention computes it, and a
    null mlp_only_layers is the empty list, as Qwen3MoeConfig stores it."""
    defaults = LLM_DEFAULTS.get(config.get("model_type"), QWEN3_DEFAULTS)
    fields = {**defaults, **{key: config[key] for key in defaults if key in config}}
    if fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    fields["rope_scaling"] = rope_with_type(fields["rope_scaling"])
    if defaults is QWEN3_MOE_DEFAULTS:
        fields["head_dim"] = config.get("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
        if fields["mlp_only_layers"] is None:
            fields["mlp_only_layers"] = []
    return fields


def is_sparse_layer(text: dict, i: int) -> bool:
    """Whether layer i of a Qwen3-MoE holds experts (Qwen3MoeDecoderLayer's rule); always False for dense Qwen3."""
    return (text.get("num_experts", 0) > 0 and i not in text["mlp_only_layers"]
            and (i + 1) % text["decoder_sparse_step"] == 0)


def check_moe_fields(text: dict) -> None:
    """Refuse MoE settings that transformers or vLLM would crash on, before anything is written."""
    step, experts, per_token = text["decoder_sparse_step"], text["num_experts"], text["num_experts_per_tok"]
    if not isinstance(step, int) or step < 1:
        raise MergeError(f"--llm-path config.json has decoder_sparse_step {step!r}; it must be an integer >= 1")
    if not isinstance(experts, int) or experts < 1:
        raise MergeError(f"--llm-path config.json has num_experts {experts!r}; a qwen3_moe LLM needs >= 1 expert")
    if not isinstance(per_token, int) or not 1 <= per_token <= experts:
        raise MergeError(f"--llm-path config.json has num_experts_per_tok {per_token!r}; it must be 1..{experts}")
    layers = text["mlp_only_layers"]
    if not isinstance(layers, list) or not all(isinstance(i, int) and 0 <= i < text["num_hidden_layers"]
                                               for i in layers):
        raise MergeError(f"--llm-path config.json has mlp_only_layers {layers!r}; it must list layer indices "
                         f"0..{text['num_hidden_layers'] - 1}")


def validate_kinds(vlm: dict, llm: dict) -> None:
    vlm_type, llm_type = vlm.get("model_type"), llm.get("model_type")
    if vlm_type in LLM_DEFAULTS and llm_type in ("qwen2_5_vl", MODEL_TYPE):
        raise MergeError("--vlm-path and --llm-path look swapped (the VLM path holds a Qwen3, the LLM path a VLM)")
    if vlm_type != "qwen2_5_vl" or "vision_config" not in vlm:
        raise MergeError(f"--vlm-path must be a Qwen2.5-VL model (model_type qwen2_5_vl), got {vlm_type!r}")
    if llm_type not in LLM_DEFAULTS:
        raise MergeError(f"--llm-path must be a Qwen3 model (model_type qwen3, or qwen3_moe for Qwen3-MoE), got "
                         f"{llm_type!r}")


def check_llm_rope(llm: dict, text: dict) -> None:
    """Refuse rope settings the merged model cannot reproduce in both transformers and vLLM."""
    if "rope_parameters" in llm and "rope_theta" not in llm:
        raise MergeError("--llm-path config.json keeps rope_theta inside rope_parameters (written by transformers "
                         ">= 5), which transformers 4.52.3 does not read (it would use rope_theta 10000); save the "
                         "config with transformers 4.5x or move rope_theta to the top level")
    rope = text["rope_scaling"] or {}
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "mrope"):
        native = rope.get("original_max_position_embeddings", text["max_position_embeddings"])
        raise MergeError(f"--llm-path has rope_scaling {kind!r} (factor {rope.get('factor')}): M-RoPE with {kind} "
                         f"scaling is not supported (vLLM 0.9.1 would build a {kind} rotary that ignores "
                         f"mrope_section and breaks image prompts); remove \"rope_scaling\" from the LLM's "
                         f"config.json (native context {native} tokens) and merge again")
    if text["head_dim"] is None:
        raise MergeError("--llm-path config.json has head_dim null; set it (every Qwen3 uses 128)")


def build_config(vlm: dict, llm: dict, dtype: str) -> dict:
    """The LLM's config with every Qwen3 field explicit, + the VLM's resolved vision config, M-RoPE sections and
    vision token ids."""
    text = qwen3_fields(llm)
    check_llm_rope(llm, text)
    if "num_experts" in text:
        check_moe_fields(text)
    head_dim = text["head_dim"]
    section = (vlm_text_fields(vlm)["rope_scaling"] or {}).get("mrope_section")
    if not section:
        raise MergeError("the VLM config has no rope_scaling.mrope_section")
    if 2 * sum(section) != head_dim:
        raise MergeError(f"mrope_section {section} of the VLM sums to {sum(section)}, but the LLM's head_dim/2 "
                         f"is {head_dim // 2}: these models cannot be merged")
    merged = {k: v for k, v in llm.items() if k not in LLM_KEYS_DROPPED}
    merged.update(text)
    merged["architectures"] = [ARCHITECTURE]
    merged["model_type"] = MODEL_TYPE
    merged["rope_scaling"] = {"type": "mrope", "mrope_section": list(section)}
    tokens = vlm_token_ids(vlm)
    for key in VISION_TOKENS:
        value = tokens.get(key)
        if value is None:
            raise MergeError(f"the VLM config has no top-level {key} (transformers reads it from there)")
        if not isinstance(value, int) or not 0 <= value < text["vocab_size"]:
            raise MergeError(f"{key}={value} of the VLM is outside the LLM vocabulary ({text['vocab_size']})")
        merged[key] = value
    vision = {k: v for k, v in vision_fields(vlm).items() if k not in ("torch_dtype", "dtype", "transformers_version")}
    vision["out_hidden_size2"] = text["hidden_size"]
    vision["model_type"] = f"{MODEL_TYPE}_vision"
    merged["vision_config"] = vision
    merged["torch_dtype"] = dtype
    return merged


def check_special_tokens(llm_root: Path, config: dict) -> None:
    """The vision token ids must name the same tokens in the LLM's vocabulary."""
    tok_path = llm_root / "tokenizer.json"
    if not tok_path.is_file():
        return
    added = {t["id"]: t["content"] for t in json.loads(tok_path.read_text()).get("added_tokens", [])}
    for key, token in VISION_TOKENS.items():
        if key in config and added.get(config[key]) != token:
            raise MergeError(f"{key}={config[key]} is {added.get(config[key])!r} in the LLM tokenizer, "
                             f"expected {token!r}: vocabularies are not compatible")


# ----------------------------------------------------------------------------------------------------------------
# Sources: local directories or hub ids (only the files needed are fetched)

@dataclass
class Source:
    root: Path
    config: dict
    tensors: dict[str, tuple[Path, dict]] = field(default_factory=dict)  # name -> (file, header entry + "start")

    def file(self, name: str) -> Path | None:
        path = self.root / name
        return path if path.is_file() else None


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset where tensor data starts). The file's size is checked against the
    header first, so a truncated download is reported here, before anything is written."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) != 8:
                raise MergeError(f"{path}: not a safetensors file ({size} bytes, truncated)")
            (length,) = struct.unpack("<Q", size_bytes)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise MergeError(f"{path}: safetensors header length {length} does not fit in the file "
                                 f"({size} bytes): not a safetensors file, or truncated")
            header = json.loads(f.read(length))
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise MergeError(f"{path} has a corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path} has a corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_end = 0
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            count = math.prod(entry["shape"])
            item = ITEM_SIZES.get(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{path} has a corrupt safetensors header entry for {name!r}") from None
        if not 0 <= begin <= end or (item is not None and end - begin != count * item):
            raise MergeError(f"{path}: header entry {name!r} spans bytes {begin}..{end}, which does not match its "
                             f"shape {entry['shape']} and dtype {entry['dtype']}")
        data_end = max(data_end, end)
    needed = 8 + length + data_end
    if size < needed:
        raise MergeError(f"{path}: truncated, {needed - size} bytes missing (the file has {size} of the {needed} "
                         f"bytes its header describes); download it again")
    return header, 8 + length


def fetch(path_or_id: str, wanted: Callable[[set[str], dict | None], list[str]]) -> Path:
    """A local directory as is; otherwise download from the hub the files `wanted(files, index)` asks for."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local
    if local.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise MergeError(f"{path_or_id}: not a directory (and not a hub id of the form org/name)")
    try:
        from huggingface_hub import hf_hub_download, list_repo_files
        files = set(list_repo_files(path_or_id))
        get = lambda name: Path(hf_hub_download(path_or_id, name))  # noqa: E731
        index = json.loads(get("model.safetensors.index.json").read_text()) if \
            "model.safetensors.index.json" in files else None
        for name in wanted(files, index):
            get(name)
        return get("config.json").parent
    except MergeError:
        raise
    except Exception as e:  # offline, unknown repo, auth, ...
        raise MergeError(f"{path_or_id}: not a local directory and the hub download failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def shards_holding(index: dict | None, files: set[str], keep: Callable[[str], bool]) -> set[str]:
    """The shard files that hold at least one tensor `keep` accepts (a single model.safetensors without index)."""
    if index is None:
        return {"model.safetensors"} if "model.safetensors" in files else set()
    return {shard for name, shard in index["weight_map"].items() if keep(name)}


def read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise MergeError(f"{what} {path}: unreadable JSON ({e})") from None
    if not isinstance(value, dict):
        raise MergeError(f"{what} {path}: not a JSON object")
    return value


def open_source(path_or_id: str, role: str, keep: Callable[[str], bool], extra_files: tuple[str, ...]) -> Source:
    """Read a source's config and the headers of the shards holding the tensors `keep` accepts; every such shard is
    checked against its header (size, offsets), so a bad download fails here, before any output exists."""
    def wanted(files: set[str], index: dict | None) -> list[str]:
        small = {"config.json", "generation_config.json", *extra_files} & files
        return sorted(small | shards_holding(index, files, keep))

    root = fetch(path_or_id, wanted)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise MergeError(f"{role} {root}: no config.json")
    source = Source(root=root, config=read_json(config_path, role))
    index_path = root / "model.safetensors.index.json"
    index = read_json(index_path, role) if index_path.is_file() else None
    if index is not None and not isinstance(index.get("weight_map"), dict):
        raise MergeError(f"{role} {index_path}: no weight_map")
    shard_names = sorted(shards_holding(index, {p.name for p in root.iterdir()}, keep))
    if index is None and not shard_names and (any(root.glob("*.bin")) or any(root.glob("*.pt"))):
        raise MergeError(f"{role} {root}: only pickle weights (*.bin/*.pt) found; convert them to safetensors first")
    if index is None and not shard_names:
        raise MergeError(f"{role} {root}: no safetensors weights")
    for shard in shard_names:
        path = root / shard
        if not path.is_file():
            raise MergeError(f"{role} {root}: shard {shard} listed in the index is missing")
        header, start = read_safetensors_header(path)
        for name, entry in header.items():
            if keep(name):
                source.tensors[name] = (path, {**entry, "start": start})
    return source


# ----------------------------------------------------------------------------------------------------------------
# Tensor plan: what goes where, checked against the configs

@dataclass
class Item:
    name: str
    dtype: str                 # output dtype name
    shape: list[int]
    origin: str                # "vlm", "llm" or "new"
    file: Path | None = None   # source file
    entry: dict | None = None  # source header entry (+ "start")
    make: Callable[[], Any] | None = None  # for new tensors: () -> float32 numpy array
    src: str = ""              # source tensor name

    @property
    def nbytes(self) -> int:
        return {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype] * math.prod(self.shape)


def source_dtype(entry: dict) -> str:
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise MergeError(f"unsupported tensor dtype {entry['dtype']}")
    return SAFETENSORS_DTYPES[entry["dtype"]][0]


def expected_llm_tensors(text: dict) -> set[str]:
    """The LLM tensor names its config implies: per layer attention (+ biases), then a dense MLP, or for a sparse
    Qwen3-MoE layer the router and every expert's MLP."""
    attention = QWEN3_ATTENTION + (QWEN3_LAYER_BIAS if text["attention_bias"] else ())
    names = set(QWEN3_GLOBAL)
    for i in range(text["num_hidden_layers"]):
        names |= {n.format(i=i) for n in attention}
        if is_sparse_layer(text, i):
            names |= {n.format(i=i) for n in QWEN3_MOE_ROUTER}
            names |= {n.format(i=i, e=e) for e in range(text["num_experts"]) for n in QWEN3_MOE_EXPERT}
        else:
            names |= {n.format(i=i) for n in QWEN3_MLP}
    return names if text["tie_word_embeddings"] else names | {"lm_head.weight"}


def llm_key_shapes(text: dict) -> dict[str, list[int]]:
    """Shapes of the tensors that pin the LLM's sizes: embedding, q/k projections, and for a MoE the first sparse
    layer's router and expert MLP."""
    hidden, head_dim = text["hidden_size"], text["head_dim"]
    shapes = {"model.embed_tokens.weight": [text["vocab_size"], hidden],
              "model.layers.0.self_attn.q_proj.weight": [text["num_attention_heads"] * head_dim, hidden],
              "model.layers.0.self_attn.k_proj.weight": [text["num_key_value_heads"] * head_dim, hidden]}
    sparse = [i for i in range(text["num_hidden_layers"]) if is_sparse_layer(text, i)]
    if sparse:
        prefix = f"model.layers.{sparse[0]}.mlp."
        shapes[prefix + "gate.weight"] = [text["num_experts"], hidden]
        shapes[prefix + "experts.0.gate_proj.weight"] = [text["moe_intermediate_size"], hidden]
        shapes[prefix + "experts.0.down_proj.weight"] = [hidden, text["moe_intermediate_size"]]
    return shapes


def expected_vision_tensors(vision: dict) -> set[str]:
    return set(VISION_GLOBAL) | {n.format(i=i) for i in range(vision["depth"]) for n in VISION_BLOCK}


def check_tensor_set(role: str, root: Path, have: dict[str, list[int]], expected: set[str], allowed: set[str],
                     shapes: dict[str, list[int]], what: str) -> None:
    """One-line error when the tensors do not match the config: missing, unexpected, or of the wrong shape."""
    def some(names: set[str]) -> str:
        listed = sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in n.split(".")])
        return ", ".join(listed[:3]) + (f" and {len(listed) - 3} more" if len(listed) > 3 else "")

    missing, extra = expected - set(have), set(have) - expected - allowed
    if missing:
        raise MergeError(f"{role} {root}: {len(missing)} tensor(s) that its config ({what}) needs are missing: "
                         f"{some(missing)}; the download is incomplete or config.json does not match the weights")
    if extra:
        raise MergeError(f"{role} {root}: {len(extra)} tensor(s) its config ({what}) does not account for: "
                         f"{some(extra)}; config.json does not match the weights")
    for name, shape in shapes.items():
        if name in have and list(have[name]) != shape:
            raise MergeError(f"{role} {root}: {name} has shape {list(have[name])}, but its config implies {shape}")


def plan_tensors(vlm: Source, llm: Source, config: dict, dtype: str, seed: int, init_std: float) -> list[Item]:
    """Every output tensor in write order: the VLM's vision tensors (renamed by TAKE), the LLM's tensors (minus
    SKIP_IF_TIED when tied), then NEW_TENSORS. Source tensors keep their file order, so long runs are copied as one
    range. The tensor sets and key shapes are checked against `config` (the merged config) first."""
    import numpy as np

    text, vision = qwen3_fields(llm.config), config["vision_config"]
    by_position = lambda kv: (str(kv[1][0]), kv[1][1]["data_offsets"][0])  # noqa: E731  (file order: long copies)
    vlm_items = [Item(rename("vlm", name), dtype, entry["shape"], "vlm", path, entry, src=name)
                 for name, (path, entry) in sorted(vlm.tensors.items(), key=by_position)]
    names = [i.name for i in vlm_items]
    if len(set(names)) != len(names):
        raise MergeError(f"--vlm-path {vlm.root}: holds the vision tower twice (visual.* and model.visual.*)")
    width, merged_in = vision["out_hidden_size"], vision["hidden_size"] * vision["spatial_merge_size"] ** 2
    patch = [vision["hidden_size"], vision["in_channels"], vision["temporal_patch_size"], vision["patch_size"],
             vision["patch_size"]]
    check_tensor_set("--vlm-path", vlm.root, {i.name: i.shape for i in vlm_items}, expected_vision_tensors(vision),
                     set(), {"visual.patch_embed.proj.weight": patch, "visual.merger.mlp.0.weight": [merged_in] * 2,
                             "visual.merger.mlp.2.weight": [width, merged_in]},
                     f"vision depth {vision['depth']}, hidden {vision['hidden_size']}, out {width}")
    hidden = text["hidden_size"]
    experts = f", {text['num_experts']} experts" if "num_experts" in text else ""
    check_tensor_set("--llm-path", llm.root, {n: e["shape"] for n, (_, e) in llm.tensors.items()},
                     expected_llm_tensors(text), set(SKIP_IF_TIED), llm_key_shapes(text),
                     f"{text['num_hidden_layers']} layers{experts}, hidden {hidden}, tie_word_embeddings "
                     f"{str(text['tie_word_embeddings']).lower()}")
    tied = text["tie_word_embeddings"]
    llm_items = [Item(rename("llm", name), dtype, entry["shape"], "llm", path, entry, src=name)
                 for name, (path, entry) in sorted(llm.tensors.items(), key=by_position)
                 if not (tied and name in SKIP_IF_TIED)]
    initialisers = {"normal": lambda shape: np.random.default_rng(seed).normal(0.0, init_std, shape),
                    "zeros": np.zeros}
    new_items = [Item(name, dtype, shape_of(hidden, width), "new",
                      make=lambda init=initialisers[kind], shape=shape_of(hidden, width): init(shape))
                 for name, (kind, shape_of) in NEW_TENSORS.items()]
    return vlm_items + llm_items + new_items


def parse_decimal_size(text: str | int) -> int:
    """A size with decimal units as the Hugging Face hub counts them (5GB = 5 * 10**9 bytes; KiB/MiB/GiB are binary).
    data_process/filter_ops.py has the binary counterpart."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = str(text).strip().upper()
    for unit, scale in units.items():
        if upper.endswith(unit) and upper[:-len(unit)].replace(".", "", 1).isdigit():
            return int(float(upper[:-len(unit)]) * scale)
    if upper.isdigit():
        return int(upper)
    raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 5GB, 500MB)")


def split_shards(items: list[Item], max_bytes: int) -> list[list[Item]]:
    shards, current, size = [], [], 0
    for item in items:
        if current and size + item.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.nbytes
    if current:
        shards.append(current)
    return shards


# ----------------------------------------------------------------------------------------------------------------
# Streaming writer

def copy_range(src: Path, offset: int, length: int, dst: BinaryIO) -> None:
    """Copy bytes [offset, offset+length) of src into the open file dst, in the kernel when possible. A source that
    ends early (it shrank after its header was checked) is an error, never a silent loop."""
    with open(src, "rb") as f:
        dst.flush()
        while length:
            try:
                n = os.copy_file_range(f.fileno(), dst.fileno(), min(length, 1 << 30), offset)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS):
                    raise
                n = 0
            if n == 0:  # fallback: buffered copy
                f.seek(offset)
                chunk = f.read(min(length, 64 << 20))
                if not chunk:
                    raise MergeError(f"{src}: ended {length} bytes early while copying (did it change during the "
                                     f"merge?)")
                dst.write(chunk)
                dst.flush()
                n = len(chunk)
            offset += n
            length -= n
    dst.seek(0, os.SEEK_END)


def numpy_bytes(array, dtype: str) -> bytes:
    """float32 numpy data as float32 / float16 / bfloat16 (round to nearest even) bytes, without torch."""
    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.float32)
    if dtype == "float32":
        return array.tobytes()
    if dtype == "float16":
        return array.astype(np.float16).tobytes()
    bits = array.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def tensor_bytes(item: Item) -> bytes:
    """One new tensor, or one source tensor cast to the output dtype."""
    if item.make is not None:
        return numpy_bytes(item.make(), item.dtype)
    import torch
    from safetensors import safe_open

    with safe_open(str(item.file), framework="pt") as f:
        tensor = f.get_tensor(item.src)
    tensor = tensor.to(getattr(torch, item.dtype)).contiguous()
    return tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def write_shard(path: Path, items: list[Item], progress: Any) -> None:
    """Write one safetensors file holding `items` in order: the header, then each tensor's bytes. Tensors that keep
    their dtype are copied as byte ranges (adjacent ranges of one file as one copy); others are cast one at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for item in items:
        header[item.name] = {"dtype": DTYPE_CODES[item.dtype], "shape": item.shape,
                             "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        run = None  # [file, first byte, length]: adjacent raw copies from one file become one copy
        for item in items:
            if item.make is None and source_dtype(item.entry) == item.dtype:
                begin, end = (item.entry["start"] + o for o in item.entry["data_offsets"])
                if run and run[0] == item.file and run[1] + run[2] == begin:
                    run[2] += end - begin
                else:
                    if run:
                        copy_range(*run, out)
                    run = [item.file, begin, end - begin]
            else:
                if run:
                    copy_range(*run, out)
                    run = None
                out.write(tensor_bytes(item))
            progress.update(item.nbytes)
        if run:
            copy_range(*run, out)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer, processor, generation config

# Image area bounds the stage YAMLs train with (examples/README.md): 256 to 1280 visual tokens per image. Written into
# the processor config so that serving and evaluation see images at the resolution training used.
TRAIN_MIN_PIXELS, TRAIN_MAX_PIXELS = 256 * 28 * 28, 1280 * 28 * 28


def write_materials(out: Path, vlm: Source, llm: Source, materials: Path | None,
                    image_pixels: tuple[int, int] = (TRAIN_MIN_PIXELS, TRAIN_MAX_PIXELS)) -> list[str]:
    """Write the non-weight files into `out`: the LLM's tokenizer files (vocab.json/merges.txt extracted from
    tokenizer.json when missing), our chat template, the VLM's image/video processor configs with the training
    pixel bounds (0, 0 keeps the VLM's), the LLM's generation config, then `materials` copied over. Returns notes."""
    notes = []
    for name in TOKENIZER_FILES:
        if llm.file(name):
            shutil.copy2(llm.file(name), out / name)
    if not (out / "tokenizer.json").is_file() and not (out / "vocab.json").is_file():
        raise MergeError(f"{llm.root}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    if not (out / "merges.txt").is_file():
        from tokenizers import Tokenizer
        Tokenizer.from_file(str(out / "tokenizer.json")).model.save(str(out))  # vocab.json + merges.txt
        notes.append("vocab.json/merges.txt extracted from tokenizer.json")
    template = CHAT_TEMPLATE_FILE.read_text()
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    tok_cfg["chat_template"] = template
    tok_cfg.pop("processor_class", None)
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    (out / "chat_template.jinja").write_text(template)
    for name in VLM_PROCESSOR_FILES:
        if vlm.file(name):
            cfg = json.loads(vlm.file(name).read_text())
            cfg["processor_class"] = "Qwen2_5_VLProcessor"
            if name == "preprocessor_config.json" and all(image_pixels):
                cfg.update(min_pixels=image_pixels[0], max_pixels=image_pixels[1])
                cfg["size"] = {"shortest_edge": image_pixels[0], "longest_edge": image_pixels[1]}
            (out / name).write_text(json.dumps(cfg, indent=2))
    if not (out / "preprocessor_config.json").is_file():
        raise MergeError(f"{vlm.root}: no preprocessor_config.json")
    if llm.file("generation_config.json"):
        shutil.copy2(llm.file("generation_config.json"), out / "generation_config.json")
    if materials is not None:
        if not materials.is_dir():
            raise MergeError(f"--materials-path {materials} is not a directory")
        for f in sorted(materials.iterdir()):
            if f.is_file():
                shutil.copy2(f, out / f.name)
                notes.append(f"{f.name} from materials")
    return notes


# ----------------------------------------------------------------------------------------------------------------
# Options (the CLI flags are generated from these fields)

@dataclass(frozen=True)
class MergeOptions:
    """Everything a merge needs. Invalid values raise MergeError when the options are made."""

    vlm_path: str = "Qwen/Qwen2.5-VL-72B-Instruct"
    llm_path: str = "Qwen/Qwen3-8B"
    output_path: str = "Qwen-Merge-VL-8B-base"
    materials_path: str | None = None
    dtype: str = "auto"
    seed: int = 0
    init_std: float = 0.02
    max_shard_size: int = 5 * 10**9
    image_min_pixels: int = TRAIN_MIN_PIXELS
    image_max_pixels: int = TRAIN_MAX_PIXELS
    overwrite: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise MergeError(f"--dtype {self.dtype!r}: choose from {', '.join(DTYPE_CHOICES)}")
        if not (math.isfinite(self.init_std) and self.init_std >= 0):
            raise MergeError(f"--init-std {self.init_std}: must be a finite number >= 0 (e.g. 0.02)")
        if self.max_shard_size <= 0:
            raise MergeError(f"--max-shard-size {self.max_shard_size}: must be positive (e.g. 5GB)")
        if self.image_min_pixels < 0 or self.image_max_pixels < 0:
            raise MergeError("--image-min-pixels / --image-max-pixels must be >= 0 (0 keeps the VLM's)")
        if self.image_min_pixels and self.image_max_pixels and self.image_min_pixels > self.image_max_pixels:
            raise MergeError(f"--image-min-pixels {self.image_min_pixels} is larger than --image-max-pixels "
                             f"{self.image_max_pixels}")


DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
OPTION_HELP = {
    "vlm_path": "Qwen2.5-VL source: local dir or hub id",
    "llm_path": "Qwen3 source (dense or Qwen3-MoE): local dir or hub id",
    "output_path": "output directory",
    "materials_path": "optional directory whose files are copied over the generated tokenizer/processor files",
    "dtype": "output dtype; auto = the LLM's dtype",
    "seed": "seed of the new projector's initialisation",
    "init_std": "std of the new projector weight",
    "max_shard_size": "largest output shard (decimal units: 5GB = 5e9 bytes)",
    "image_min_pixels": "processor min_pixels written to the output (the stage YAMLs' image_min_pixels); 0 keeps "
                        "the VLM's",
    "image_max_pixels": "processor max_pixels written to the output (the stage YAMLs' image_max_pixels); 0 keeps "
                        "the VLM's",
    "overwrite": "replace an existing --output-path",
    "quiet": "no progress bar or summary",
}
OPTION_ARGS: dict[str, dict[str, Any]] = {  # argparse settings beyond what the field's default implies
    "dtype": {"choices": DTYPE_CHOICES},
    "max_shard_size": {"type": parse_decimal_size, "default": "5GB"},
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per MergeOptions field (--vlm-path for vlm_path, ...), with OPTION_HELP and OPTION_ARGS."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(MergeOptions):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=OPTION_HELP[f.name])
            continue
        kind = type(f.default) if f.default is not None else str
        settings = {"type": kind, "default": f.default, "help": OPTION_HELP[f.name], **OPTION_ARGS.get(f.name, {})}
        parser.add_argument(flag, **settings)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Output location: checks, stale staging folders, atomic replace

STAGING_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child nobody has reaped yet is a zombie: it holds nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def clean_stale(output: Path) -> list[str]:
    """Remove the `.NAME.partial-PID` staging folders of merges into `output` that were killed (PID gone); restore a
    `.NAME.old-PID` left between the two renames of an --overwrite. Returns what was done, one line each."""
    done = []
    if not output.parent.is_dir():
        return done
    for path in sorted(output.parent.iterdir()):
        match = STAGING_NAME.match(path.name)
        if not match or match["name"] != output.name:
            continue
        pid = int(match["pid"])
        if pid_alive(pid):
            done.append(f"left {path.name}: merge pid {pid} is still running")
            continue
        if match["kind"] == "old" and not output.exists():
            os.replace(path, output)
            done.append(f"restored {output.name} from {path.name} (a merge with --overwrite was killed, pid {pid})")
            continue
        size = tree_bytes(path)
        remove(path)
        done.append(f"removed {path.name} ({size / 1e9:.2f} GB) left by a merge that was killed (pid {pid})")
    return done


def check_output_location(output: Path, overwrite: bool) -> None:
    for parent in [output.parent, *output.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise MergeError(f"--output-path {output}: {parent} is a file, not a folder")
            break
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        kind = "is a file" if not output.is_dir() else "exists and is not empty"
        raise MergeError(f"{output} {kind} (use --overwrite to replace it)")


def write_error(e: OSError, output: Path, total: int) -> MergeError:
    """An OSError while writing the output, as one line that says what to do."""
    where = e.filename or output.parent
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        try:
            free = f"{shutil.disk_usage(output.parent).free / 1e9:.2f} GB free"
        except OSError:
            free = "free space unknown"
        return MergeError(f"cannot write the merged model to {output.parent}: {e.strerror} (its weights need "
                          f"{total / 1e9:.2f} GB, {free} there); free some space or choose another --output-path")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return MergeError(f"cannot write to {output.parent}: {e.strerror}; choose a writable --output-path")
    return MergeError(f"cannot write {where}: {e.strerror or e}")


def install(staging: Path, output: Path) -> None:
    """Move the finished staging folder to `output`, replacing what is there (file or folder) atomically."""
    if output.exists() or output.is_symlink():
        trash = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, trash)
        os.replace(staging, output)
        remove(trash)
    else:
        os.replace(staging, output)


# ----------------------------------------------------------------------------------------------------------------

def merge(vlm_path: str, llm_path: str, output_path: str, **options: Any) -> dict:
    """Merge by keyword: `merge(vlm, llm, out, dtype="bfloat16", quiet=True)`; `options` are MergeOptions fields."""
    return run_merge(MergeOptions(vlm_path=str(vlm_path), llm_path=str(llm_path), output_path=str(output_path),
                                  **options))


def run_merge(options: MergeOptions) -> dict:
    """Build the Qwen-Merge checkpoint `options.output_path` from `options.vlm_path` and `options.llm_path`.

    Reads both configs and every needed shard header (sizes checked), validates the pair, plans every output tensor
    and checks the tensor sets against the configs, all before writing. Then streams the shards into a hidden staging
    folder next to the output, writes tokenizer/processor/config files, and renames it into place. On any failure the
    staging folder is removed and a MergeError (one line) is raised. Returns a summary dict (counts, bytes, seconds).
    """
    from tqdm import tqdm

    started = time.time()
    output = Path(options.output_path).expanduser().resolve()
    for line in clean_stale(output):
        print(f"[merge] {line}", file=sys.stderr)
    check_output_location(output, options.overwrite)
    vlm = open_source(options.vlm_path, "--vlm-path", lambda n: rename("vlm", n) is not None, VLM_PROCESSOR_FILES)
    llm = open_source(options.llm_path, "--llm-path", lambda n: rename("llm", n) is not None, TOKENIZER_FILES)
    validate_kinds(vlm.config, llm.config)
    dtype = options.dtype
    if dtype == "auto":
        embed = llm.tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise MergeError(f"{llm.root}: no model.embed_tokens.weight")
        dtype = source_dtype(embed[1])
    config = build_config(vlm.config, llm.config, dtype)
    check_special_tokens(llm.root, config)
    items = plan_tensors(vlm, llm, config, dtype, options.seed, options.init_std)
    shards = split_shards(items, options.max_shard_size)
    total = sum(i.nbytes for i in items)

    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(output.parent).free
        if free < total:
            raise OSError(errno.ENOSPC, "not enough free space", str(output.parent))
        staging.mkdir()
    except OSError as e:
        raise write_error(e, output, total) from None
    try:
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        with tqdm(total=total, unit="B", unit_scale=True, desc="merging", disable=options.quiet) as progress:
            for shard_name, shard in zip(names, shards):
                write_shard(staging / shard_name, shard, progress)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {i.name: n for n, shard in zip(names, shards) for i in shard}}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        notes = write_materials(staging, vlm, llm, Path(options.materials_path) if options.materials_path else None,
                                (options.image_min_pixels, options.image_max_pixels))
        (staging / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        install(staging, output)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(e, output, total) from None
        raise

    summary = {
        "output": str(output), "dtype": dtype, "seconds": round(time.time() - started, 2), "shards": len(shards),
        "bytes": total, "from_vlm": sum(i.origin == "vlm" for i in items),
        "from_llm": sum(i.origin == "llm" for i in items), "new": [i.name for i in items if i.origin == "new"],
        "lm_head": "tied (not stored)" if config["tie_word_embeddings"] else "stored",
        "vlm": str(vlm.root), "llm": str(llm.root), "notes": notes, "seed": options.seed,
    }
    if not options.quiet:
        print(f"[merge] {summary['from_vlm']} vision tensors from {vlm.root}")
        print(f"[merge] {summary['from_llm']} LLM tensors from {llm.root} (lm_head {summary['lm_head']})")
        print(f"[merge] new: {', '.join(summary['new'])} (N(0, {options.init_std}) with seed {options.seed}, "
              f"zero bias)")
        print(f"[merge] wrote {total / 1e9:.2f} GB as {dtype} in {len(shards)} shard(s) to {output} "
              f"in {summary['seconds']} s")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_merge(MergeOptions(**vars(args)))
    except MergeError as e:
        print(f"model_merger: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("model_merger: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
