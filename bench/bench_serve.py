#!/usr/bin/env python3
"""vLLM generation throughput: Qwen-Merge against a stock Qwen2.5-VL of the same dimensions, in one run.

Builds two checkpoints with random weights and identical shapes: the same vision tower (depth, width, heads, patch
merger), the same decoder (hidden, layers, heads, kv heads, head_dim = hidden / heads, intermediate, vocabulary,
tied embeddings), the same M-RoPE sections. What differs is what Qwen-Merge is: Qwen3 decoder layers (q/k RMSNorm,
no qkv bias) instead of Qwen2 ones, and the extra GELU + Linear (mlp.3/mlp.4) in the patch merger. Both models are
then served by `vllm.LLM` side by side in this process, and their timed batches alternate (so a busy machine slows
both alike): each batch is `--num-prompts` image prompts generated greedily with `--max-tokens` new tokens each
(ignore_eos, distinct images, no prefix caching). After one warm-up round, `--repeats` rounds are timed; tokens/s are
the medians per model, and the ratio is the median of the per-round ratios (robust to the load drifting meanwhile).

    python bench/bench_serve.py                      # toy size, about 2 minutes on 2 CPU cores
    python bench/bench_serve.py --preset vl7b --dtype bfloat16 --num-prompts 32 --max-tokens 256   # on a GPU

Reports tokens/s for both and the ratio Qwen-Merge / stock (goal >= 0.95). Prints one JSON object on stdout
(`--json FILE` also writes it). vLLM 0.9.1 CPU runs float32 only on its V0 engine; bfloat16 (the default) uses V1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL_RATIO = 0.95
PRESETS = {
    "toy": dict(hidden=256, layers=2, heads=4, kv=2, inter=512, vision_depth=2, vision_hidden=64, vision_heads=2,
                vision_inter=128, vocab=151936, tied=True),
    "small": dict(hidden=1024, layers=8, heads=16, kv=8, inter=3072, vision_depth=4, vision_hidden=256,
                  vision_heads=4, vision_inter=512, vocab=151936, tied=True),
    # Qwen2.5-VL-7B's shapes (a Qwen3 decoder needs heads * head_dim == hidden to match them).
    "vl7b": dict(hidden=3584, layers=28, heads=28, kv=4, inter=18944, vision_depth=32, vision_hidden=1280,
                 vision_heads=16, vision_inter=3420, vocab=152064, tied=False),
}
PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nDescribe picture {i} in detail.<|im_end|>\n"
          "<|im_start|>assistant\n")


class BenchError(Exception):
    """Bad arguments or a failed run, reported as one line."""


# --------------------------------------------------------------------------------------------------- checkpoints


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's t/h/w split of the rotary half-dimension (2:3:3, [16, 24, 24] for head_dim 128)."""
    if head_dim % 16:
        raise BenchError(f"head_dim {head_dim} must be a multiple of 16 for an M-RoPE split")
    return [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]


def common_config(dims: dict) -> tuple[dict, dict, dict]:
    """(text fields, vision fields, token ids) shared by both models."""
    from examples.tiny.tiny_models import IDS
    head_dim = dims["hidden"] // dims["heads"]
    text = dict(vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["inter"],
                num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                num_key_value_heads=dims["kv"], max_position_embeddings=32768, rope_theta=1000000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=dims["tied"], hidden_act="silu", use_sliding_window=False,
                max_window_layers=dims["layers"],
                rope_scaling={"type": "mrope", "mrope_section": mrope_section(head_dim)})
    vision = dict(depth=dims["vision_depth"], hidden_size=dims["vision_hidden"], num_heads=dims["vision_heads"],
                  intermediate_size=dims["vision_inter"], out_hidden_size=dims["hidden"], in_chans=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, tokens_per_second=2,
                  fullatt_block_indexes=[dims["vision_depth"] - 1], hidden_act="silu")
    ids = dict(image_token_id=IDS["<|image_pad|>"], video_token_id=IDS["<|video_pad|>"],
               vision_start_token_id=IDS["<|vision_start|>"], vision_end_token_id=IDS["<|vision_end|>"],
               vision_token_id=IDS["<|vision_pad|>"], bos_token_id=IDS["<|endoftext|>"],
               eos_token_id=IDS["<|im_end|>"])
    return text, vision, ids


