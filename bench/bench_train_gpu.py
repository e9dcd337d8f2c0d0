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
import contextlib
import gc
import json
import statistics
import time

import torch

PEAK_FLOPS = 989e12
PAD_ID = 151643  # <|endoftext|>
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


def build_config(kind: str, text: dict, vision: dict):
    from transformers import Qwen2_5_VL_MergeConfig, Qwen2_5_VLConfig

    section = COMMON["rope_scaling"]["mrope_section"]
    if text["head_dim"] != 2 * sum(section):
        half = text["head_dim"] // 2
        section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    common = dict(COMMON, rope_scaling={"type": "mrope", "mrope_section": section})
    if kind == "stock":
        t = {k: v for k, v in text.items() if k != "head_dim"}
        return Qwen2_5_VLConfig(**common, **t, vision_config=dict(vision, out_hidden_size=text["hidden_size"]))
    out = 8192 if vision["hidden_size"] == 1280 else 2 * vision["hidden_size"]
    return Qwen2_5_VL_MergeConfig(**common, **text, attention_bias=False,
                                  vision_config=dict(vision, out_hidden_size=out, out_hidden_size2=text["hidden_size"]))


def build(kind: str, text: dict, vision: dict, attn: str, dtype, device):
    from transformers import Qwen2_5_VL_MergeForConditionalGeneration, Qwen2_5_VLForConditionalGeneration
    cfg = build_config(kind, text, vision)
    cls = Qwen2_5_VLForConditionalGeneration if kind == "stock" else Qwen2_5_VL_MergeForConditionalGeneration
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = attn
    with torch.device(device):
        model = cls(cfg).to(dtype)
    model.config.use_cache = False
    return model.train()


