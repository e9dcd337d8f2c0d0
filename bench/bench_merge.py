#!/usr/bin/env python3
"""Merger benchmark: wall time against `cat` of the same bytes, and peak RSS as the VLM source grows.

Writes synthetic safetensors checkpoints with the real tensor names and shapes (Qwen2.5-VL 7B / 72B, Qwen3 1.7B,
Qwen3-30B-A3B with its 128 experts per layer), then times, side by side in one run:
  * `cat` of the bytes the merger has to move (the LLM shards + the VLM shard holding the vision tower) into a file,
  * merge/model_merger.py (subprocess, peak RSS from wait4),
  * the whole-model approach of the original recipe (from_pretrained of both models, state_dict copy,
    save_pretrained) at a size that fits in memory (`--baseline`).
The VLM's language-model tensors are written as sparse holes: the merger never reads them, and the disk stays free.

    python bench/bench_merge.py --work /tmp/bench-merge             # 7B + 72B VLM sources, Qwen3-1.7B
    python bench/bench_merge.py --work /tmp/bench-merge --preset toy # seconds, for CI
    python bench/bench_merge.py --work /tmp/bench-merge --preset moe --moe-layers 8   # 72B VLM + Qwen3-30B-A3B
                                  # shapes, 8 of its 48 layers (each layer: 128 x 3 expert tensors + router)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESETS = {
    # name: (vision, vlm text, llm)
    "vl7b": (dict(depth=32, hidden=1280, inter=3420, out=3584),
             dict(hidden=3584, layers=28, inter=18944, heads=28, kv=4, vocab=152064, tied=False)),
    "vl72b": (dict(depth=32, hidden=1280, inter=3456, out=8192),
              dict(hidden=8192, layers=80, inter=29568, heads=64, kv=8, vocab=152064, tied=False)),
    "vl3b": (dict(depth=32, hidden=1280, inter=3420, out=2048),
             dict(hidden=2048, layers=36, inter=11008, heads=16, kv=2, vocab=151936, tied=True)),
    "vltoy": (dict(depth=2, hidden=64, inter=128, out=128),
              dict(hidden=128, layers=2, inter=256, heads=1, kv=1, vocab=151936, tied=True)),
}
LLMS = {
    "qwen3-1.7b": dict(hidden=2048, layers=28, inter=6144, heads=16, kv=8, head_dim=128, vocab=151936, tied=True),
    "qwen3-0.6b": dict(hidden=1024, layers=28, inter=3072, heads=16, kv=8, head_dim=128, vocab=151936, tied=True),
    "qwen3-toy": dict(hidden=192, layers=2, inter=384, heads=4, kv=2, head_dim=128, vocab=151936, tied=True),
    # Qwen3-30B-A3B (Qwen3MoeForCausalLM): every layer sparse, 128 experts of width 768, 8 routed per token
    "qwen3-30b-a3b": dict(hidden=2048, layers=48, inter=6144, heads=32, kv=4, head_dim=128, vocab=151936,
                          tied=False, experts=128, moe_inter=768, top_k=8),
    "qwen3-moe-toy": dict(hidden=192, layers=2, inter=384, heads=4, kv=2, head_dim=128, vocab=151936, tied=True,
                          experts=4, moe_inter=64, top_k=2),
}


def vision_tensors(v: dict) -> list[tuple[str, list[int], bool]]:
    h, i, c = v["hidden"], v["inter"], v["hidden"] * 4
    out = [("visual.patch_embed.proj.weight", [h, 3, 2, 14, 14], True)]
    for b in range(v["depth"]):
        p = f"visual.blocks.{b}."
        out += [(p + "norm1.weight", [h], True), (p + "norm2.weight", [h], True),
                (p + "attn.qkv.weight", [3 * h, h], True), (p + "attn.qkv.bias", [3 * h], True),
                (p + "attn.proj.weight", [h, h], True), (p + "attn.proj.bias", [h], True)]
        for name, shape in (("gate_proj", [i, h]), ("up_proj", [i, h]), ("down_proj", [h, i])):
            out += [(p + f"mlp.{name}.weight", shape, True), (p + f"mlp.{name}.bias", [shape[0]], True)]
    out += [("visual.merger.ln_q.weight", [h], True), ("visual.merger.mlp.0.weight", [c, c], True),
            ("visual.merger.mlp.0.bias", [c], True), ("visual.merger.mlp.2.weight", [v["out"], c], True),
            ("visual.merger.mlp.2.bias", [v["out"]], True)]
    return out


def decoder_tensors(t: dict, qwen3: bool, data: bool) -> list[tuple[str, list[int], bool]]:
    h, head_dim = t["hidden"], t.get("head_dim", t["hidden"] // t["heads"])
    q, kv = t["heads"] * head_dim, t["kv"] * head_dim
    out = [("model.embed_tokens.weight", [t["vocab"], h], data)]
    for n in range(t["layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", [h], data), (p + "post_attention_layernorm.weight", [h], data),
                (p + "self_attn.q_proj.weight", [q, h], data), (p + "self_attn.k_proj.weight", [kv, h], data),
                (p + "self_attn.v_proj.weight", [kv, h], data), (p + "self_attn.o_proj.weight", [h, q], data)]
        if t.get("experts"):  # Qwen3-MoE sparse layer: router + each expert's MLP
            m = t["moe_inter"]
            out.append((p + "mlp.gate.weight", [t["experts"], h], data))
            for e in range(t["experts"]):
                out += [(p + f"mlp.experts.{e}.gate_proj.weight", [m, h], data),
                        (p + f"mlp.experts.{e}.up_proj.weight", [m, h], data),
                        (p + f"mlp.experts.{e}.down_proj.weight", [h, m], data)]
        else:
            out += [(p + "mlp.gate_proj.weight", [t["inter"], h], data),
                    (p + "mlp.up_proj.weight", [t["inter"], h], data), (p + "mlp.down_proj.weight", [h, t["inter"]], data)]
        if qwen3:
            out += [(p + "self_attn.q_norm.weight", [head_dim], data), (p + "self_attn.k_norm.weight", [head_dim], data)]
        else:
            out += [(p + "self_attn.q_proj.bias", [q], data), (p + "self_attn.k_proj.bias", [kv], data),
                    (p + "self_attn.v_proj.bias", [kv], data)]
    out.append(("model.norm.weight", [h], data))
    if not t["tied"]:
        out.append(("lm_head.weight", [t["vocab"], h], data))
    return out


def write_checkpoint(root: Path, config: dict, tensors: list, shard_bytes: int, sparse_ok: bool,
                     fill: Callable[[str, list, int], bytes] | None = None) -> int:
    """bf16 safetensors shards; tensors flagged False are left as sparse holes when `sparse_ok`. Each written tensor
    gets `fill(name, shape, nbytes)`, or random bytes by default. Returns bytes of real data."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=1))
    block = os.urandom(1 << 24)
    shards, cur, size = [], [], 0
    for t in tensors:
        n = 2
        for d in t[1]:
            n *= d
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((*t, n))
        size += n
    shards.append(cur)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, real = {}, 0
    for fname, shard in zip(names, shards):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _, n in shard:
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(root / f"{fname}.tmp", "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            start = f.tell()
            for name, shape, data, n in shard:
                if data or not sparse_ok:
                    f.seek(start + header[name]["data_offsets"][0])
                    if fill:
                        f.write(fill(name, shape, n))
                    else:
                        left = n
                        while left:
                            chunk = block[:min(left, len(block))]
                            f.write(chunk)
                            left -= len(chunk)
                    real += n
            f.truncate(start + off)
        os.replace(root / f"{fname}.tmp", root / fname)
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return real


def vlm_config(v: dict, t: dict) -> dict:
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "hidden_size": t["hidden"], "intermediate_size": t["inter"], "num_hidden_layers": t["layers"],
            "num_attention_heads": t["heads"], "num_key_value_heads": t["kv"], "vocab_size": t["vocab"],
            "tie_word_embeddings": t["tied"], "rms_norm_eps": 1e-6, "rope_theta": 1e6, "hidden_act": "silu",
            "max_position_embeddings": 128000, "torch_dtype": "bfloat16", "use_sliding_window": False,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "image_token_id": 151655,
            "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
            "vision_token_id": 151654,
            "vision_config": {"depth": v["depth"], "hidden_size": v["hidden"], "intermediate_size": v["inter"],
                              "num_heads": 16, "out_hidden_size": v["out"], "hidden_act": "silu", "patch_size": 14,
                              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                              "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "in_chans": 3}}


def llm_config(t: dict) -> dict:
    if t.get("experts"):
        return {**llm_config({k: v for k, v in t.items() if k != "experts"}),
                "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": t["experts"],
                "num_experts_per_tok": t["top_k"], "moe_intermediate_size": t["moe_inter"], "decoder_sparse_step": 1,
                "mlp_only_layers": [], "norm_topk_prob": True, "router_aux_loss_coef": 0.001}
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": t["hidden"],
            "intermediate_size": t["inter"], "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"],
            "num_key_value_heads": t["kv"], "head_dim": t["head_dim"], "vocab_size": t["vocab"],
            "tie_word_embeddings": t["tied"], "rms_norm_eps": 1e-6, "rope_theta": 1e6, "hidden_act": "silu",
            "max_position_embeddings": 40960, "torch_dtype": "bfloat16", "attention_bias": False,
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": t["layers"]}


def add_tokenizer_and_processor(vlm: Path, llm: Path) -> None:
    """Minimal processor/tokenizer files from the test fixtures (the merger copies them)."""
    sys.path.insert(0, str(REPO))
    from examples.tiny import tiny_models
    tok = Path(tempfile.mkdtemp()) / "tok"
    tiny_models.build_tokenizer(tok, tiny_models.QWEN3_TEMPLATE)
    for f in tok.iterdir():
        shutil.copy2(f, llm / f.name)
    (vlm / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "Qwen2_5_VLProcessor"}))


