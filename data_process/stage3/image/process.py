"""Teacher generation for multimodal distillation (stage 3): image + question -> a VLM's reasoning answer.

Input: the converted OneVision parquet (``--data_dir``: folders of shards ``<name>/<name>-*.parquet``, single
``.parquet`` files, or folders of either). From every source a seeded sample of ``--samples_per_file`` valid
rows (one image, a non-empty first question) is drawn in one streaming pass and kept in a selection file
next to the output, so a rerun uses the same rows. Each question goes with its image to any
OpenAI-compatible VLM (GLM-4.1V-Thinking by default). Answers land in ``<output>.ckpt.jsonl`` as they arrive;
the final parquet keeps the image of every answered row:
``messages`` (question + original answer), ``images``, ``question``, ``reference``, ``teacher_response``, ...

    python data_process/stage3/image/process.py --data_dir ./LLaMA-Factory/data/llavaonevision_converted \\
        --model_name THUDM/GLM-4.1V-9B-Thinking --api_ips host1 host2 --samples_per_file 1000
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from data_process.common import ImagePolicy, Reject, image_value_bytes
from data_process.stage3 import cli
from data_process.stage3.client import Stats
from data_process.stage3.records import (
    ParquetSink,
    image_cell,
    image_data_url,
    iter_rows,
    sharegpt_schema,
    write_json_atomic,
)
from data_process.stage3.runner import Outcome, Task, fingerprint, run_step, stable_seed

DEFAULT_MODEL = "THUDM/GLM-4.1V-9B-Thinking"
TEST_MODE_TOTAL = 100
IMAGE_TAGS = re.compile(r"<\|image\|>\n?|<image>\n?")
_SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.parquet$")

SELECTION_SCHEMA = sharegpt_schema({"id": pa.string(), "source": pa.string(), "source_file": pa.string(),
                                    "row": pa.int64(), "question": pa.string(), "reference": pa.string()})
OUTPUT_SCHEMA = sharegpt_schema({"id": pa.string(), "source": pa.string(), "source_file": pa.string(),
                                 "row": pa.int64(), "question": pa.string(), "reference": pa.string(),
                                 "teacher_response": pa.string(), "teacher_model": pa.string(),
                                 "finish_reason": pa.string(), "token_usage": pa.string(), "seed": pa.int64()})

log = logging.getLogger("image.process")


@dataclass(frozen=True)
class Source:
    name: str
    files: tuple[str, ...]


def _parquet_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet"))


def _is_shard_folder(folder: str) -> bool:
    files = _parquet_files(folder)
    return bool(files) and all(_SHARD_NAME.search(os.path.basename(f)) for f in files)


def discover_sources(paths: list[str], exclude: list[str]) -> list[Source]:
    """Each shard folder is one source, each other ``.parquet`` file is one source."""
    sources: dict[str, Source] = {}

    def add(name: str, files: list[str]) -> None:
        if files and not any(word.lower() in name.lower() for word in exclude):
            sources.setdefault(name, Source(name, tuple(files)))

    for path in paths:
        path = path.rstrip("/")
        if os.path.isfile(path):
            add(os.path.basename(path)[: -len(".parquet")], [path])
        elif _is_shard_folder(path):
            add(os.path.basename(path), _parquet_files(path))
        elif os.path.isdir(path):
            for entry in sorted(os.listdir(path)):
                full = os.path.join(path, entry)
                if entry.startswith((".", "_")):
                    continue  # temp and stats folders of the stage-2 tools
                if os.path.isdir(full) and _is_shard_folder(full):
                    add(entry, _parquet_files(full))
                elif entry.endswith(".parquet"):
                    add(entry[: -len(".parquet")], [full])
        else:
            raise SystemExit(f"error: {path}: no such file or folder")
    return list(sources.values())


def first_turn(row: dict) -> tuple[str, str, bytes]:
    """``(question, reference, image bytes)`` of a row's first exchange; raise ``Reject`` if unusable."""
    messages = row.get("messages") or []
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise Reject("no_user_turn")
    text = messages[users[0]].get("content") or ""
    if len(IMAGE_TAGS.findall(text)) > 1:
        raise Reject("several_images_in_first_turn")
    question = IMAGE_TAGS.sub("", text).strip()
    if not question:
        raise Reject("empty_question")
    after = messages[users[0] + 1:]
    reference = after[0].get("content") or "" if after and after[0].get("role") == "assistant" else ""
    images = row.get("images") or []
    if not images:
        raise Reject("no_image")
    data = image_value_bytes(images[0])
    if not data:
        raise Reject("image_without_bytes")
    data, _ = ImagePolicy(check="structure").prepare(data)
    return question, reference, data


def sample_source(source: Source, k: int, seed: int, counts: Counter) -> list[dict]:
    """A seeded uniform sample of ``k`` valid rows in one pass (reservoir sampling), in file order."""
    rng = random.Random(stable_seed(seed, source.name, "sample"))
    reservoir: list[tuple[int, int, dict]] = []
    seen = 0
    for file_index, path in enumerate(source.files):
        bad: Counter = Counter()
        for row_index, row in enumerate(iter_rows(path, ["messages", "images"], rejects=bad)):
            if row is None:
                continue  # counted below as invalid_bad_utf8
            try:
                question, reference, data = first_turn(row)
            except Reject as err:
                counts[f"invalid_{err.reason}"] += 1
                continue
            item = {"id": f"{source.name}/{os.path.basename(path)}:{row_index}", "source": source.name,
                    "source_file": os.path.basename(path), "row": row_index, "question": question,
                    "reference": reference, "images": [image_cell(data)],
                    "messages": [{"role": "user", "content": "<image>\n" + question},
                                 {"role": "assistant", "content": reference}]}
            seen += 1
            if len(reservoir) < k:
                reservoir.append((file_index, row_index, item))
            else:
                j = rng.randrange(seen)
                if j < k:
                    reservoir[j] = (file_index, row_index, item)
        counts.update({f"invalid_{reason}": n for reason, n in bad.items()})
    counts["valid rows seen"] += seen
    return [item for _, _, item in sorted(reservoir, key=lambda entry: entry[:2])]


