#!/usr/bin/env python3
"""Training-step throughput of Qwen-Merge against the stock Qwen2.5-VL code path, and Qwen-Merge's MFU.

Random weights, bf16, forward + backward (no optimizer step), identical synthetic batches (images + text), warm-up
then CUDA-event timing over several repeats, all models in one run:
  * stock   - Qwen2_5_VLForConditionalGeneration, vision tower as Qwen-Merge's, text dims matched
              (hidden 2560, 36 layers, 20 heads x 128, 4 kv heads, MLP 9728) with its merger mapping to 2560;
  * merge-matched - Qwen-Merge with exactly those text dims (the extra GELU + Linear of the merger, Qwen3 q/k norm);
  * merge-4b - Qwen-Merge at the real 4B shapes (ViT 32 x 1280, merger 5120 -> 8192 -> 2560, Qwen3-4B 36 x 2560,
              32 heads x 128, 8 kv heads), also with gradient checkpointing and with packed sequences.
MFU counts the matmul FLOPs of both towers (attention not halved for causality; windows counted per window) against
989 TFLOP/s dense bf16.

    python bench/bench_train_gpu.py                      # on a GPU
    python bench/bench_train_gpu.py --toy                # tiny shapes on CPU (CI keeps it working)
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

PEAK_FLOPS = 989e12
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3456, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
              hidden_act="silu", in_chans=3)
TEXT_4B = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=9728)
TEXT_MATCHED = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=20, num_key_value_heads=4,
                    head_dim=128, intermediate_size=9728)
COMMON = dict(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960, hidden_act="silu",
              tie_word_embeddings=True, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
              image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
              vision_end_token_id=151653, use_sliding_window=False, initializer_range=0.02)
TOY_VISION = dict(VISION, depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1])
TOY_TEXT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                intermediate_size=256)


def build(kind: str, text: dict, vision: dict, attn: str, dtype, device):
    from transformers import Qwen2_5_VL_MergeConfig, Qwen2_5_VL_MergeForConditionalGeneration
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    section = COMMON["rope_scaling"]["mrope_section"]
    if text["head_dim"] != 2 * sum(section):
        half = text["head_dim"] // 2
        section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    common = dict(COMMON, rope_scaling={"type": "mrope", "mrope_section": section})
    if kind == "stock":
        t = {k: v for k, v in text.items() if k != "head_dim"}
        cfg = Qwen2_5_VLConfig(**common, **t, vision_config=dict(vision, out_hidden_size=text["hidden_size"]))
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        out = 8192 if vision["hidden_size"] == 1280 else 2 * vision["hidden_size"]
        cfg = Qwen2_5_VL_MergeConfig(**common, **text, attention_bias=False,
                                     vision_config=dict(vision, out_hidden_size=out,
                                                        out_hidden_size2=text["hidden_size"]))
        cls = Qwen2_5_VL_MergeForConditionalGeneration
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = attn
    with torch.device(device):
        model = cls(cfg).to(dtype)
    model.config.use_cache = False
    return model.train()


def make_batch(cfg, samples: int, image_side: int, text_tokens: int, device, dtype, packed: bool):
    """Per sample: one image_side x image_side image and text; identical data for every model."""
    v = cfg.vision_config
    grid = image_side // v.patch_size
    n_patch = grid * grid
    n_img_tok = n_patch // (v.spatial_merge_size ** 2)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(samples):
        before = torch.randint(0, 150000, (text_tokens // 4,), generator=g)
        after = torch.randint(0, 150000, (text_tokens - text_tokens // 4,), generator=g)
        rows.append(torch.cat([before, torch.tensor([cfg.vision_start_token_id]),
                               torch.full((n_img_tok,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                               after]))
    pixel = torch.randn(samples * n_patch, 3 * v.temporal_patch_size * v.patch_size ** 2, generator=g)
    thw = torch.tensor([[1, grid, grid]] * samples)
    batch = {"pixel_values": pixel.to(device, dtype), "image_grid_thw": thw.to(device)}
    ids = torch.stack(rows)
    labels = ids.masked_fill(ids == cfg.image_token_id, -100)
    if not packed:
        batch.update(input_ids=ids.to(device), labels=labels.to(device),
                     attention_mask=torch.ones_like(ids).to(device))
        return batch, ids.numel(), samples * n_patch
    # packed: one row, M-RoPE positions per sample; on GPU document ids drive flex attention, elsewhere an explicit
    # block-diagonal causal mask
    get_rope_index = _rope_index_fn(cfg)
    positions = [get_rope_index(r[None], thw[i:i + 1])[0] for i, r in enumerate(rows)]
    doc = torch.cat([torch.full((len(r),), i + 1) for i, r in enumerate(rows)])
    if device == "cuda":
        mask = doc[None]
    else:
        allowed = (doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
        mask = torch.zeros(1, 1, len(doc), len(doc), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    batch.update(input_ids=ids.reshape(1, -1).to(device), labels=labels.reshape(1, -1).to(device),
                 position_ids=torch.cat(positions, dim=-1).to(device), attention_mask=mask.to(device))
    return batch, ids.numel(), samples * n_patch


def _rope_index_fn(cfg):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    holder = Qwen2_5_VLModel.__new__(Qwen2_5_VLModel)
    holder.config = cfg
    return lambda ids, thw: Qwen2_5_VLModel.get_rope_index(holder, ids, image_grid_thw=thw)


def flops_per_step(cfg, samples: int, tokens_per_sample: int, patches_per_sample: int) -> float:
    t, v = cfg.text_config, cfg.vision_config
    hd = getattr(t, "head_dim", t.hidden_size // t.num_attention_heads)
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    layer = t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size
    text_fwd = samples * tokens_per_sample * 2 * (t.num_hidden_layers * layer + t.vocab_size * t.hidden_size)
    text_fwd += samples * t.num_hidden_layers * 4 * tokens_per_sample ** 2 * q
    h, c = v.hidden_size, 4 * v.hidden_size
    block = 4 * h * h + 3 * h * v.intermediate_size
    merged_tok = patches_per_sample // 4
    out2 = getattr(v, "out_hidden_size2", None)
    merger = c * c + c * v.out_hidden_size + (v.out_hidden_size * out2 if out2 else 0)
    vis_fwd = samples * (patches_per_sample * 2 * (v.depth * block + h * 3 * 2 * 14 * 14) + merged_tok * 2 * merger)
    window = (v.window_size // v.patch_size) ** 2
    full = len(v.fullatt_block_indexes)
    vis_fwd += samples * 4 * h * (full * patches_per_sample ** 2 + (v.depth - full) * patches_per_sample * window)
    return 3 * (text_fwd + vis_fwd)


def time_steps(model, batch, warmup: int, repeats: int, device) -> tuple[float, float]:
    """(median seconds per forward+backward, peak memory GiB)."""
    def step():
        loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), 0.0


def run_case(name, kind, text, vision, args, device, dtype, checkpointing=False, packed=False, attn="sdpa",
             upstream_vision=False, samples=None):
    args = argparse.Namespace(**{**vars(args), "samples": samples or args.samples})
    model = build(kind, text, vision, attn, dtype, device)
    if upstream_vision:  # same weights, the stock masked-SDPA vision attention (apples-to-apples with stock)
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionSdpaAttention
        for block in model.model.visual.blocks:
            block.attn.__class__ = Qwen2_5_VLVisionSdpaAttention
    if packed and device == "cuda":
        model.config.text_config._attn_implementation = "flex_attention"
        model.model.language_model.config._attn_implementation = "flex_attention"
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch, tokens, patches = make_batch(model.config, args.samples, args.image_side, args.text_tokens, device, dtype,
                                        packed)
    seconds, mem = time_steps(model, batch, args.warmup, args.repeats, device)
    flops = flops_per_step(model.config, args.samples, tokens // args.samples, patches // args.samples)
    row = {"case": name, "samples": args.samples, "tokens_per_s": round(tokens / seconds), "step_s": round(seconds, 4),
           "mfu": round(flops / seconds / PEAK_FLOPS, 4), "peak_mem_GiB": round(mem, 1),
           "params_B": round(sum(p.numel() for p in model.parameters()) / 1e9, 3)}
    del model, batch
    if device == "cuda":
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def profile_step(args, vision, text, device, dtype) -> None:
    """Top operators of one Qwen-Merge-4B forward+backward (half batch, no checkpointing)."""
    from torch.profiler import ProfilerActivity, profile
    model = build("merge", text, vision, "sdpa", dtype, device)
    batch, _, _ = make_batch(model.config, max(1, args.samples // 2), args.image_side, args.text_tokens, device,
                             dtype, packed=False)
    for _ in range(2):
        model(**batch).loss.backward()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        model(**batch).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    with open(args.profile, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=30))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", action="store_true", help="tiny shapes, float32, CPU allowed")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--image-side", type=int, default=448, help="pixels; 448 -> 1024 patches -> 256 image tokens")
    p.add_argument("--text-tokens", type=int, default=1790, help="text tokens per sample (+2 vision markers)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--cases", default="stock,merge-matched-stockvis,merge-matched,merge-4b,merge-4b-ckpt,"
                                      "merge-4b-packed")
    p.add_argument("--profile", help="write a torch profiler table of one merge-4b step to this file")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.toy:
        args.samples, args.image_side, args.text_tokens, args.warmup, args.repeats = 2, 112, 30, 1, 1
        vision, text4b, matched, dtype = TOY_VISION, TOY_TEXT, TOY_TEXT, torch.float32
    else:
        vision, text4b, matched, dtype = VISION, TEXT_4B, TEXT_MATCHED, torch.bfloat16
    few = {"samples": max(1, args.samples // 2)}  # without checkpointing, half the batch fits in 80 GB
    ckpt = {"checkpointing": True}
    table = {
        "stock": ("stock Qwen2.5-VL (matched dims)", "stock", matched, few),
        "merge-matched-stockvis": ("Qwen-Merge (matched dims, stock vision attention)", "merge", matched,
                                   {**few, "upstream_vision": True}),
        "merge-matched": ("Qwen-Merge (matched dims)", "merge", matched, few),
        "stock-ckpt": ("stock Qwen2.5-VL (matched dims) + grad ckpt", "stock", matched, ckpt),
        "merge-matched-ckpt": ("Qwen-Merge (matched dims) + grad ckpt", "merge", matched, ckpt),
        "merge-4b": ("Qwen-Merge-4B", "merge", text4b, few),
        "merge-4b-ckpt": ("Qwen-Merge-4B + grad ckpt", "merge", text4b, ckpt),
        "merge-4b-packed": ("Qwen-Merge-4B packed (flex) + grad ckpt", "merge", text4b, {**ckpt, "packed": True}),
    }
    rows = {}
    for key in args.cases.split(","):
        name, kind, text, extra = table[key]
        try:
            rows[key] = run_case(name, kind, text, vision, args, device, dtype, **extra)
        except Exception as e:  # report and go on with the other cases
            print(json.dumps({"case": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    for key, base in (("merge-matched-stockvis", "stock"), ("merge-matched", "stock"),
                      ("merge-matched-ckpt", "stock-ckpt")):
        if base in rows and key in rows:
            ratio = rows[key]["tokens_per_s"] / rows[base]["tokens_per_s"]
            print(f"\n{rows[key]['case']} / {rows[base]['case']} tokens/s: {ratio:.3f}")
    print(f"\nbatch: {args.samples} samples x ({args.text_tokens + 2} text + {(args.image_side // 28) ** 2} image "
          f"tokens), device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| case | samples | tokens/s | step (s) | MFU | peak mem (GiB) |\n|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['case']} | {r['samples']} | {r['tokens_per_s']} | {r['step_s']} | {r['mfu']:.1%} | "
              f"{r['peak_mem_GiB']} |")
    if args.profile:
        profile_step(args, vision, text4b, device, dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(list(rows.values()), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
