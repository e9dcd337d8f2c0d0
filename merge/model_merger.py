#!/usr/bin/env python3
"""Build a Qwen-Merge checkpoint: the vision tower + merger of a Qwen2.5-VL model, a new GELU + Linear projector to
the width of a Qwen3 LLM, and that LLM, streamed tensor by tensor from safetensors (neither model is loaded).

    python merge/model_merger.py --vlm-path Qwen/Qwen2.5-VL-72B-Instruct --llm-path Qwen/Qwen3-4B \
        --output-path Qwen-Merge-VL-4B-base

Memory stays at one tensor: tensors that keep their dtype are copied byte ranges from file to file, others are cast
one at a time. The output is built in a temporary sibling directory and renamed into place at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHAT_TEMPLATE_FILE = HERE / "chat_template.jinja"
MODEL_TYPE = "qwen2_5_vl_merge"
ARCHITECTURE = "Qwen2_5_VL_MergeForConditionalGeneration"
VISION_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                     "vision_token_id")
VISION_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                 "vision_token_id": "<|vision_pad|>"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")
VLM_PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")
SAFETENSORS_DTYPES = {"F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2)}
DTYPE_CODES = {name: code for code, (name, _) in SAFETENSORS_DTYPES.items()}


class MergeError(Exception):
    """A problem with the inputs, reported as one line."""


# ----------------------------------------------------------------------------------------------------------------
# Sources: local directories or hub ids (only the files needed are fetched)

@dataclass
class Source:
    root: Path
    config: dict
    tensors: dict[str, tuple[Path, dict]] = field(default_factory=dict)  # name -> (file, header entry)

    def file(self, name: str) -> Path | None:
        path = self.root / name
        return path if path.is_file() else None


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset where tensor data starts)."""
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise MergeError(f"{path} is not a safetensors file (truncated)")
        (size,) = struct.unpack("<Q", size_bytes)
        try:
            header = json.loads(f.read(size))
        except ValueError as e:
            raise MergeError(f"{path} has a corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def fetch(path_or_id: str, wanted: callable) -> Path:
    """A local directory as is; otherwise download from the hub the files `wanted(index)` asks for."""
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


def shards_holding(index: dict | None, files: set[str], keep: callable) -> set[str]:
    if index is None:
        return {"model.safetensors"} if "model.safetensors" in files else set()
    return {shard for name, shard in index["weight_map"].items() if keep(name)}


def open_source(path_or_id: str, role: str, keep: callable, extra_files: tuple[str, ...]) -> Source:
    def wanted(files, index):
        small = {"config.json", "generation_config.json", *extra_files} & files
        return sorted(small | shards_holding(index, files, keep))

    root = fetch(path_or_id, wanted)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise MergeError(f"{role} {root}: no config.json")
    source = Source(root=root, config=json.loads(config_path.read_text()))
    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
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
# Checks and config

def text_fields(config: dict) -> dict:
    """Text-model fields of a flat or nested (`text_config`) config."""
    return {**config, **config.get("text_config", {})}


def validate_kinds(vlm: dict, llm: dict) -> None:
    vlm_type, llm_type = vlm.get("model_type"), llm.get("model_type")
    if vlm_type == "qwen3" and llm_type in ("qwen2_5_vl", MODEL_TYPE):
        raise MergeError("--vlm-path and --llm-path look swapped (the VLM path holds a Qwen3, the LLM path a VLM)")
    if vlm_type != "qwen2_5_vl" or "vision_config" not in vlm:
        raise MergeError(f"--vlm-path must be a Qwen2.5-VL model (model_type qwen2_5_vl), got {vlm_type!r}")
    if llm_type != "qwen3":
        hint = " (MoE models are not supported)" if llm_type == "qwen3_moe" else ""
        raise MergeError(f"--llm-path must be a dense Qwen3 model (model_type qwen3), got {llm_type!r}{hint}")


def build_config(vlm: dict, llm: dict, dtype: str) -> dict:
    """The LLM's flat config + the VLM's vision config, M-RoPE sections and vision token ids."""
    vlm_text = text_fields(vlm)
    head_dim = llm.get("head_dim") or llm["hidden_size"] // llm["num_attention_heads"]
    rope = vlm_text.get("rope_scaling") or {}
    section = rope.get("mrope_section")
    if not section:
        raise MergeError("the VLM config has no rope_scaling.mrope_section")
    if 2 * sum(section) != head_dim:
        raise MergeError(f"mrope_section {section} of the VLM sums to {sum(section)}, but the LLM's head_dim/2 "
                         f"is {head_dim // 2}: these models cannot be merged")
    merged = {k: v for k, v in llm.items() if k not in ("architectures", "model_type", "text_config")}
    merged["architectures"] = [ARCHITECTURE]
    merged["model_type"] = MODEL_TYPE
    merged["head_dim"] = head_dim
    llm_rope = llm.get("rope_scaling") or {}
    merged["rope_scaling"] = {**llm_rope, "type": llm_rope.get("type", llm_rope.get("rope_type", "mrope")),
                              "mrope_section": list(section)}
    if merged["rope_scaling"]["type"] in ("default", "mrope"):
        merged["rope_scaling"] = {"type": "mrope", "mrope_section": list(section)}
    for key in VISION_TOKEN_KEYS:
        if key in vlm_text:
            merged[key] = vlm_text[key]
        if key in merged and merged[key] >= llm["vocab_size"]:
            raise MergeError(f"{key}={merged[key]} of the VLM is outside the LLM vocabulary ({llm['vocab_size']})")
    vision = dict(vlm["vision_config"])
    vision["out_hidden_size2"] = llm["hidden_size"]
    vision["model_type"] = f"{MODEL_TYPE}_vision"
    vision.pop("torch_dtype", None)
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
# Tensor plan and streaming writer

@dataclass
class Item:
    name: str
    dtype: str                 # output dtype name
    shape: list[int]
    origin: str                # "vlm", "llm" or "new"
    file: Path | None = None   # source file
    entry: dict | None = None  # source header entry (+ "start")
    make: callable = None      # for new tensors: () -> float32 numpy array
    src: str = ""              # source tensor name

    @property
    def nbytes(self) -> int:
        n = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        for d in self.shape:
            n *= d
        return n


def source_dtype(entry: dict) -> str:
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise MergeError(f"unsupported tensor dtype {entry['dtype']}")
    return SAFETENSORS_DTYPES[entry["dtype"]][0]


def plan_tensors(vlm: Source, llm: Source, dtype: str, seed: int, init_std: float) -> list[Item]:
    import numpy as np

    items = []
    by_position = lambda kv: (str(kv[1][0]), kv[1][1]["data_offsets"][0])  # noqa: E731  (file order: long copies)
    for name, (path, entry) in sorted(vlm.tensors.items(), key=by_position):
        out = "visual." + name.split("visual.", 1)[1]
        items.append(Item(out, dtype, entry["shape"], "vlm", path, entry, src=name))
    if not any(i.name == "visual.merger.mlp.2.weight" for i in items):
        raise MergeError(f"{vlm.root}: no visual.merger.mlp.2.weight; is this a Qwen2.5-VL checkpoint?")
    tied = llm.config.get("tie_word_embeddings", False)
    for name, (path, entry) in sorted(llm.tensors.items(), key=by_position):
        if tied and name == "lm_head.weight":
            continue
        items.append(Item(name, dtype, entry["shape"], "llm", path, entry, src=name))
    if not tied and not any(i.name == "lm_head.weight" for i in items):
        raise MergeError(f"{llm.root}: tie_word_embeddings is false but lm_head.weight is missing")
    vision_width = vlm.config["vision_config"]["out_hidden_size"]
    merger_out = next(i.shape[0] for i in items if i.name == "visual.merger.mlp.2.weight")
    if merger_out != vision_width:
        raise MergeError(f"visual.merger.mlp.2 outputs {merger_out}, but vision_config.out_hidden_size is "
                         f"{vision_width}")
    hidden = llm.config["hidden_size"]
    weight = lambda: np.random.default_rng(seed).normal(0.0, init_std, (hidden, vision_width))  # noqa: E731
    items.append(Item("visual.merger.mlp.4.weight", dtype, [hidden, vision_width], "new", make=weight))
    items.append(Item("visual.merger.mlp.4.bias", dtype, [hidden], "new", make=lambda: np.zeros(hidden)))
    return items


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
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


def copy_range(src: Path, offset: int, length: int, dst) -> None:
    """Copy bytes [offset, offset+length) of src into the open file dst, in the kernel when possible."""
    with open(src, "rb") as f:
        dst.flush()
        while length:
            try:
                n = os.copy_file_range(f.fileno(), dst.fileno(), min(length, 1 << 30), offset)
            except OSError:
                n = 0
            if n == 0:  # fallback: buffered copy
                f.seek(offset)
                chunk = f.read(min(length, 64 << 20))
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


def write_shard(path: Path, items: list[Item], progress) -> None:
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

def is_vision_tensor(name: str) -> bool:
    return name.startswith(("visual.", "model.visual."))


def merge(vlm_path: str, llm_path: str, output_path: str, materials_path: str | None = None, dtype: str = "auto",
          seed: int = 0, max_shard_size: int = 5 * 10**9, overwrite: bool = False, init_std: float = 0.02,
          quiet: bool = False, image_min_pixels: int = TRAIN_MIN_PIXELS,
          image_max_pixels: int = TRAIN_MAX_PIXELS) -> dict:
    from tqdm import tqdm

    started = time.time()
    output = Path(output_path).expanduser().resolve()
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise MergeError(f"{output} exists and is not empty (use --overwrite to replace it)")
    vlm = open_source(vlm_path, "--vlm-path", is_vision_tensor, VLM_PROCESSOR_FILES)
    llm = open_source(llm_path, "--llm-path", lambda n: True, TOKENIZER_FILES)
    validate_kinds(vlm.config, llm.config)
    if dtype == "auto":
        embed = llm.tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise MergeError(f"{llm.root}: no model.embed_tokens.weight")
        dtype = source_dtype(embed[1])
    config = build_config(vlm.config, llm.config, dtype)
    check_special_tokens(llm.root, config)
    items = plan_tensors(vlm, llm, dtype, seed, init_std)
    shards = split_shards(items, max_shard_size)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        total = sum(i.nbytes for i in items)
        with tqdm(total=total, unit="B", unit_scale=True, desc="merging", disable=quiet) as progress:
            for shard_name, shard in zip(names, shards):
                write_shard(staging / shard_name, shard, progress)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {i.name: n for n, shard in zip(names, shards) for i in shard}}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        notes = write_materials(staging, vlm, llm, Path(materials_path) if materials_path else None,
                                (image_min_pixels, image_max_pixels))
        (staging / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        if output.exists():
            trash = output.parent / f".{output.name}.old-{os.getpid()}"
            os.replace(output, trash)
            os.replace(staging, output)
            shutil.rmtree(trash)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    summary = {
        "output": str(output), "dtype": dtype, "seconds": round(time.time() - started, 2), "shards": len(shards),
        "bytes": total, "from_vlm": sum(i.origin == "vlm" for i in items),
        "from_llm": sum(i.origin == "llm" for i in items), "new": [i.name for i in items if i.origin == "new"],
        "lm_head": "tied (not stored)" if llm.config.get("tie_word_embeddings") else "stored",
        "vlm": str(vlm.root), "llm": str(llm.root), "notes": notes, "seed": seed,
    }
    if not quiet:
        print(f"[merge] {summary['from_vlm']} vision tensors from {vlm.root}")
        print(f"[merge] {summary['from_llm']} LLM tensors from {llm.root} (lm_head {summary['lm_head']})")
        print(f"[merge] new: {', '.join(summary['new'])} (N(0, {init_std}) with seed {seed}, zero bias)")
        print(f"[merge] wrote {total / 1e9:.2f} GB as {dtype} in {len(shards)} shard(s) to {output} "
              f"in {summary['seconds']} s")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vlm-path", default="Qwen/Qwen2.5-VL-72B-Instruct", help="Qwen2.5-VL source: local dir or hub id")
    p.add_argument("--llm-path", default="Qwen/Qwen3-8B", help="dense Qwen3 source: local dir or hub id")
    p.add_argument("--output-path", default="Qwen-Merge-VL-8B-base", help="output directory")
    p.add_argument("--materials-path", default=None,
                   help="optional directory whose files are copied over the generated tokenizer/processor files")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="output dtype; auto = the LLM's dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the new projector's initialisation")
    p.add_argument("--init-std", type=float, default=0.02, help="std of the new projector weight")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", help="largest output shard")
    p.add_argument("--image-min-pixels", type=int, default=TRAIN_MIN_PIXELS,
                   help="processor min_pixels written to the output (the stage YAMLs' image_min_pixels); 0 keeps "
                        "the VLM's")
    p.add_argument("--image-max-pixels", type=int, default=TRAIN_MAX_PIXELS,
                   help="processor max_pixels written to the output (the stage YAMLs' image_max_pixels); 0 keeps "
                        "the VLM's")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-path")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    args = p.parse_args(argv)
    try:
        merge(args.vlm_path, args.llm_path, args.output_path, args.materials_path, args.dtype, args.seed,
              args.max_shard_size, args.overwrite, args.init_std, args.quiet, args.image_min_pixels,
              args.image_max_pixels)
    except MergeError as e:
        print(f"model_merger: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
