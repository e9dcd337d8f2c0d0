"""Judge teacher answers against the reference answers and keep the ones that pass (stage 3, text).

Local checks first (one well-formed ``<think>…</think>`` block, a non-empty answer, a non-empty thought for
thinking-mode answers); then the judge model compares the answer (without its thoughts) with the
reference. The judge is asked with a real ``/no_think`` switch unless ``--judge_thinking`` is given.
Verdicts are stored by sample id in ``<output>.ckpt.jsonl``; a rerun resumes from there.

    python data_process/stage3/text2image/evaluate.py --input_file generated_responses_Qwen3-32B.json \\
        --model Qwen/Qwen3-32B --api_ips host1 host2
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from data_process.stage3 import cli
from data_process.stage3.client import Stats
from data_process.stage3.judge import FormatError, judge_once, judge_prompt, teacher_answer
from data_process.stage3.prompts import NO_THINK
from data_process.stage3.records import read_records, write_json_atomic
from data_process.stage3.runner import Task, fingerprint, run_step, stable_seed

MANY_WORKERS = 2048


def build_tasks(records: list[dict], args: argparse.Namespace, stats: Stats) -> list[Task]:
    """Judge tasks for the records that pass the local format checks (the others are counted)."""
    tasks = []
    for i, rec in enumerate(records):
        sample_id = rec.get("id") or f"item-{i:06d}"
        try:
            _, answer, _ = teacher_answer(rec["response"], require_thought=rec.get("mode") != "no_thinking")
        except FormatError as err:
            stats.rejected[f"format_{err.reason}"] += 1
            continue
        prompt = judge_prompt(rec["query"], rec.get("original_output") or "", answer)
        content = prompt + (NO_THINK if args.judge_no_think else "")
        seed = stable_seed(args.seed, sample_id, "judge")
        key = fingerprint(args.model, content, args.temperature, args.top_p, args.max_tokens, args.extra_body, seed)
        tasks.append(Task(sample_id, key, {"record": rec, "answer": answer, "content": content, "seed": seed}))
    return tasks


class JudgeStep:
    """text2image/evaluate.py for :func:`run_step`: local checks -> judge -> JSON list of kept records."""

    name, desc = "text2image.evaluate", "judge"

    def parse_args(self, argv: list[str] | None) -> argparse.Namespace:
        return parse_args(argv)

    def inputs(self, args: argparse.Namespace) -> list[str]:
        return [args.input_file]

    def output(self, args: argparse.Namespace) -> str:
        return args.output_file or os.path.join(args.output_dir, f"evaluated_{os.path.basename(args.input_file)}")

    def tasks(self, args: argparse.Namespace, stats: Stats):
        records = read_records([args.input_file], stats.rejected)  # unreadable rows: counted as bad_utf8, ...
        stats.extra["input records"] = len(records) + sum(stats.rejected.values())
        tasks = build_tasks(records, args, stats)
        return tasks, len(tasks)

    async def handle(self, client, task: Task, context_len: int | None, args: argparse.Namespace):
        return await judge_once(client, task.data["content"], sample_id=task.id, max_tokens=args.max_tokens,
                                context_len=context_len, temperature=args.temperature, top_p=args.top_p,
                                seed=task.data["seed"])

    def write(self, tasks: list[Task], done: dict[str, dict], args: argparse.Namespace, stats: Stats,
              log: logging.Logger) -> None:
        output = self.output(args)
        kept = []
        for task in tasks:  # input order; each verdict is looked up by its own sample id
            record = done[task.id]
            if record["status"] == "ok":
                kept.append({**task.data["record"], "id": task.id, "extracted_response": task.data["answer"],
                             **record["result"]})
        write_json_atomic(output, kept)
        stats.extra["kept by the judge"] = len(kept)
        log.info("kept %d of %d records -> %s", len(kept), stats.extra["input records"], output)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_file", required=True, help="output of text2image/process.py (JSON list or JSONL)")
    p.add_argument("--output_dir", default="./")
    p.add_argument("--output_file", default=None, help="default: <output_dir>/evaluated_<input basename>")
    cli.add_api_args(p, model_flags=("--judge_model", "--model"), model_default=None,
                     extra_body_flags=("--judge_extra_body", "--extra_body"), max_tokens=2048)
    cli.add_run_args(p)
    cli.add_sampling_args(p, temperature=0.3, top_p=0.9)
    cli.add_judge_args(p, no_think=True)
    args = p.parse_args(argv)
    if args.max_workers > MANY_WORKERS:
        logging.getLogger("text2image.evaluate").warning(
            "--max_workers %d: that many concurrent requests may overload the servers", args.max_workers)
    return args


def main(argv: list[str] | None = None) -> int:
    return run_step(JudgeStep(), argv)


if __name__ == "__main__":
    sys.exit(main())