def run_measured(cmd: list[str], env=None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB of the child, output)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 2**20, out


def moved_files(work: Path, vlm: Path, llm: Path) -> list[Path]:
    """The LLM shards plus a file holding exactly the VLM's vision-tensor bytes: what the merger must move."""
    sys.path.insert(0, str(REPO))
    from merge.model_merger import read_safetensors_header
    index = json.loads((vlm / "model.safetensors.index.json").read_text())["weight_map"]
    vision = work / f"vision-bytes-{vlm.name}.bin"
    if not vision.exists():
        with open(vision, "wb") as out:
            for shard in sorted({vlm / s for k, s in index.items() if k.startswith("visual.")}):
                header, start = read_safetensors_header(shard)
                with open(shard, "rb") as f:
                    for name, entry in header.items():
                        if name.startswith("visual."):
                            f.seek(start + entry["data_offsets"][0])
                            out.write(f.read(entry["data_offsets"][1] - entry["data_offsets"][0]))
    return [vision] + sorted(llm.glob("*.safetensors"))


def bench_pair(work: Path, vlm: Path, llm: Path, label: str) -> dict:
    files = moved_files(work, vlm, llm)
    cat = lambda: run_measured(["bash", "-c", f"cat {' '.join(map(str, files))} > {work / 'cat.out'}"])  # noqa
    cat()  # warm the page cache for both contenders
    cat_s = min(cat()[0] for _ in range(2))
    (work / "cat.out").unlink()  # disk: never the copy and a merged output at once
    out = work / f"merged-{label.split()[0]}"

    def merge_once():
        shutil.rmtree(out, ignore_errors=True)  # each run writes a fresh output (no --overwrite double copy)
        return run_measured([sys.executable, str(REPO / "merge/model_merger.py"), "--vlm-path", str(vlm),
                             "--llm-path", str(llm), "--output-path", str(out), "--quiet"])
    merge_runs = [merge_once() for _ in range(2)]
    merge_s, rss = min(r[0] for r in merge_runs), max(r[1] for r in merge_runs)
    moved = sum(f.stat().st_size for f in files)
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    from merge.model_merger import read_safetensors_header
    tensors = sum(len(read_safetensors_header(f)[0]) for f in out.glob("*.safetensors"))
    shutil.rmtree(out)
    return {"case": label, "tensors": tensors, "cat_bytes_GB": round(moved / 1e9, 2),
            "written_GB": round(written / 1e9, 2),
            "cat_s": round(cat_s, 2), "merge_s": round(merge_s, 2), "merge_over_cat": round(merge_s / cat_s, 2),
            "merge_peak_rss_GB": round(rss, 2)}


