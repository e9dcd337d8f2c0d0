"""Quality filtering and dedup of our parquet shards, driven by a small YAML recipe.

    python -m data_process.filter --recipe data_process/recipes/default_filter.yaml \
        --input data/LLaVA_ReCap_558K --name LLaVA_ReCap_558K_filtered --output_dir data --num_processes 4

Recipe (Data-Juicer op names and defaults; ops run in order, each on what the previous ones kept)::

    text_scope: all          # text the text ops see: all | user | assistant (``<image>`` removed)
    process:
      - text_length_filter: {min_len: 10}
      - document_minhash_deduplicator: {jaccard_threshold: 0.7}
      - image_deduplicator: {method: phash}

Per-row measurements (stats, hashes, MinHash signatures) run in ``--num_processes`` workers; decisions
are taken in row order in the main process, so the output does not depend on the process count. Output:
``<output_dir>/<name>/`` with one shard per input shard (same file names, empty ones left out),
``_stats/<name>/filter_summary.json`` (kept/removed per op) and ``filter_removed.jsonl`` (one line per
removed row: file, row, op, detail). The dedup indexes grow with the number of kept rows.

A row whose text is not UTF-8 is removed before the ops, counted under ``unreadable`` (op ``input`` in the
log): rows_in = kept + removed by the ops + unreadable. Exit status 1, with one error line naming the op
that removed most, when no row is kept.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys

if __package__ in (None, ""):
    import _bootstrap  # noqa: F401

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from data_process.errors import Reject, SourceError
from data_process.files import atomic_output, update_dataset_info, write_json_atomic
from data_process.filter_ops import OPS, Sample, is_dedup
from data_process.naming import dataset_info_entry
from data_process.parquet_out import open_parquet_writer

DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", "default_filter.yaml")


def load_recipe(path: str) -> tuple[str, list]:
    """(text scope, op instances) of a recipe file; errors name the bad op or parameter."""
    try:
        with open(path, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SourceError(f"{path}: cannot read recipe ({error})") from None
    text_scope = recipe.get("text_scope", "all")
    if text_scope not in ("all", "user", "assistant"):
        raise SourceError(f"{path}: text_scope must be all, user or assistant")
    ops = []
    for entry in recipe.get("process") or []:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise SourceError(f"{path}: each process entry is one 'op_name: {{params}}' mapping, got {entry!r}")
        (name, params), = entry.items()
        if name not in OPS:
            raise SourceError(f"{path}: unknown op {name!r} (known: {', '.join(sorted(OPS))})")
        try:
            ops.append(OPS[name](**(params or {})))
        except (TypeError, ValueError) as error:
            raise SourceError(f"{path}: {name}: {error}") from None
    if not ops:
        raise SourceError(f"{path}: the recipe has no ops under 'process'")
    return text_scope, ops


_worker_state: tuple[str, list] | None = None


def _init_worker(text_scope: str, ops: list) -> None:
    global _worker_state
    _worker_state = (text_scope, ops)


def _measure_row(sample: Sample, ops: list) -> list:
    results = []
    for op in ops:
        try:
            results.append(op.signature(sample) if is_dedup(op) else op.stat(sample))
        except Exception as error:  # an unreadable image, say: the op removes the row
            results.append(Reject("measure_error", f"{type(error).__name__}: {error}"))
    return results


def _messages(column: pa.ChunkedArray) -> list[list | Reject]:
    """The ``messages`` cells; a row whose text is not UTF-8 is a ``bad_utf8`` Reject (Arrow reads it as is)."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    cells = []
    for i in range(len(column)):
        try:
            cells.append(column.slice(i, 1).to_pylist()[0])
        except UnicodeDecodeError as error:
            cells.append(Reject("bad_utf8", f"text is not UTF-8 near {error.object[error.start:error.start + 20]!r}"))
    return cells


def _measure_row_group(task: tuple[str, int, int]) -> list[list | Reject]:
    """Per row of one row group: for each op its stat (filters) or signature (dedup); a Reject for a row
    that cannot be read."""
    path, group, _ = task
    text_scope, ops = _worker_state
    table = pq.ParquetFile(path).read_row_group(group, columns=["messages", "images"])
    out = []
    for messages, images in zip(_messages(table.column("messages")), table.column("images").to_pylist()):
        if isinstance(messages, Reject):
            out.append(messages)
            continue
        sample = Sample(messages or [], [img["bytes"] for img in images or [] if img and img["bytes"]], text_scope)
        out.append(_measure_row(sample, ops))
    return out