def build_checkpoint(kind: str, dims: dict, out: Path, tokenizer_dir: Path, dtype: str) -> Path:
    """A random-weight `stock` Qwen2.5-VL or `merge` Qwen-Merge checkpoint with processor files."""
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VL_MergeConfig,
        Qwen2_5_VL_MergeForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from examples.tiny.tiny_models import MAX_PIXELS, MIN_PIXELS

    text, vision, ids = common_config(dims)
    if kind == "merge":
        text.update(head_dim=dims["hidden"] // dims["heads"], attention_bias=False)
        vision.update(out_hidden_size2=dims["hidden"])
        config_cls, model_cls = Qwen2_5_VL_MergeConfig, Qwen2_5_VL_MergeForConditionalGeneration
    else:
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    config = config_cls(**text, **ids, vision_config=vision, torch_dtype=dtype)
    config.architectures = [model_cls.__name__]
    torch.manual_seed(0)
    model_cls._from_config(config, torch_dtype=getattr(torch, dtype)).save_pretrained(out)
    pixels = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                                    video_processor=Qwen2VLVideoProcessor(**pixels),
                                    tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir))
    processor.save_pretrained(out)
    return out


def build_pair(dims: dict, work: Path, dtype: str, tokenizer_dir: Path | None) -> dict[str, Path]:
    if tokenizer_dir is None:
        from examples.tiny.tiny_models import QWEN3_TEMPLATE, build_tokenizer
        tokenizer_dir = work / "tokenizer"
        if not (tokenizer_dir / "tokenizer.json").exists():
            build_tokenizer(tokenizer_dir, QWEN3_TEMPLATE)
    return {kind: build_checkpoint(kind, dims, work / kind, tokenizer_dir, dtype) for kind in ("merge", "stock")}


# -------------------------------------------------------------------------------------------------- measurement


