"""Teacher generation for text-to-image distillation (stage 3).

Queries come from Chinese-DeepSeek-R1-Distill-110k (``input``; reference answer ``content``) and alpaca
(``instruction`` + ``input``; reference ``output``), each a hub id, a local copy in the hub layout or a
JSON/JSONL/parquet file. Every query gets a thinking request; a seeded fraction also gets a ``/no_think``
request. Every answer is appended to ``<output>.ckpt.jsonl`` as it arrives; a rerun resumes from there.
The final JSON list (answers that stopped normally, in input order) is written atomically at the end.

    python data_process/stage3/text2image/process.py --model Qwen/Qwen3-32B --api_ips host1 host2 --test_mode
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
from data_process.stage3.prompts import NO_THINK
from data_process.stage3.records import read_records, write_json_atomic
from data_process.stage3.runner import Outcome, Task, fingerprint, run_step, stable_seed, stable_unit

DEEPSEEK = "Congliu/Chinese-DeepSeek-R1-Distill-data-110k"
ALPACA = "tatsu-lab/alpaca"
TEST_MODE_PER_SOURCE = 50


def deepseek_query(row: dict) -> tuple[str, str]:
    return row["input"], row["content"]  # the answer field is `content` (it has no `output`)


def alpaca_query(row: dict) -> tuple[str, str]:
    extra = (row.get("input") or "").strip()
    query = f"{row['instruction']}\n{extra}" if extra else row["instruction"]
    return query, row["output"]


SOURCES = {"deepseek": (deepseek_query, ("input", "content")),
           "alpaca": (alpaca_query, ("instruction", "input", "output"))}


DATA_EXTENSIONS = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}


def looks_local(spec: str) -> bool:
    """A path rather than a hub id (``owner/name``)."""
    return (spec.startswith(("/", ".", "~")) or spec.count("/") != 1 or os.path.exists(spec)
            or spec.rsplit(".", 1)[-1].lower() in DATA_EXTENSIONS)


def load_rows(spec: str, limit: int | None, split: str = "train", progress: bool = True,
              rejects: Counter | None = None):
    """Rows (a ``datasets.Dataset`` or a list of dicts) from a hub id, a local hub-layout folder or a data file.

    Local JSON/JSONL files are read line by line, so a bad byte or a lone surrogate costs one counted reject
    (``rejects``), not the whole file.
    """
    import datasets
    from datasets import load_dataset

    if not progress:
        datasets.disable_progress_bars()
    if looks_local(spec) and not os.path.exists(os.path.expanduser(spec)):
        raise SystemExit(f"error: {spec}: no such file or folder")
    spec = os.path.expanduser(spec)
    files = [spec] if os.path.isfile(spec) else []
    if os.path.isdir(spec):
        found = sorted(os.path.join(d, f) for d, _, names in os.walk(spec) for f in names if not f.startswith("."))
        files = [f for f in found if f.rsplit(".", 1)[-1].lower() in DATA_EXTENSIONS]
    if files and all(f.rsplit(".", 1)[-1].lower() in ("json", "jsonl") for f in files):
        rows = read_records(files, rejects)
        return rows[:limit] if limit is not None else rows
    try:
        if os.path.isfile(spec):
            builder = DATA_EXTENSIONS.get(spec.rsplit(".", 1)[-1].lower())
            if builder is None:
                raise SystemExit(f"error: {spec}: unsupported file type (json, jsonl, parquet or csv)")
            ds = load_dataset(builder, data_files=spec, split="train")
        else:
            ds = load_dataset(spec, split=split)
    except (OSError, ValueError, ImportError) as err:  # datasets' own errors derive from these
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(f"error: {spec}: cannot load ({first})") from None
    return ds.select(range(min(limit, len(ds)))) if limit is not None else ds


def column_names(rows) -> list[str]:
    if isinstance(rows, list):
        return sorted({key for row in rows for key in row})
    return rows.column_names


def load_queries(args: argparse.Namespace, rejects: Counter | None = None) -> list[dict]:
    """Queries of both sources; rows a reader had to skip are counted in ``rejects`` as ``"<source> <reason>"``."""
    limit = args.num_samples or (TEST_MODE_PER_SOURCE if args.test_mode else None)
    queries = []
    for name, spec in (("deepseek", args.deepseek_dataset), ("alpaca", args.alpaca_dataset)):
        if not spec or spec.lower() == "none":
            continue
        to_query, columns = SOURCES[name]
        skipped: Counter = Counter()
        rows = load_rows(spec, limit, progress=not getattr(args, "no_progress", False), rejects=skipped)
        if rejects is not None:
            rejects.update({f"{name} {reason}": n for reason, n in skipped.items()})
        have = column_names(rows)
        missing = [c for c in columns if c not in have]
        if missing:
            raise SystemExit(f"error: {spec}: missing column(s) {missing} for the {name} schema; has {have}")
        for index, row in enumerate(rows):
            try:
                query, reference = to_query(row)
            except KeyError:
                if rejects is not None:
                    rejects[f"{name} missing_field"] += 1
                continue
            if not (query or "").strip():
                continue
            queries.append({"id": f"{name}-{index:06d}", "source": name, "query_index": index,
                            "query": query, "original_output": reference or ""})
    return queries


def build_tasks(queries: list[dict], args: argparse.Namespace) -> list[Task]:
    """A thinking task per query, plus a ``/no_think`` task for a seeded share of the queries."""
    tasks = []
    for q in queries:
        modes = ["thinking"]
        if stable_unit(args.seed, q["id"], "no_think") < args.no_think_ratio:
            modes.append("no_thinking")
        for mode in modes:
            task_id = f"{q['id']}/{mode}"
            params = sampling(args, mode)
            content = q["query"] + (NO_THINK if mode == "no_thinking" else "")
            seed = stable_seed(args.seed, task_id)
            key = fingerprint(args.model, content, params, args.max_tokens, args.extra_body, seed)
            tasks.append(Task(task_id, key, {**q, "mode": mode, "content": content, "seed": seed, **params}))
    return tasks


def sampling(args: argparse.Namespace, mode: str) -> dict:
    if mode == "thinking":
        return {"temperature": args.think_temperature, "top_p": args.think_top_p}
    return {"temperature": args.no_think_temperature, "top_p": args.no_think_top_p}


def output_record(task: Task, record: dict, model: str) -> dict:
    d, r = task.data, record["result"]
    return {"id": task.id, "source": d["source"], "query_index": d["query_index"], "query": d["query"],
            "original_output": d["original_output"], "response": r["response"], "mode": d["mode"],
            "model": model, "finish_reason": r["finish_reason"], "token_usage": r["token_usage"],
            "seed": d["seed"], "max_tokens": r["max_tokens"]}


class TeacherStep:
    """text2image/process.py for :func:`run_step`: queries -> teacher requests -> JSON list of answers."""

    name, desc = "text2image.process", "teacher"

    def parse_args(self, argv: list[str] | None) -> argparse.Namespace:
        return parse_args(argv)

    def inputs(self, args: argparse.Namespace) -> list[str]:
        return []  # hub ids or paths: checked by load_rows

    def output(self, args: argparse.Namespace) -> str:
        name = os.path.basename(args.model.rstrip("/"))
        return args.output_file or os.path.join(args.output_dir, f"generated_responses_{name}.json")

    def tasks(self, args: argparse.Namespace, stats: Stats):
        tasks = build_tasks(load_queries(args, stats.rejected), args)  # unreadable input rows: counted
        stats.extra["queries"] = len({t.data["id"] for t in tasks})
        return tasks, len(tasks)

    async def handle(self, client, task: Task, context_len: int | None, args: argparse.Namespace) -> Outcome:
        d = task.data
        res = await client.ask([{"role": "user", "content": d["content"]}], sample_id=task.id,
                               max_tokens=args.max_tokens, context_len=context_len, seed=d["seed"],
                               temperature=d["temperature"], top_p=d["top_p"], min_tokens=args.min_tokens)
        if res is None:
            return Outcome("rejected", "prompt_too_long")
        result = {"response": res.text, "finish_reason": res.finish_reason, "token_usage": res.usage,
                  "max_tokens": res.max_tokens}
        if res.finish_reason != "stop":
            return Outcome("rejected", f"finish_{res.finish_reason}", result)
        return Outcome("ok", None, result)

    def write(self, tasks: list[Task], done: dict[str, dict], args: argparse.Namespace, stats: Stats,
              log: logging.Logger) -> None:
        output = self.output(args)
        records = [output_record(t, done[t.id], args.model) for t in tasks if done[t.id]["status"] == "ok"]
        write_json_atomic(output, records)
        stats.extra["written"] = len(records)
        log.info("wrote %d responses to %s", len(records), output)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_api_args(p, model_flags=("--model", "--model_name"), model_default=None, max_tokens=8192)
    cli.add_run_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--deepseek_dataset", default=DEEPSEEK, help="hub id, local folder or file; 'none' to skip")
    g.add_argument("--alpaca_dataset", default=ALPACA, help="hub id, local folder or file; 'none' to skip")
    g.add_argument("--test_mode", action="store_true", help=f"first {TEST_MODE_PER_SOURCE} queries per dataset")
    g.add_argument("--num_samples", type=int, default=None, help="first N queries per dataset")
    g.add_argument("--output_dir", default="./")
    g.add_argument("--output_file", default=None,
                   help="default: <output_dir>/generated_responses_<model basename>.json")
    g = p.add_argument_group("sampling")
    g.add_argument("--no_think_ratio", type=float, default=0.5, help="share of queries also asked with /no_think")
    g.add_argument("--think_temperature", type=float, default=0.6)
    g.add_argument("--think_top_p", type=float, default=0.95)
    g.add_argument("--no_think_temperature", type=float, default=0.7)
    g.add_argument("--no_think_top_p", type=float, default=0.8)
    g.add_argument("--min_tokens", type=int, default=256,
                   help="skip a query when less than this many tokens are left for the answer")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_step(TeacherStep(), argv)


if __name__ == "__main__":
    sys.exit(main())
