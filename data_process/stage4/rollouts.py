#!/usr/bin/env python3
"""Stage-4 rollouts: sample k answers per verifiable question from a Qwen-Merge checkpoint, verify them, and write
RFT data, DPO pairs and KTO rows for ``llamafactory-cli`` (see ``data_process/stage4/README.md``).

    # offline: vLLM's LLM(...) in this process
    python data_process/stage4/rollouts.py --mode offline --model outputs/Qwen-Merge-VL-4B-stage3 \\
        --data data/llavaonevision_converted/ai2d_cauldron_llava_format --output_dir data/stage4 --k 8

    # servers: any OpenAI-compatible endpoints (vllm serve ...), through the stage-3 client
    python data_process/stage4/rollouts.py --mode server --model qwen-merge --api_ips host1 host2 \\
        --data my_questions.parquet --output_dir data/stage4 --k 8

Thinking is on (the model's chat template default). Every sample has its own seed, derived from --seed, the
question and the sample index, so a rerun asks for exactly the same samples. Finished rollouts are appended to
``<output_dir>/rollouts.ckpt.jsonl`` as they arrive; after a kill (even -9) a rerun sends only the missing ones.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data_process.stage3 import cli
from data_process.stage3.client import Stats
from data_process.stage3.records import image_data_url
from data_process.stage3.runner import Checkpoint, Outcome, Task, fingerprint, run_tasks, stable_seed
from data_process.stage4.outputs import build_outputs, sample_id
from data_process.stage4.questions import Question, load_questions
from data_process.stage4.verifier import KINDS

CHECKPOINT = "rollouts.ckpt.jsonl"
log = logging.getLogger("stage4.rollouts")


@dataclass(frozen=True)
class Sampling:
    """What defines a sample besides its question: part of every checkpoint key."""
    model: str
    k: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int
    guided_regex: tuple[tuple[str, str], ...] = ()  # (kind, regex): constrained decoding, e.g. for toy models

    def regex_for(self, kind: str) -> str | None:
        table = dict(self.guided_regex)
        return table.get(kind, table.get("all"))


def rollout_tasks(questions: list[Question], sampling: Sampling) -> list[Task]:
    """k tasks per question; the key binds question content, sampling settings and the per-sample seed."""
    tasks = []
    for q in questions:
        for i in range(sampling.k):
            seed = stable_seed(sampling.seed, q.id, i)
            key = fingerprint(q.id, sampling.model, sampling.temperature, sampling.top_p, sampling.top_k,
                              sampling.max_tokens, seed, sampling.regex_for(q.kind))
            tasks.append(Task(sample_id(q.id, i), key, {"question": q, "seed": seed}))
    return tasks


def ok_record(task: Task, text: str, finish_reason: str | None, tokens: int | None) -> dict:
    return {"id": task.id, "key": task.key, "status": "ok", "reason": None,
            "result": {"text": text, "finish_reason": finish_reason, "tokens": tokens, "seed": task.data["seed"]}}


# ---- offline: vLLM LLM(...) ------------------------------------------------------------------------------------

def chat_messages(question: Question) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * len(question.images)
             + [{"type": "text", "text": question.text}]}]


class OfflineGenerator:
    """Renders prompts with the checkpoint's own chat template and generates with a ``vllm.LLM``."""

    def __init__(self, llm, model_dir: str, sampling: Sampling, batch_size: int = 256):
        from transformers import AutoProcessor

        self.llm = llm
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.sampling = sampling
        self.batch_size = batch_size

    def params(self, task: Task):
        from vllm import SamplingParams
        from vllm.sampling_params import GuidedDecodingParams

        s, question = self.sampling, task.data["question"]
        regex = s.regex_for(question.kind)
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                              seed=task.data["seed"],
                              guided_decoding=GuidedDecodingParams(regex=regex) if regex else None)

    def prompt(self, question: Question, cache: dict) -> dict:
        """The vLLM input of a question (rendered and decoded once, shared by its k samples)."""
        if question.id not in cache:
            from PIL import Image

            text = self.processor.apply_chat_template(chat_messages(question), add_generation_prompt=True)
            prompt = {"prompt": text}
            if question.images:
                prompt["multi_modal_data"] = {"image": [Image.open(io.BytesIO(b)).convert("RGB")
                                                        for b in question.images]}
            cache.clear()  # questions come in order: keep only the current one's pictures in memory
            cache[question.id] = prompt
        return cache[question.id]

    def run(self, tasks: list[Task], checkpoint: Checkpoint, stats: Stats, progress: bool = True) -> None:
        """Generate every task not in ``checkpoint``; append each batch's results as soon as it is done."""
        self.generate(pending_tasks(tasks, checkpoint, stats), checkpoint, stats, progress)

    def generate(self, pending: list[Task], checkpoint: Checkpoint, stats: Stats, progress: bool = True) -> None:
        from tqdm import tqdm

        cache: dict = {}
        bar = tqdm(total=len(pending), desc="rollouts", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        for start in range(0, len(pending), self.batch_size):
            batch = pending[start:start + self.batch_size]
            # vLLM 0.9.1 on CPU fails when text-only and image prompts share a batch: one call per kind.
            for group in ([t for t in batch if t.data["question"].images],
                          [t for t in batch if not t.data["question"].images]):
                if not group:
                    continue
                inputs = [self.prompt(t.data["question"], cache) for t in group]
                outputs = self.llm.generate(inputs, [self.params(t) for t in group], use_tqdm=False)
                stats.requests += len(group)
                for task, output in zip(group, outputs):
                    done = output.outputs[0]
                    checkpoint.append(ok_record(task, done.text, done.finish_reason, len(done.token_ids)))
                    stats.ok += 1
                bar.update(len(group))
        bar.close()


def pending_tasks(tasks: list[Task], checkpoint: Checkpoint, stats: Stats) -> list[Task]:
    """The tasks ``checkpoint`` does not hold yet (counted in ``stats``: items, resumed)."""
    pending = [t for t in tasks if not checkpoint.done(t)]
    stats.items += len(tasks)
    stats.resumed += len(tasks) - len(pending)
    return pending


def make_llm(args: argparse.Namespace, max_images: int):
    from vllm import LLM

    options = dict(dtype=args.dtype, seed=args.seed, tensor_parallel_size=args.tensor_parallel_size,
                   limit_mm_per_prompt={"image": max(max_images, 1)})
    if args.max_model_len:
        options["max_model_len"] = args.max_model_len
    options.update(args.engine_args)
    return LLM(model=args.model, **options)


# ---- servers: the stage-3 client ---------------------------------------------------------------------------

def openai_messages(question: Question) -> list[dict]:
    images = [{"type": "image_url", "image_url": {"url": image_data_url(b)}} for b in question.images]
    return [{"role": "user", "content": images + [{"type": "text", "text": question.text}]}]


async def run_server(args: argparse.Namespace, tasks: list[Task], sampling: Sampling, checkpoint_file: str,
                     stats: Stats) -> dict[str, dict]:
    async def handle(task: Task) -> Outcome:
        question = task.data["question"]
        body = {"messages": openai_messages(question), "seed": task.data["seed"], "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
        regex = sampling.regex_for(question.kind)
        if regex:
            body["guided_regex"] = regex
        result = await client.chat(body, sample_id=task.id)
        record = ok_record(task, result.text, result.finish_reason, result.usage.get("completion_tokens"))
        return Outcome("ok", None, record["result"])

    async with cli.make_client(args, stats) as client:
        with Checkpoint(checkpoint_file) as checkpoint:
            return await run_tasks(tasks, handle, checkpoint, max_workers=args.max_workers, stats=stats,
                                   desc="rollouts", total=len(tasks), progress=not args.no_progress)


# ---- driver ----------------------------------------------------------------------------------------------------

def parse_guided(values: list[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for value in values:
        kind, sep, regex = value.partition("=")
        if not sep or kind not in (*KINDS, "all") or not regex:
            raise SystemExit(f"rollouts: --guided_regex wants KIND=REGEX with KIND in {(*KINDS, 'all')}, "
                             f"got {value!r}")
        pairs.append((kind, regex))
    return tuple(sorted(pairs))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    io_group = parser.add_argument_group("data")
    io_group.add_argument("--data", nargs="+", required=True,
                          help="parquet files, shard folders, or folders of either (one source each)")
    io_group.add_argument("--output_dir", required=True, help="checkpoint, outputs, dataset_info.json, stats")
    io_group.add_argument("--per_source", type=int, default=None, help="first N questions of each source")
    io_group.add_argument("--exclude", nargs="*", default=[], help="skip sources whose name contains a word")
    io_group.add_argument("--pairs_per_question", type=int, default=1, help="DPO pairs per question (distinct "
                                                                              "wrong replies)")
    io_group.add_argument("--skip_generation", action="store_true",
                          help="only verify the checkpoint's rollouts and rewrite the outputs")
    parser.add_argument("--mode", choices=("offline", "server"), default="offline",
                        help="offline: vLLM LLM(...) on --model (a checkpoint folder); server: OpenAI-compatible "
                             "endpoints (--api_ips) serving --model")
    cli.add_api_args(parser, model_flags=("--model",), model_default=None, max_tokens=4096)
    cli.add_run_args(parser, max_workers=64)
    sampling = parser.add_argument_group("sampling (Qwen3 thinking-mode defaults)")
    sampling.add_argument("--k", type=int, default=8, help="samples per question")
    sampling.add_argument("--temperature", type=float, default=0.6)
    sampling.add_argument("--top_p", type=float, default=0.95)
    sampling.add_argument("--top_k", type=int, default=20)
    sampling.add_argument("--guided_regex", action="append", default=[], metavar="KIND=REGEX",
                          help="constrain replies of a kind (mcq, math, exact or all) to a regex (vLLM guided "
                               "decoding); meant for toy models")
    offline = parser.add_argument_group("offline engine")
    offline.add_argument("--dtype", default="auto")
    offline.add_argument("--tensor_parallel_size", type=int, default=1)
    offline.add_argument("--batch_size", type=int, default=256, help="rollouts per generate call (and per "
                                                                      "checkpoint flush)")
    offline.add_argument("--engine_args", type=cli.json_object, default={},
                         help="JSON of further vllm.LLM arguments, e.g. '{\"enforce_eager\": true}'")
    args = parser.parse_args(argv)
    if args.k < 1 or args.max_tokens is None or args.max_tokens < 1:
        parser.error("--k and --max_tokens must be at least 1")
    if args.mode == "offline" and not os.path.isdir(args.model):
        parser.error(f"--mode offline needs --model to be a checkpoint folder; {args.model!r} is not one")
    args.guided = parse_guided(args.guided_regex)
    return args


def sampling_of(args: argparse.Namespace) -> Sampling:
    model = os.path.abspath(args.model) if args.mode == "offline" else args.model
    return Sampling(model, args.k, args.temperature, args.top_p, args.top_k, args.max_tokens, args.seed,
                    args.guided)


def run(args: argparse.Namespace, llm=None) -> dict:
    """Load questions, generate what is missing (unless --skip_generation), verify, write outputs; the stats.

    ``llm``: an already built ``vllm.LLM`` for offline mode (the benchmark and tests reuse one engine).
    """
    started = time.monotonic()
    question_rejects: Counter = Counter()
    questions = load_questions(args.data, question_rejects, per_source=args.per_source, exclude=tuple(args.exclude))
    if not questions:
        raise SystemExit(f"rollouts: no verifiable question in {' '.join(args.data)} "
                         f"(rejected: {dict(question_rejects) or 'none'})")
    log.info("%d questions (%s), %d rows rejected %s", len(questions), dict(Counter(q.kind for q in questions)),
             sum(question_rejects.values()), dict(question_rejects))
    sampling = sampling_of(args)
    tasks = rollout_tasks(questions, sampling)
    checkpoint_file = os.path.join(args.output_dir, CHECKPOINT)
    stats = Stats()
    if args.skip_generation:
        pass
    elif args.mode == "offline":
        with Checkpoint(checkpoint_file) as checkpoint:
            pending = pending_tasks(tasks, checkpoint, stats)
            if pending:  # no engine start when everything is done already
                llm = llm or make_llm(args, max(len(q.images) for q in questions))
                generator = OfflineGenerator(llm, args.model, sampling, args.batch_size)
                generator.generate(pending, checkpoint, stats, progress=not args.no_progress)
    else:
        asyncio.run(run_server(args, tasks, sampling, checkpoint_file, stats))
    with Checkpoint(checkpoint_file) as checkpoint:
        records = {t.id: r for t in tasks if (r := checkpoint.done(t)) is not None}
    result = build_outputs(questions, records, args.output_dir, k=args.k, max_tokens=args.max_tokens,
                           pairs_per_question=args.pairs_per_question, question_rejects=question_rejects,
                           extra_stats={"rollouts": stats.as_dict(), "model": sampling.model, "mode": args.mode,
                                        "seconds": round(time.monotonic() - started, 1)})
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup(args, "stage4.rollouts")
    result = run(args)
    failed = result["rollouts"]["failed"]
    if failed:
        log.warning("%d rollouts failed after all retries; run again to retry them", failed)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
