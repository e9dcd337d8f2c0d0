"""Judge the VLM teacher's answers *with the image* and write the training parquet (stage 3, multimodal).

Local checks first: one well-formed ``<think>…</think>`` block with a non-empty thought, GLM's
``<answer>…</answer>`` wrapper (if present) well formed, balanced ``<|begin_of_box|>`` markers, and (with
``--processor``) a training sequence no longer than ``--cutoff_len`` (else ``too_long``). The judge
gets the image, the question, the original answer and the teacher's answer (without its thoughts).
Verdicts are stored by sample id in ``<output>.ckpt.jsonl`` (a rerun resumes) and joined back by id, so
out-of-order completion cannot attach a verdict to the wrong row. Kept rows become
``{"messages": [user "<image>\\n" + question, assistant "<think>…</think>\\n\\n" + answer], "images": [image]}``.

    python data_process/stage3/image/evaluate.py --input_file glm_response.parquet \\
        --output_file ./LLaMA-Factory/data/image_thinking.parquet --api_ips host1 host2
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from data_process.stage3 import cli
from data_process.stage3.client import Stats
from data_process.stage3.image.process import DEFAULT_MODEL, image_message
from data_process.stage3.judge import FormatError, judge_once, judge_prompt, teacher_answer
from data_process.stage3.length import add_length_args, training_length
from data_process.stage3.prompts import NO_THINK
from data_process.stage3.records import ParquetSink, iter_rows
from data_process.stage3.runner import Task, fingerprint, run_step, stable_seed

log = logging.getLogger("image.evaluate")


def checked(row: dict) -> tuple[str, str]:
    """``(training text, answer)`` of a teacher response; raise ``FormatError`` if malformed."""
    text, answer, _ = teacher_answer(row["teacher_response"], require_thought=True)
    return text, answer


def training_row(row: dict, text: str) -> dict:
    return {"messages": [{"role": "user", "content": "<image>\n" + row["question"]},
                         {"role": "assistant", "content": text}],
            "images": row["images"]}


def make_tasks(args: argparse.Namespace, stats: Stats):
    """Judge tasks streamed from the input (rows failing the local checks, or longer than the training
    ``--cutoff_len`` when ``--processor`` is given, are counted, not sent)."""
    measure = None
    if args.processor:
        measure = training_length(args.processor, args.train_image_min_pixels, args.train_image_max_pixels)
    for row in iter_rows(args.input_file, rejects=stats.rejected):
        if row is None:
            continue  # an invalid UTF-8 string: counted as bad_utf8
        if len(row["images"]) != 1 or not row["images"][0].get("bytes"):
            stats.rejected["no_image"] += 1
            continue
        try:
            text, answer = checked(row)
        except FormatError as err:
            stats.rejected[f"format_{err.reason}"] += 1
            continue
        if measure is not None:
            train = training_row(row, text)
            if measure.count(train["messages"], [row["images"][0]["bytes"]]) > args.cutoff_len:
                stats.rejected["too_long"] += 1
                continue
        prompt = judge_prompt(row["question"], row["reference"], answer, with_image=True)
        prompt += NO_THINK if args.judge_no_think else ""
        seed = stable_seed(args.seed, row["id"], "judge")
        key = fingerprint(args.model, prompt, row["id"], args.temperature, args.top_p, args.max_tokens,
                          args.extra_body, seed)
        yield Task(row["id"], key, {"prompt": prompt, "image": row["images"][0]["bytes"], "seed": seed})


class JudgeStep:
    """image/evaluate.py for :func:`run_step`: local checks -> judge with the image -> kept training rows."""

    name, desc = "image.evaluate", "judge"

    def parse_args(self, argv: list[str] | None) -> argparse.Namespace:
        return parse_args(argv)

    def inputs(self, args: argparse.Namespace) -> list[str]:
        return [args.input_file]

    def output(self, args: argparse.Namespace) -> str:
        return args.output_file

    def tasks(self, args: argparse.Namespace, stats: Stats):
        if not args.processor:
            log.warning("no --processor: rows are not measured against --cutoff_len %d; the trainer may cut "
                        "long ones", args.cutoff_len)
        return make_tasks(args, stats), sum(1 for _ in iter_rows(args.input_file, ["id"]))

    async def handle(self, client, task: Task, context_len: int | None, args: argparse.Namespace):
        d = task.data
        content = image_message(d["image"], d["prompt"])[0]["content"]
        return await judge_once(client, content, sample_id=task.id, max_tokens=args.max_tokens,
                                context_len=context_len, temperature=args.temperature, top_p=args.top_p,
                                seed=d["seed"])

    def write(self, tasks, done: dict[str, dict], args: argparse.Namespace, stats: Stats,
              log: logging.Logger) -> None:
        total = 0
        with ParquetSink(args.output_file) as sink:
            for row in iter_rows(args.input_file, rejects=Counter()):  # second pass: verdicts joined by id
                total += 1
                record = done.get(row["id"]) if row is not None else None
                if record and record["status"] == "ok":
                    text, _ = checked(row)
                    sink.add(training_row(row, text))
        stats.extra["input rows"] = total
        stats.extra["kept by the judge"] = sink.rows
        log.info("kept %d of %d rows -> %s", sink.rows, total, args.output_file)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_file", default="glm_response.parquet", help="output of image/process.py")
    p.add_argument("--output_file", default="glm_final.parquet")
    cli.add_api_args(p, model_flags=("--judge_model", "--model"), model_default=DEFAULT_MODEL,
                     extra_body_flags=("--judge_extra_body", "--extra_body"), max_tokens=4096)
    cli.add_run_args(p, max_workers=256)
    cli.add_sampling_args(p, temperature=None, top_p=None)
    cli.add_judge_args(p, no_think=False)
    add_length_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_step(JudgeStep(), argv)


if __name__ == "__main__":
    sys.exit(main())
