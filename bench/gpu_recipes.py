#!/usr/bin/env python3
"""The real 4B recipes under `llamafactory-cli train` on a GPU, with random weights of the real shapes.

Steps (each one a sub-command, so a GPU session can run them in one go):
  sources  random Qwen2.5-VL-7B (vision tower as data, its LLM as sparse holes the merger never reads) and
           Qwen3-4B (all data) safetensors checkpoints: normal(0, 0.02) matrices, unit norms, zero biases
  merge    merge/model_merger.py on them -> a Qwen-Merge-VL-4B-base with the real shapes
  data     sharegpt parquet datasets under the recipes' names (LLaVA_ReCap_558K, text2image, image_thinking):
           JPEG images of varied sizes, realistic caption / reasoning lengths, one sample near cutoff_len
  train    `llamafactory-cli train RECIPE` overriding only model path, data dir, steps and output; samples GPU
           memory with nvidia-smi and writes a JSON summary (loss per step, step times, tokens/s, peak memory)

    python bench/gpu_recipes.py sources --work /tmp/qm && python bench/gpu_recipes.py merge --work /tmp/qm
    python bench/gpu_recipes.py data --work /tmp/qm --model /tmp/qm/Qwen-Merge-VL-4B-base
    python bench/gpu_recipes.py train --work /tmp/qm --recipe examples/qwen_merge_4b/stage1.yaml --steps 5 \\
        --json bench/results/gpu_recipe_4b_stage1.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.bench_merge import (PRESETS, add_tokenizer_and_processor, decoder_tensors, llm_config,  # noqa: E402
                               vision_tensors, vlm_config, write_checkpoint)

QWEN3_4B = dict(hidden=2560, layers=36, inter=9728, heads=32, kv=8, head_dim=128, vocab=151936, tied=True)
QWEN3_8B = dict(hidden=4096, layers=36, inter=12288, heads=32, kv=8, head_dim=128, vocab=151936, tied=False)
LLMS = {"4b": QWEN3_4B, "8b": QWEN3_8B}
WORDS = ("the a of image shows small large red blue green left right top bottom person people car tree sky water "
         "building window text sign road table cup plate dog cat white black light dark near far behind front "
         "holding wearing standing sitting several two three many colourful bright scene background detail "
         "therefore because first then so answer step consider check value total each").split()


def write_random_checkpoint(root: Path, config: dict, tensors: list, shard_bytes: int = 4 * 10**9) -> None:
    """bf16 safetensors shards: normal(0, 0.02) matrices, ones for norm weights, zeros for biases; tensors flagged
    False are sparse holes (the merger never reads them)."""
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)

    def values(name: str, shape: list, nbytes: int) -> bytes:
        if name.endswith("norm.weight") or ".norm" in name or "layernorm" in name or "ln_q" in name:
            t = torch.ones(shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
        return t.view(torch.uint8).numpy().tobytes()

    write_checkpoint(root, config, tensors, shard_bytes, sparse_ok=True, fill=values)


def cmd_sources(args) -> None:
    vision, vlm_text = PRESETS["vl7b"]
    vlm, llm = args.work / "src-qwen2.5-vl-7b", args.work / f"src-qwen3-{args.size}"
    t0 = time.time()
    if not (vlm / "config.json").exists():
        write_random_checkpoint(vlm, vlm_config(vision, vlm_text),
                                vision_tensors(vision) + decoder_tensors(vlm_text, qwen3=False, data=False))
    if not (llm / "config.json").exists():
        t = LLMS[args.size]
        write_random_checkpoint(llm, llm_config(t), decoder_tensors(t, qwen3=True, data=True))
        add_tokenizer_and_processor(vlm, llm)
    print(json.dumps({"step": "sources", "seconds": round(time.time() - t0, 1)}), flush=True)


def cmd_merge(args) -> None:
    out = args.work / f"Qwen-Merge-VL-{args.size.upper()}-base"
    t0 = time.time()
    subprocess.run([sys.executable, str(REPO / "merge/model_merger.py"), "--vlm-path",
                    str(args.work / "src-qwen2.5-vl-7b"), "--llm-path", str(args.work / f"src-qwen3-{args.size}"),
                    "--output-path", str(out), "--overwrite"], check=True)
    print(json.dumps({"step": "merge", "seconds": round(time.time() - t0, 1), "output": str(out)}), flush=True)


def _image_bytes(rng: random.Random, width: int, height: int) -> bytes:
    from PIL import Image
    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    noise = Image.effect_noise((width, height), 40).convert("RGB")
    img = Image.blend(img, noise, 0.5)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _write(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"messages": [r["messages"] for r in rows], "images": [r["images"] for r in rows]}),
                   str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


SIZES = [(448, 448), (640, 480), (800, 600), (1024, 768), (1280, 960), (336, 336), (1600, 1200)]


def cmd_data(args) -> None:
    """Stage 1: captions of 60-400 words, stage 3: reasoning answers of 300-2500 words; one long sample each."""
    rng = random.Random(0)
    data = args.work / "data"

    def row(prompt_words, answer_words, size):
        return {"messages": [{"role": "user", "content": "<image>" + _text(rng, prompt_words)},
                             {"role": "assistant", "content": _text(rng, answer_words)}],
                "images": [{"bytes": _image_bytes(rng, *size), "path": None}]}

    stage1 = [row(rng.randint(5, 15), rng.randint(60, 400), rng.choice(SIZES)) for _ in range(args.stage1_rows)]
    stage1[3] = row(10, args.long_words, (1280, 960))  # ~1280 image tokens + text: near cutoff_len 8192
    _write(data / "LLaVA_ReCap_558K" / "part-00000.parquet", stage1)
    stage3 = [row(rng.randint(20, 120), rng.randint(300, 2500), rng.choice(SIZES)) for _ in range(args.stage3_rows)]
    stage3[2] = row(40, args.long_words, (1280, 960))
    half = len(stage3) // 2
    _write(data / "text2image.parquet", stage3[:half])
    _write(data / "image_thinking.parquet", stage3[half:])
    info = json.loads((REPO / "examples/dataset_info.json").read_text())
    (data / "dataset_info.json").write_text(json.dumps(
        {k: info[k] for k in ("LLaVA_ReCap_558K", "text2image", "image_thinking")}, indent=1))
    if args.model:  # token counts with the model's own processor (the template adds a few tokens on top)
        from transformers import AutoProcessor
        from PIL import Image
        proc = AutoProcessor.from_pretrained(args.model)
        counts = {}
        for name, rows in (("stage1", stage1), ("stage3", stage3)):
            lens = []
            for r in rows:
                text = "<|vision_start|><|image_pad|><|vision_end|>" + r["messages"][0]["content"][7:] + \
                       r["messages"][1]["content"]
                img = Image.open(io.BytesIO(r["images"][0]["bytes"]))
                lens.append(len(proc(text=[text], images=[img], min_pixels=200704, max_pixels=1003520)
                                .input_ids[0]) + 8)
            counts[name] = lens
        (data / "token_counts.json").write_text(json.dumps(counts))
        for name, lens in counts.items():
            print(json.dumps({"step": "data", "set": name, "rows": len(lens), "tokens": sum(lens),
                              "max": max(lens), "mean": round(sum(lens) / len(lens))}), flush=True)


class GpuMemorySampler(threading.Thread):
    """Peak `memory.used` of GPU 0 as nvidia-smi reports it (allocator cache and CUDA context included)."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period, self.peak_mib, self.stop = period, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                self.peak_mib = max(self.peak_mib, int(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self.stop.wait(self.period)


