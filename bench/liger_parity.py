#!/usr/bin/env python3
"""Liger parity on a GPU: loss and gradients of Qwen-Merge with and without Liger kernels, same weights, same batch.

The model has the real Qwen-Merge-4B widths (ViT 1280, Qwen3-4B 2560 hidden, 32 x 128 heads, 8 kv heads, 152k vocab)
and fewer layers, so fp32 and bf16 both fit quickly. For each dtype: the stock forward + backward, then
`apply_liger_kernel_to_qwen2_5_vl_merge(model=...)` on the same model and again. Reported: |loss difference|, and per
parameter the relative gradient error ||g_liger - g_stock|| / ||g_stock|| (worst and median) and cosine similarity.
Exit status 1 when a tolerance is missed (fp32: loss 1e-4, grad rel 1e-3; bf16: loss 2e-2, grad rel 5e-2 median,
cosine >= 0.99 for every parameter).

    python bench/liger_parity.py --json bench/results/liger_parity_h200.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.bench_train_gpu import TEXT_4B, VISION, build, liger_kernels, make_batch  # noqa: E402

TOL = {"float32": {"loss": 1e-4, "grad_rel_median": 1e-3, "grad_rel_max": 1e-2, "cos_min": 0.9999},
       "bfloat16": {"loss": 2e-2, "grad_rel_median": 5e-2, "grad_rel_max": 0.2, "cos_min": 0.99}}


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor], object]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(out.loss), grads, out.logits


def compare(dtype_name: str, layers: int, vision_depth: int) -> dict:
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    text = dict(TEXT_4B, num_hidden_layers=layers)
    vision = dict(VISION, depth=vision_depth, fullatt_block_indexes=[vision_depth - 1])
    model = build("merge", text, vision, "sdpa", dtype, "cuda")
    model.model.language_model.layers[0].mlp.gate_proj.weight.data.mul_(3)  # a less uniform activation pattern
    batch, tokens, _, _ = make_batch(model.config, 2, 448, 1500, "cuda", dtype, packed=False)
    loss_ref, grads_ref, logits_ref = loss_and_grads(model, batch)
    with liger_kernels(True, model.config):
        from llamafactory.qwen_merge.liger import apply_liger_kernel_to_qwen2_5_vl_merge
        applied = apply_liger_kernel_to_qwen2_5_vl_merge(model=model)
        kinds = sorted({type(m).__name__ for m in model.model.language_model.modules()
                        if type(m).__name__.startswith("Liger")})
        loss_lig, grads_lig, logits_lig = loss_and_grads(model, batch)
    rel, cos = {}, {}
    for name, g in grads_ref.items():
        d = grads_lig[name]
        rel[name] = float((d - g).norm() / g.norm().clamp_min(1e-30))
        cos[name] = float(torch.nn.functional.cosine_similarity(d.flatten(), g.flatten(), dim=0))
    rels = sorted(rel.values())
    row = {"dtype": dtype_name, "text_layers": layers, "vision_depth": vision_depth, "tokens": tokens,
           "applied": applied, "liger_modules": kinds, "fused_loss_skips_logits": logits_lig is None,
           "loss_stock": loss_ref, "loss_liger": loss_lig, "loss_abs_diff": abs(loss_ref - loss_lig),
           "grad_params": len(rel), "grad_rel_median": rels[len(rels) // 2], "grad_rel_max": rels[-1],
           "grad_rel_max_param": max(rel, key=rel.get), "cos_min": min(cos.values()),
           "cos_min_param": min(cos, key=cos.get), "missing_grads": sorted(set(grads_ref) ^ set(grads_lig))}
    tol = TOL[dtype_name]
    row["pass"] = (row["loss_abs_diff"] <= tol["loss"] and row["grad_rel_median"] <= tol["grad_rel_median"]
                   and row["grad_rel_max"] <= tol["grad_rel_max"] and row["cos_min"] >= tol["cos_min"]
                   and not row["missing_grads"] and row["fused_loss_skips_logits"])
    row["tolerance"] = tol
    del model, grads_ref, grads_lig, logits_ref
    torch.cuda.empty_cache()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4, help="text decoder layers (4B widths)")
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("liger_parity: needs a CUDA GPU (Liger's kernels are Triton GPU kernels)", file=sys.stderr)
        return 2
    rows = [compare(d, args.layers, args.vision_depth) for d in ("float32", "bfloat16")]
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "rows": rows}, indent=1))
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