class FilterRun:
    """Sequential decisions over measured rows; counts per op and the removed-rows log."""

    def __init__(self, ops: list, removed_log):
        self.ops = ops
        self.indexes = [op.new_index() if is_dedup(op) else None for op in ops]
        self.reached = [0] * len(ops)
        self.removed = [0] * len(ops)
        self.unreadable: dict[str, int] = {}
        self.removed_log = removed_log

    def keep(self, results: list | Reject, file_name: str, row: int) -> bool:
        ref = f"{file_name}:{row}"
        if isinstance(results, Reject):  # not measured: the row cannot be read
            self.unreadable[results.reason] = self.unreadable.get(results.reason, 0) + 1
            record = {"file": file_name, "row": row, "op": "input", "reason": results.reason, "detail": results.detail}
            self.removed_log.write(json.dumps(record, ensure_ascii=False) + "\n")
            return False
        for i, (op, result) in enumerate(zip(self.ops, results)):
            self.reached[i] += 1
            if isinstance(result, Reject):
                detail = result.detail
            elif self.indexes[i] is not None:
                first = self.indexes[i].seen(result, ref)
                detail = None if first is None else f"duplicate of {first}"
            else:
                detail = None if op.keep(result) else f"stat {result}"
            if detail is not None:
                self.removed[i] += 1
                record = {"file": file_name, "row": row, "op": op.name, "detail": detail}
                self.removed_log.write(json.dumps(record, ensure_ascii=False) + "\n")
                return False
        return True

    def summary(self, rows_in: int, kept: int) -> dict:
        ops = [{"op": op.name, "params": {k: v for k, v in vars(op).items() if not k.startswith("_")},
                "rows_in": n, "removed": r, "kept": n - r}
               for op, n, r in zip(self.ops, self.reached, self.removed)]
        return {"rows_in": rows_in, "kept": kept, "unreadable": dict(sorted(self.unreadable.items())),
                "ops": json.loads(json.dumps(ops, default=str))}


def input_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
    else:
        files = [path] if path.endswith(".parquet") else []
    if not files:
        raise SourceError(f"{path}: no parquet shards" if os.path.exists(path) else f"{path}: no such file or folder")
    for file in files:
        try:
            names = pq.ParquetFile(file).schema_arrow.names
        except (OSError, pa.ArrowException) as error:
            raise SourceError(f"{file}: not a readable parquet file ({error})") from None
        if "messages" not in names or "images" not in names:
            raise SourceError(f"{file}: needs 'messages' and 'images' columns (has {', '.join(names)})")
    return files


def run_filter(input_path: str, recipe_path: str, output_dir: str, name: str, num_processes: int = 1,
               progress: bool = True) -> dict:
    text_scope, ops = load_recipe(recipe_path)
    files = input_files(input_path)
    shard_dir, stats_dir = os.path.join(output_dir, name), os.path.join(output_dir, "_stats", name)
    if os.path.realpath(shard_dir) == os.path.realpath(os.path.dirname(files[0])):
        raise SourceError("the output folder is the input folder: choose another --name or --output_dir")
    shutil.rmtree(shard_dir, ignore_errors=True)
    tasks, total = [], 0  # (file, row group, first row of the group in its file)
    for path in files:
        metadata, first_row = pq.ParquetFile(path).metadata, 0
        for group in range(metadata.num_row_groups):
            tasks.append((path, group, first_row))
            first_row += metadata.row_group(group).num_rows
        total += first_row
    removed_path = os.path.join(stats_dir, "filter_removed.jsonl")
    rows_in = kept = 0
    output = _OutputShards(output_dir, name)
    try:
        with atomic_output(removed_path) as removed_log, \
                tqdm(total=total, unit="row", desc=name, disable=not progress, dynamic_ncols=True) as bar, \
                _measurements(tasks, text_scope, ops, num_processes) as measured:
            run = FilterRun(ops, removed_log)
            for (path, group, first_row), results in zip(tasks, measured):
                file_name = os.path.basename(path)
                keep = [r for r, res in enumerate(results) if run.keep(res, file_name, first_row + r)]
                rows_in += len(results)
                kept += len(keep)
                bar.update(len(results))
                if keep:
                    table = pq.ParquetFile(path).read_row_group(group)
                    output.write(file_name, table.take(keep))
            output.close()
    except BaseException:
        output.abort()
        raise
    summary = {"name": name, "input": input_path, "recipe": recipe_path, "text_scope": text_scope,
               **run.summary(rows_in, kept)}
    write_json_atomic(os.path.join(stats_dir, "filter_summary.json"), summary)
    if kept:
        update_dataset_info(output_dir, {name: dataset_info_entry(name)})
    return summary