def _seconds(hms: str) -> int:
    h, m, s = (int(x) for x in hms.split(":"))
    return 3600 * h + 60 * m + s


def cmd_train(args) -> int:
    import yaml
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    name = Path(args.recipe).stem
    out = args.work / f"out-{Path(args.recipe).parent.name}-{name}{args.tag}"
    overrides = [f"model_name_or_path={args.model}", f"dataset_dir={args.work / 'data'}",
                 f"max_steps={args.steps}", f"output_dir={out}", "overwrite_cache=true"] + args.extra
    cmd = ["llamafactory-cli", "train", args.recipe, *overrides]
    env = {**os.environ, "FORCE_TORCHRUN": "1", "DISABLE_VERSION_CHECK": "1"}  # DeepSpeed on one GPU: torchrun
    sampler = GpuMemorySampler()
    sampler.start()
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO)
    wall = time.time() - t0
    sampler.stop.set()
    sampler.join()
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()] \
        if (out / "trainer_log.jsonl").exists() else []
    samples_per_step = recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"]
    counts = json.loads((args.work / "data/token_counts.json").read_text()) if \
        (args.work / "data/token_counts.json").exists() else {}
    lens = counts.get("stage1" if "stage1" in name else "stage3", [])
    mean_tokens = sum(lens) / len(lens) if lens else None
    times = [_seconds(r["elapsed_time"]) for r in log if "loss" in r]  # per logged step, "H:MM:SS"
    steady = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None  # mean after the first step
    summary = {
        "recipe": args.recipe, "command": " ".join(cmd), "returncode": proc.returncode, "wall_s": round(wall, 1),
        "losses": [r.get("loss") for r in log], "step_elapsed_s": times,
        "mean_step_s_after_first": round(steady, 2) if steady else None, "samples_per_step": samples_per_step,
        "mean_tokens_per_sample": round(mean_tokens) if mean_tokens else None,
        "tokens_per_s": round(samples_per_step * mean_tokens / steady) if steady and mean_tokens else None,
        "peak_gpu_mem_used_GiB": round(sampler.peak_mib / 1024, 1),
    }
    print(json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return proc.returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["sources", "merge", "data", "train"])
    p.add_argument("--work", type=Path, default=Path("/tmp/qm"))
    p.add_argument("--size", choices=sorted(LLMS), default="4b")
    p.add_argument("--model", help="merged model (data: token counts; train: model_name_or_path)")
    p.add_argument("--recipe", help="train: recipe YAML")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tag", default="", help="train: output folder suffix")
    p.add_argument("--json", help="train: write the summary here")
    p.add_argument("--stage1-rows", type=int, default=160)
    p.add_argument("--stage3-rows", type=int, default=64)
    p.add_argument("--long-words", type=int, default=6700, help="words of the long sample (about one token each)")
    p.add_argument("extra", nargs="*", help="train: further key=value overrides")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    return {"sources": cmd_sources, "merge": cmd_merge, "data": cmd_data, "train": cmd_train}[args.step](args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