def prompt_images(n: int, size: int):
    """n distinct deterministic RGB images (no two prompts share a prefix, so no cache can help)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def start_engine(checkpoint: Path, args: argparse.Namespace):
    from vllm import LLM
    return LLM(model=str(checkpoint), dtype=args.dtype, max_model_len=args.max_model_len,
               enforce_eager=args.enforce_eager, max_num_seqs=args.num_prompts, seed=0, enable_prefix_caching=False,
               limit_mm_per_prompt={"image": 1}, tensor_parallel_size=args.tensor_parallel_size,
               gpu_memory_utilization=args.gpu_memory_utilization)


def timed_batch(llm, batch: list[dict], params) -> tuple[float, int]:
    """(generated tokens per second, prompt length) for one batch."""
    t0 = time.perf_counter()
    outputs = llm.generate(batch, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed, len(outputs[0].prompt_token_ids)


def measure(checkpoints: dict[str, Path], args: argparse.Namespace) -> dict:
    """Both engines live side by side; their timed batches alternate, so machine load drifts hit both alike."""
    from vllm import SamplingParams
    engines = {}
    for kind, checkpoint in checkpoints.items():
        t0 = time.perf_counter()
        engines[kind] = start_engine(checkpoint, args)
        print(f"[bench_serve] {kind}: engine up in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    images = iter(prompt_images(args.num_prompts * (args.repeats + 1) * len(engines), args.image_size))
    rates: dict[str, list[float]] = {kind: [] for kind in engines}
    prompt_tokens = {}
    for round_index in range(args.repeats + 1):  # round 0 warms up
        order = list(engines) if round_index % 2 == 0 else list(reversed(engines))
        for kind in order:
            batch = [{"prompt": PROMPT.format(i=i), "multi_modal_data": {"image": next(images)}}
                     for i in range(args.num_prompts)]
            rate, prompt_tokens[kind] = timed_batch(engines[kind], batch, params)
            if round_index:
                rates[kind].append(rate)
    return {"tokens_per_s": rates, "prompt_tokens": prompt_tokens,
            "engine": type(engines["merge"].llm_engine).__module__}


# --------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="toy", help="model dimensions (default: toy)")
    for name in PRESETS["toy"]:
        if name != "tied":
            parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override the preset's {name}")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=4, help="prompts per batch, one image each (default 4)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed rounds: one batch per model each, order alternating; medians count (default 7)")
    parser.add_argument("--image-size", type=int, default=224, help="square image side in pixels (default 224)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                        help="per engine on a GPU, where both share it (default 0.4; ignored on CPU)")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="no CUDA graphs / torch.compile (default on: the CPU build needs it)")
    parser.add_argument("--work", type=Path, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--tokenizer", type=Path, help="a Qwen tokenizer folder (default: built offline)")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args(argv)
    positive = ("num_prompts", "max_tokens", "repeats", "image_size", "max_model_len", "tensor_parallel_size")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.gpu_memory_utilization <= 0.5:
        parser.error("--gpu-memory-utilization must be in (0, 0.5]: two engines share the GPU")
    if args.tokenizer is not None and not (args.tokenizer / "tokenizer_config.json").is_file():
        parser.error(f"--tokenizer {args.tokenizer}: no tokenizer_config.json there")
    return args


def dimensions(args: argparse.Namespace) -> dict:
    dims = dict(PRESETS[args.preset])
    dims.update({k: v for k, v in vars(args).items() if k in dims and v is not None})
    if any(v < 1 for v in dims.values()):
        raise BenchError(f"every dimension must be positive: {dims}")
    if dims["hidden"] % dims["heads"] or dims["heads"] % dims["kv"]:
        raise BenchError(f"hidden {dims['hidden']} must be divisible by heads {dims['heads']}, "
                         f"and heads by kv {dims['kv']}")
    if dims["vision_hidden"] % dims["vision_heads"]:
        raise BenchError(f"vision-hidden {dims['vision_hidden']} must be divisible by "
                         f"vision-heads {dims['vision_heads']}")
    mrope_section(dims["hidden"] // dims["heads"])
    return dims


def run(args: argparse.Namespace) -> dict:
    dims = dimensions(args)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        checkpoints = build_pair(dims, work, args.dtype, args.tokenizer)
        build_s = time.perf_counter() - t0
        measured = measure(checkpoints, args)
    rates = measured["tokens_per_s"]
    median = {kind: statistics.median(values) for kind, values in rates.items()}
    # Each round times the two models back to back, so the per-round ratio cancels slow drifts of machine load.
    ratio = statistics.median(m / s for m, s in zip(rates["merge"], rates["stock"]))
    return {"dims": dims, "dtype": args.dtype, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
            "repeats": args.repeats, "prompt_tokens": measured["prompt_tokens"], "engine": measured["engine"],
            "build_s": round(build_s, 1), "merge_tokens_per_s": round(median["merge"], 2),
            "stock_tokens_per_s": round(median["stock"], 2), "ratio": round(ratio, 4),
            "ratio_of_medians": round(median["merge"] / median["stock"], 4), "goal": GOAL_RATIO,
            "meets_goal": ratio >= GOAL_RATIO,
            "all_tokens_per_s": {kind: [round(r, 2) for r in values] for kind, values in rates.items()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Small CPU engines, and both in this process (V1 without an engine-core process); the caller's values win.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    try:
        result = run(args)
    except BenchError as e:
        print(f"bench_serve: error: {e}", file=sys.stderr)
        return 2
    print(f"Qwen-Merge {result['merge_tokens_per_s']:.1f} tok/s | stock Qwen2.5-VL {result['stock_tokens_per_s']:.1f} "
          f"tok/s | ratio {result['ratio']:.3f} (median per round; of medians {result['ratio_of_medians']:.3f}) "
          f"goal >= {GOAL_RATIO}", file=sys.stderr)
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
