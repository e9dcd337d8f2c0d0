#!/usr/bin/env python3
"""Stage-4 rollout throughput: our rollouts script against raw vLLM ``generate`` on the same prompts, in one run.

One ``vllm.LLM`` serves both sides, and their timed rounds alternate (so a busy machine slows both alike):

* raw: ``llm.generate`` on prompts rendered and images decoded beforehand, with the same per-request
  ``SamplingParams`` (same seeds, so the same tokens are generated);
* ours: ``OfflineGenerator.run`` from the questions (chat-template rendering, image decoding, checkpoint lines per
  rollout) plus ``build_outputs`` (verification, RFT / DPO / KTO parquet, stats), into a fresh folder each round.

Samples/s are the medians per side; the ratio ours / raw is the median of the per-round ratios (goal >= 0.9).

    python bench/bench_rollouts.py                       # tiny model and toy task, a few minutes on 2 CPU cores
    python bench/bench_rollouts.py --model outputs/Qwen-Merge-VL-4B-stage3 --data data/stage4_questions \\
        --dtype bfloat16 --k 8 --max_tokens 1024         # on a GPU

Prints one JSON object on stdout (``--json FILE`` also writes it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
GOAL_RATIO = 0.9


def tiny_model(work: Path) -> Path:
    """The tests' tiny merged checkpoint, built offline (float32, head_dim 64)."""
    from merge import model_merger
    from examples.tiny import tiny_models

    paths = tiny_models.build_all(work / "sources")
    out = work / "tiny-merged"
    if not (out / "config.json").exists():
        model_merger.merge(str(paths["qwen25vl"]), str(paths["qwen3"]), str(out), overwrite=True, quiet=True,
                           image_min_pixels=tiny_models.MIN_PIXELS, image_max_pixels=tiny_models.MAX_PIXELS)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", type=Path, help="checkpoint (default: the tiny merged model, built here)")
    parser.add_argument("--data", nargs="+", help="question parquet (default: the toy task)")
    parser.add_argument("--per_kind", type=int, default=4, help="toy questions per kind (default 4)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side, after one warm-up round")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)

    from vllm import LLM

    from data_process.stage3.client import Stats
    from data_process.stage3.runner import Checkpoint
    from data_process.stage4.outputs import build_outputs
    from data_process.stage4.questions import load_questions
    from data_process.stage4.rollouts import OfflineGenerator, Sampling, rollout_tasks
    from data_process.stage4.tiny_task import write_tiny_task

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_rollouts-"))
    model = args.model or tiny_model(work)
    data = args.data or [str(write_tiny_task(work / "questions", per_kind=args.per_kind))]
    questions = load_questions(data, Counter())
    sampling = Sampling(str(model), args.k, 0.6, 0.95, 20, args.max_tokens, 42)
    tasks = rollout_tasks(questions, sampling)
    llm = LLM(model=str(model), dtype=args.dtype, seed=0, enforce_eager=True, max_model_len=2048,
              limit_mm_per_prompt={"image": max(len(q.images) for q in questions) or 1})
    generator = OfflineGenerator(llm, str(model), sampling, batch_size=len(tasks))

    # raw side: inputs built once, outside the timing
    cache: dict = {}
    raw_inputs = []
    for task in tasks:
        prompt = generator.prompt(task.data["question"], cache)
        raw_inputs.append({k: (dict(v) if isinstance(v, dict) else v) for k, v in prompt.items()})
    raw_params = [generator.params(t) for t in tasks]
    with_images = [i for i, t in enumerate(tasks) if t.data["question"].images]
    without = [i for i, t in enumerate(tasks) if not t.data["question"].images]

    def raw() -> int:
        tokens = 0
        for group in (with_images, without):  # the same split as ours (vLLM CPU: no mixed batches)
            if group:
                outs = llm.generate([raw_inputs[i] for i in group], [raw_params[i] for i in group], use_tqdm=False)
                tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        return tokens

    def ours(round_dir: Path) -> int:
        with Checkpoint(str(round_dir / "rollouts.ckpt.jsonl")) as checkpoint:
            generator.run(tasks, checkpoint, Stats(), progress=False)
            records = dict(checkpoint.records)
        build_outputs(questions, records, str(round_dir), k=args.k, max_tokens=args.max_tokens)
        return sum(r["result"]["tokens"] for r in records.values())

    rows = []
    for round_index in range(args.rounds + 1):
        timings = {}
        for side in (("raw", "ours") if round_index % 2 else ("ours", "raw")):
            start = time.perf_counter()
            tokens = raw() if side == "raw" else ours(work / f"round{round_index}")
            timings[side] = (time.perf_counter() - start, tokens)
        if round_index:  # round 0 warms up both paths
            rows.append({side: {"seconds": round(s, 3), "tokens": n, "samples_per_s": round(len(tasks) / s, 2)}
                         for side, (s, n) in timings.items()})
        print(f"round {round_index}: {timings}", file=sys.stderr)
    ratios = [r["ours"]["samples_per_s"] / r["raw"]["samples_per_s"] for r in rows]
    result = {"model": str(model), "dtype": args.dtype, "questions": len(questions), "k": args.k,
              "samples_per_round": len(tasks), "max_tokens": args.max_tokens, "rounds": rows,
              "raw_samples_per_s": statistics.median(r["raw"]["samples_per_s"] for r in rows),
              "ours_samples_per_s": statistics.median(r["ours"]["samples_per_s"] for r in rows),
              "ratio_ours_over_raw": round(statistics.median(ratios), 3), "goal": GOAL_RATIO}
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