class _OutputShards:
    """One output shard per input shard, written to .tmp and renamed into place when complete."""

    def __init__(self, output_dir: str, name: str):
        self.output_dir, self.name = output_dir, name
        self.current: tuple[str, pq.ParquetWriter, str] | None = None

    def write(self, file_name: str, table) -> None:
        if self.current is None or self.current[0] != file_name:
            self.close()
            tmp = os.path.join(self.output_dir, ".tmp", f"{self.name}-{file_name}.partial")
            self.current = (file_name, open_parquet_writer(tmp, table.schema), tmp)
        self.current[1].write_table(table)

    def close(self) -> None:
        if self.current is None:
            return
        file_name, writer, tmp = self.current
        writer.close()
        final = os.path.join(self.output_dir, self.name, file_name)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(tmp, final)
        self.current = None

    def abort(self) -> None:
        """Drop the shard being written (finished shards stay: they are complete)."""
        if self.current is not None:
            _, writer, tmp = self.current
            self.current = None
            writer.close()
            os.remove(tmp)


class _measurements:
    """Measurements of ``tasks`` in order: in worker processes, or in this one for a single process."""

    def __init__(self, tasks, text_scope, ops, processes):
        self.tasks, self.text_scope, self.ops, self.processes = tasks, text_scope, ops, processes
        self.pool = None

    def __enter__(self):
        if self.processes > 1 and len(self.tasks) > 1:
            context = multiprocessing.get_context("spawn")
            self.pool = context.Pool(self.processes, initializer=_init_worker, initargs=(self.text_scope, self.ops))
            return self.pool.imap(_measure_row_group, self.tasks)
        _init_worker(self.text_scope, self.ops)
        return map(_measure_row_group, self.tasks)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Filter and deduplicate parquet shards with a YAML recipe "
                                                 "(Data-Juicer op names and defaults).")
    parser.add_argument("--input", required=True, help="a shard folder (or one parquet file) written by these tools")
    parser.add_argument("--name", required=True, help="output dataset name (shard folder, dataset_info key)")
    parser.add_argument("--output_dir", required=True, help="where <name>/ and _stats/<name>/ are written")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="YAML recipe (default: %(default)s)")
    parser.add_argument("--num_processes", type=int, default=os.cpu_count() or 1,
                        help="worker processes for the measurements (default: %(default)s)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run_filter(args.input, args.recipe, args.output_dir, args.name, args.num_processes,
                             not args.no_progress)
    except (SourceError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.name}: kept {summary['kept']:,} of {summary['rows_in']:,} rows")
    for reason, count in summary["unreadable"].items():
        print(f"  unreadable ({reason}): {count:,} removed")
    for op in summary["ops"]:
        print(f"  {op['op']}: {op['rows_in']:,} in, {op['removed']:,} removed, {op['kept']:,} kept")
    if summary["rows_in"] and not summary["kept"]:
        worst = max(summary["ops"], key=lambda op: op["removed"])
        unreadable = sum(summary["unreadable"].values())
        if unreadable > worst["removed"]:
            cause = f"{unreadable:,} could not be read ({', '.join(summary['unreadable'])})"
        else:
            cause = (f"{worst['op']} removed {worst['removed']:,} (params {json.dumps(worst['params'])}): "
                     f"check the recipe {args.recipe}")
        print(f"error: {args.name}: kept 0 of {summary['rows_in']:,} rows; {cause}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