ORIGINAL_STYLE = """
import sys, torch
from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration
vlm_path, llm_path, out = sys.argv[1:4]
vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(vlm_path, torch_dtype=torch.bfloat16)
llm = AutoModelForCausalLM.from_pretrained(llm_path, torch_dtype=torch.bfloat16)
state = {k.replace("model.visual.", "visual."): v.clone() for k, v in vlm.state_dict().items() if "visual" in k}
state.update({k: v.clone() for k, v in llm.state_dict().items() if k != "lm_head.weight"})
w = vlm.config.vision_config.out_hidden_size
state["visual.merger.mlp.4.weight"] = torch.randn(llm.config.hidden_size, w).to(torch.bfloat16) * 0.02
state["visual.merger.mlp.4.bias"] = torch.zeros(llm.config.hidden_size, dtype=torch.bfloat16)
vlm.save_pretrained(out, state_dict=state, safe_serialization=True, max_shard_size="5GB")
"""


def bench_baseline(work: Path, vlm: Path, llm: Path) -> dict:
    script = work / "original_style.py"
    script.write_text(ORIGINAL_STYLE)
    out = work / "merged-original-style"
    wall, rss, _ = run_measured([sys.executable, str(script), str(vlm), str(llm), str(out)],
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    shutil.rmtree(out, ignore_errors=True)
    ours = work / "merged-ours"
    ours_wall, ours_rss, _ = run_measured([sys.executable, str(REPO / "merge/model_merger.py"), "--vlm-path",
                                           str(vlm), "--llm-path", str(llm), "--output-path", str(ours),
                                           "--overwrite", "--quiet"])
    shutil.rmtree(ours)
    return {"case": f"{vlm.name} + {llm.name}", "whole_model_s": round(wall, 2), "whole_model_rss_GB": round(rss, 2),
            "streaming_s": round(ours_wall, 2), "streaming_rss_GB": round(ours_rss, 2),
            "speedup": round(wall / ours_wall, 2), "rss_ratio": round(rss / ours_rss, 1)}


def make_sources(work: Path, vlm_preset: str, llm_name: str, vlm_llm_sparse: bool = True,
                 llm_layers: int | None = None) -> tuple[Path, Path]:
    """Synthetic VLM and LLM checkpoints under `work` (reused when present); `llm_layers` keeps only that many of the
    LLM's layers (same tensor shapes, fewer of them)."""
    vision, text = PRESETS[vlm_preset]
    t = {**LLMS[llm_name], **({"layers": llm_layers} if llm_layers else {})}
    vlm, llm = work / f"src-{vlm_preset}", work / f"src-{llm_name}-{t['layers']}l"
    if not (vlm / "config.json").exists():
        write_checkpoint(vlm, vlm_config(vision, text),
                         vision_tensors(vision) + decoder_tensors(text, qwen3=False, data=not vlm_llm_sparse),
                         5 * 10**9, sparse_ok=vlm_llm_sparse)
    if not (llm / "config.json").exists():
        write_checkpoint(llm, llm_config(t), decoder_tensors(t, qwen3=True, data=True), 5 * 10**9, sparse_ok=False)
        add_tokenizer_and_processor(vlm, llm)
    elif not (vlm / "preprocessor_config.json").exists():
        add_tokenizer_and_processor(vlm, llm)
    return vlm, llm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "qwen-merge-bench-merge")
    p.add_argument("--preset", choices=["full", "toy", "moe", "moe-toy"], default="full",
                   help="full: 7B and 72B VLM + Qwen3-1.7B; moe: 72B VLM + Qwen3-30B-A3B shapes; toy / moe-toy: "
                        "seconds-long versions")
    p.add_argument("--moe-layers", type=int, default=8,
                   help="layers of the Qwen3-30B-A3B source for --preset moe (48 = all, 62 GB; each layer 1.25 GB)")
    p.add_argument("--baseline", action="store_true", help="also run the whole-model (original-style) baseline")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows, base = [], None
    cases = {"toy": [("vltoy", "qwen3-toy", None)], "moe-toy": [("vltoy", "qwen3-moe-toy", None)],
             "moe": [("vl72b", "qwen3-30b-a3b", args.moe_layers)],
             "full": [("vl7b", "qwen3-1.7b", None), ("vl72b", "qwen3-1.7b", None)]}[args.preset]
    for vlm_preset, llm_name, layers in cases:
        vlm, llm = make_sources(args.work, vlm_preset, llm_name, llm_layers=layers)
        label = f"{vlm_preset}+{llm_name}" + (f" ({layers} of {LLMS[llm_name]['layers']} layers)" if layers else "")
        rows.append(bench_pair(args.work, vlm, llm, label))
        print(json.dumps(rows[-1]), flush=True)
    if args.baseline:
        pair = ("vltoy", "qwen3-toy") if args.preset == "toy" else ("vl3b", "qwen3-0.6b")
        vlm, llm = make_sources(args.work, *pair, vlm_llm_sparse=False)
        base = bench_baseline(args.work, vlm, llm)
        print(json.dumps(base), flush=True)
    print("\n| case | tensors | bytes moved (GB) | cat (s) | merge (s) | merge / cat | merge peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['tensors']} | {r['cat_bytes_GB']} | {r['cat_s']} | {r['merge_s']} | "
              f"{r['merge_over_cat']} | {r['merge_peak_rss_GB']} |")
    if base:
        print(f"\nwhole-model baseline ({base['case']}): {base['whole_model_s']} s, {base['whole_model_rss_GB']} GB "
              f"peak RSS vs streaming {base['streaming_s']} s, {base['streaming_rss_GB']} GB "
              f"({base['speedup']}x faster, {base['rss_ratio']}x less memory)")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