def selection_path(output: str) -> str:
    return output + ".selection.parquet"


def selection_signature(sources: list[Source], args: argparse.Namespace, per_source: int) -> dict:
    files = {f: [os.path.getsize(f), int(os.path.getmtime(f))] for s in sources for f in s.files}
    return {"files": files, "per_source": per_source, "seed": args.seed, "version": 1}


def build_selection(args: argparse.Namespace, output: str, stats: Stats) -> str:
    """Write (or reuse, when inputs and settings are unchanged) the selection parquet; return its path."""
    sources = discover_sources(args.data_dir, args.exclude)
    if not sources:
        raise SystemExit(f"error: no parquet sources under {' '.join(args.data_dir)}")
    per_source = max(1, TEST_MODE_TOTAL // len(sources)) if args.test_mode else args.samples_per_file
    path, meta_path = selection_path(output), output + ".selection.json"
    signature = selection_signature(sources, args, per_source)
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as handle:
            if json.load(handle) == signature:
                log.info("reusing the selection in %s", path)
                return path
    counts: Counter = Counter()
    with ParquetSink(path, SELECTION_SCHEMA) as sink:
        for source in sources:
            for item in sample_source(source, per_source, args.seed, counts):
                sink.add(item)
    write_json_atomic(meta_path, signature)
    stats.extra.update({f"selection {k}": v for k, v in counts.items()})
    log.info("selected %d rows from %d sources (%d per source) -> %s", sink.rows, len(sources), per_source, path)
    return path


def image_message(data: bytes, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(data)}},
                                         {"type": "text", "text": text}]}]


def make_tasks(selection: str, args: argparse.Namespace):
    """Tasks streamed from the selection file (the image bytes stay in memory only while in flight)."""
    for row in iter_rows(selection):
        seed = stable_seed(args.seed, row["id"], "teacher")
        key = fingerprint(args.model, row["question"], row["id"], args.max_tokens, args.temperature, args.top_p,
                          args.extra_body, seed)
        yield Task(row["id"], key, {"question": row["question"], "image": row["images"][0]["bytes"], "seed": seed})


class TeacherStep:
    """image/process.py for :func:`run_step`: selection -> teacher requests -> answered rows with their images."""

    name, desc = "image.process", "teacher"

    def parse_args(self, argv: list[str] | None) -> argparse.Namespace:
        return parse_args(argv)

    def inputs(self, args: argparse.Namespace) -> list[str]:
        return args.data_dir

    def output(self, args: argparse.Namespace) -> str:
        return args.output_file

    def tasks(self, args: argparse.Namespace, stats: Stats):
        selection = build_selection(args, args.output_file, stats)
        return make_tasks(selection, args), sum(1 for _ in iter_rows(selection, ["id"]))

    async def handle(self, client, task: Task, context_len: int | None, args: argparse.Namespace) -> Outcome:
        d = task.data
        res = await client.ask(image_message(d["image"], d["question"]), sample_id=task.id,
                               max_tokens=args.max_tokens, context_len=context_len, seed=d["seed"],
                               temperature=args.temperature, top_p=args.top_p, min_tokens=args.min_tokens)
        if res is None:
            return Outcome("rejected", "prompt_too_long")
        result = {"teacher_response": res.text, "finish_reason": res.finish_reason, "token_usage": res.usage,
                  "seed": d["seed"]}
        if res.finish_reason != "stop":
            return Outcome("rejected", f"finish_{res.finish_reason}", result)
        return Outcome("ok", None, result)

    def write(self, tasks, done: dict[str, dict], args: argparse.Namespace, stats: Stats,
              log: logging.Logger) -> None:
        with ParquetSink(args.output_file, OUTPUT_SCHEMA) as sink:
            for row in iter_rows(selection_path(args.output_file)):  # second pass: answers joined by sample id
                record = done.get(row["id"])
                if record and record["status"] == "ok":
                    r = record["result"]
                    sink.add({**row, "teacher_response": r["teacher_response"], "teacher_model": args.model,
                              "finish_reason": r["finish_reason"], "seed": r["seed"],
                              "token_usage": json.dumps(r["token_usage"])})
        stats.extra["written"] = sink.rows
        log.info("wrote %d answered rows (with their images) to %s", sink.rows, args.output_file)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", nargs="+", default=["."], help="parquet files or folders (see above)")
    p.add_argument("--exclude", nargs="*", default=["cc3m", "558k"],
                   help="skip sources whose name contains any of these (case-insensitive)")
    p.add_argument("--samples_per_file", type=int, default=1000, help="rows drawn from each source")
    p.add_argument("--test_mode", action="store_true", help=f"{TEST_MODE_TOTAL} rows in total, split over sources")
    p.add_argument("--output_file", default="glm_response.parquet")
    cli.add_api_args(p, model_flags=("--model_name", "--model"), model_default=DEFAULT_MODEL, max_tokens=8192)
    cli.add_run_args(p)
    cli.add_sampling_args(p, temperature=None, top_p=None, min_tokens=256)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_step(TeacherStep(), argv)


if __name__ == "__main__":
    sys.exit(main())