def make_batch(cfg, samples: int, image_side: int, text_tokens, device, dtype, packed: bool):
    """Per sample: one image_side x image_side image and text; identical data for every model. text_tokens is one
    count for all samples or a list (a variable-length batch: padded rows, or one packed row).
    Returns (batch, real tokens, patches, per-sample lengths)."""
    v = cfg.vision_config
    grid = image_side // v.patch_size
    n_patch = grid * grid
    n_img_tok = n_patch // (v.spatial_merge_size ** 2)
    g = torch.Generator().manual_seed(0)
    rows = []
    counts = list(text_tokens) if isinstance(text_tokens, (list, tuple)) else [text_tokens] * samples
    for n_text in counts:
        before = torch.randint(0, 150000, (n_text // 4,), generator=g)
        after = torch.randint(0, 150000, (n_text - n_text // 4,), generator=g)
        rows.append(torch.cat([before, torch.tensor([cfg.vision_start_token_id]),
                               torch.full((n_img_tok,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                               after]))
    pixel = torch.randn(samples * n_patch, 3 * v.temporal_patch_size * v.patch_size ** 2, generator=g)
    thw = torch.tensor([[1, grid, grid]] * samples)
    batch = {"pixel_values": pixel.to(device, dtype), "image_grid_thw": thw.to(device)}
    lengths = [len(r) for r in rows]
    width = max(lengths)
    ids = torch.stack([torch.cat([r, torch.full((width - len(r),), PAD_ID)]) for r in rows])
    real = torch.stack([torch.arange(width) < n for n in lengths])
    labels = ids.masked_fill((ids == cfg.image_token_id) | ~real, -100)
    if not packed:
        batch.update(input_ids=ids.to(device), labels=labels.to(device), attention_mask=real.long().to(device))
        return batch, sum(lengths), samples * n_patch, lengths
    ids, labels = ids[real], labels[real]
    # packed: one row, M-RoPE positions per sample, and the 4-D block-diagonal causal mask LLaMA-Factory's collator
    # builds for neat_packing (its own function)
    from llamafactory.data.collator import prepare_4d_attention_mask
    get_rope_index = _rope_index_fn(cfg)
    positions = [get_rope_index(r[None], thw[i:i + 1])[0] for i, r in enumerate(rows)]
    doc = torch.cat([torch.full((len(r),), i + 1) for i, r in enumerate(rows)])
    batch.update(input_ids=ids.reshape(1, -1).to(device), labels=labels.reshape(1, -1).to(device),
                 position_ids=torch.cat(positions, dim=-1).to(device),
                 attention_mask=prepare_4d_attention_mask(doc[None], dtype).to(device))
    return batch, ids.numel(), samples * n_patch, lengths


def _rope_index_fn(cfg):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    holder = Qwen2_5_VLModel.__new__(Qwen2_5_VLModel)
    holder.config = cfg
    return lambda ids, thw: Qwen2_5_VLModel.get_rope_index(holder, ids, image_grid_thw=thw)


def flops_per_step(cfg, samples: int, lengths: list[int], patches_per_sample: int, vision_frozen=False) -> float:
    """Matmul FLOPs of forward + backward over the real (unpadded) tokens of each sample. A frozen vision tower (as
    in every recipe; its merger still trains) runs forward only: its FLOPs count once."""
    t, v = cfg.text_config, cfg.vision_config
    hd = getattr(t, "head_dim", t.hidden_size // t.num_attention_heads)
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    layer = t.hidden_size * (2 * q + 2 * kv) + 3 * t.hidden_size * t.intermediate_size
    text_fwd = sum(lengths) * 2 * (t.num_hidden_layers * layer + t.vocab_size * t.hidden_size)
    text_fwd += sum(n ** 2 for n in lengths) * t.num_hidden_layers * 4 * q
    h, c = v.hidden_size, 4 * v.hidden_size
    block = 4 * h * h + 3 * h * v.intermediate_size
    merged_tok = patches_per_sample // 4
    out2 = getattr(v, "out_hidden_size2", None)
    merger = c * c + c * v.out_hidden_size + (v.out_hidden_size * out2 if out2 else 0)
    tower_fwd = samples * patches_per_sample * 2 * (v.depth * block + h * 3 * 2 * 14 * 14)
    merger_fwd = samples * merged_tok * 2 * merger
    window = (v.window_size // v.patch_size) ** 2
    full = len(v.fullatt_block_indexes)
    tower_fwd += samples * 4 * h * (full * patches_per_sample ** 2 + (v.depth - full) * patches_per_sample * window)
    return 3 * (text_fwd + merger_fwd) + (1 if vision_frozen else 3) * tower_fwd


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


@contextlib.contextmanager
def liger_kernels(on: bool, model_config=None):
    """Liger patches (overlays/llamafactory/qwen_merge/liger.py) for the models built inside; undone on exit."""
    if not on:
        yield []
        return
    from transformers.models.qwen2_5_vl_merge import modeling_qwen2_5_vl_merge as merge_modeling
    from transformers.models.qwen3 import modeling_qwen3
    from llamafactory.qwen_merge.liger import apply_liger_kernel_to_qwen2_5_vl_merge
    names = ("apply_rotary_pos_emb", "Qwen3RMSNorm", "Qwen3MLP")
    saved = {n: getattr(modeling_qwen3, n) for n in names}
    cls = merge_modeling.Qwen2_5_VL_MergeForConditionalGeneration
    saved_forward = cls.forward
    try:
        yield apply_liger_kernel_to_qwen2_5_vl_merge(config=model_config)
    finally:
        for n, v in saved.items():
            setattr(modeling_qwen3, n, v)
        cls.forward = saved_forward


def run_case(name, kind, text, vision, args, device, dtype, checkpointing=False, packed=False, attn="sdpa",
             upstream_vision=False, samples=None, liger=False, per_document=False, ckpt_fraction=1.0,
             compile_layers=False, lengths=None, vision_frozen=False):
    args = argparse.Namespace(**{**vars(args), "samples": samples or args.samples})
    text_tokens = lengths or args.text_tokens
    if lengths:
        args.samples = len(lengths)
    with liger_kernels(liger, build_config(kind, text, vision)) as applied:
        model = build(kind, text, vision, attn, dtype, device)
        if upstream_vision:  # same weights, the stock masked-SDPA vision attention (apples-to-apples with stock)
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionSdpaAttention
            for block in model.model.visual.blocks:
                block.attn.__class__ = Qwen2_5_VLVisionSdpaAttention
        if per_document:  # what LLaMA-Factory's patch_model does with neat_packing (our overlay)
            from transformers.models.qwen2_5_vl_merge.packed_attention import kernel_name, use_for_packed_rows
            use_for_packed_rows(model)
            print(f"{name}: attention per document via {kernel_name(device)}", flush=True)
        if vision_frozen:  # the recipes' freeze set: vision tower frozen, projector (merger) trained
            model.model.visual.requires_grad_(False)
            model.model.visual.merger.requires_grad_(True)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            layers = model.model.language_model.layers
            keep = round(ckpt_fraction * len(layers))  # checkpoint the first `keep` layers, store the others
            for i, layer in enumerate(layers):
                layer.gradient_checkpointing = i < keep
        if compile_layers:
            for layer in model.model.language_model.layers:
                layer.compile()
        batch, tokens, patches, real_lengths = make_batch(model.config, args.samples, args.image_side, text_tokens,
                                                          device, dtype, packed)
        seconds, mem = time_steps(model, batch, args.warmup, args.repeats, device)
        flops = flops_per_step(model.config, args.samples, real_lengths, patches // args.samples, vision_frozen)
        loss = float(model(**batch).loss) if device == "cuda" else None
    row = {"case": name, "samples": args.samples, "tokens_per_s": round(tokens / seconds), "step_s": round(seconds, 4),
           "mfu": round(flops / seconds / PEAK_FLOPS, 4), "peak_mem_GiB": round(mem, 1),
           "params_B": round(sum(p.numel() for p in model.parameters()) / 1e9, 3), "loss": loss,
           "liger": applied, "lengths": real_lengths}
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
    p.add_argument("--var-lengths", default="7400,2600,1500,900,600,300",
                   help="text tokens per sample of the variable-length batch (var-* cases)")
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
    var = [int(n) for n in args.var_lengths.split(",")] if not args.toy else [30, 12, 50]
    table = {
        "stock": ("stock Qwen2.5-VL (matched dims)", "stock", matched, few),
        "merge-matched-stockvis": ("Qwen-Merge (matched dims, stock vision attention)", "merge", matched,
                                   {**few, "upstream_vision": True}),
        "merge-matched": ("Qwen-Merge (matched dims)", "merge", matched, few),
        "stock-ckpt": ("stock Qwen2.5-VL (matched dims) + grad ckpt", "stock", matched, ckpt),
        "merge-matched-ckpt": ("Qwen-Merge (matched dims) + grad ckpt", "merge", matched, ckpt),
        "merge-4b": ("Qwen-Merge-4B", "merge", text4b, few),
        "merge-4b-ckpt": ("Qwen-Merge-4B + grad ckpt", "merge", text4b, ckpt),
        "merge-4b-packed": ("Qwen-Merge-4B packed, attention per document + grad ckpt", "merge", text4b,
                            {**ckpt, "packed": True, "per_document": True}),
        # levers for MFU at the recipes' settings (gradient checkpointing on)
        "merge-matched-ckpt-liger": ("Qwen-Merge (matched dims) + grad ckpt + Liger", "merge", matched,
                                     {**ckpt, "liger": True}),
        "merge-4b-ckpt-liger": ("Qwen-Merge-4B + grad ckpt + Liger", "merge", text4b, {**ckpt, "liger": True}),
        "merge-4b-ckpt-liger-half": ("Qwen-Merge-4B + Liger + grad ckpt on half the layers", "merge", text4b,
                                     {**ckpt, "liger": True, "ckpt_fraction": 0.5}),
        "merge-4b-ckpt-liger-compile": ("Qwen-Merge-4B + grad ckpt + Liger + compiled layers", "merge", text4b,
                                        {**ckpt, "liger": True, "compile_layers": True}),
        # the recipes' freeze set (vision tower frozen, projector and LLM trained)
        "merge-4b-ckpt-liger-frozenvit": ("Qwen-Merge-4B + grad ckpt + Liger, ViT frozen", "merge", text4b,
                                          {**ckpt, "liger": True, "vision_frozen": True}),
        "var-packed-docs-frozenvit": ("var-length packed, attention per document + grad ckpt + Liger, ViT frozen",
                                      "merge", text4b, {**ckpt, "liger": True, "lengths": var, "packed": True,
                                                        "per_document": True, "vision_frozen": True}),
        "var-packed-docs-frozenvit-half": ("var-length packed, per document + Liger + ViT frozen + grad ckpt on half "
                                           "the layers", "merge", text4b,
                                           {**ckpt, "liger": True, "lengths": var, "packed": True,
                                            "per_document": True, "vision_frozen": True, "ckpt_fraction": 0.5}),
        # a variable-length batch: padded rows against one packed row
        "var-pad": ("var-length padded + grad ckpt + Liger", "merge", text4b, {**ckpt, "liger": True, "lengths": var}),
        "var-packed-mask": ("var-length packed, SDPA with the block mask + grad ckpt + Liger", "merge", text4b,
                            {**ckpt, "liger": True, "lengths": var, "packed": True}),
        "var-packed-docs": ("var-length packed, attention per document + grad ckpt + Liger", "merge", text4b,
                            {**ckpt, "liger": True, "lengths": var, "packed": True, "per_document": True}),
        "var-packed-docs-compile": ("var-length packed, attention per document + grad ckpt + Liger + compiled layers",
                                    "merge", text4b, {**ckpt, "liger": True, "lengths": var, "packed": True,
                                                      "per_document": True, "compile_layers": True}),
        "var-pad-noliger": ("var-length padded + grad ckpt", "merge", text4b, {**ckpt, "lengths": var}),
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
                      ("merge-matched-ckpt", "stock-ckpt"), ("merge-matched-ckpt-liger", "stock-ckpt")):
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
