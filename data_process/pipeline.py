"""Runs one dataset through a row converter into LLaMA-Factory parquet shards: planning, resume,
parallel workers, progress, per-shard stats/rejects, summary and ``dataset_info.json``.

Output layout under ``--output_dir`` (the shard folder holds nothing but finished shards, because
LLaMA-Factory reads every file of a ``file_name`` folder)::

    <name>/<name>-00000-of-00012.parquet   finished shards, renamed into place atomically
    _stats/<name>/plan.json                 settings the shards were cut with (a rerun must match them)
    _stats/<name>/shard-00000.json          per-shard counts; written last, marks the shard as done
    _stats/<name>/shard-00000.rejects.jsonl one line per dropped row: id, row, source, reason, detail
    _stats/<name>/summary.json              totals: rows_in = kept + sum(rejected), always
    .tmp/                                   partial files while a shard is being written
    dataset_info.json                       merged entries of every finished output

Exit status of ``run_jobs``: 1 when a dataset failed or kept no row at all (unless the job says it may be
empty, as text-only OneVision configs are), after one ``error:`` line that names the main reject reason and
what to pass; a reason that drops half the rows or more is a ``warning:`` line. Otherwise 0.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import forkserver
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from .errors import Reject, SourceError
from .files import read_json, update_dataset_info, write_json_atomic
from .images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_CHECKS, ImagePolicy
from .naming import dataset_info_entry
from .parquet_out import RejectLog, ShardWriter, int32_array, output_table
from .paths import IMAGE_ROOTS_ENV
from .sources import (
    SURROGATE,
    InputFile,
    RowBatch,
    ShardSpec,
    iter_shard_batches,
    plan_shards,
    resolve_hub_files,
    scan_input,
)

PLAN_VERSION = 2


@dataclass(frozen=True)
class DatasetJob:
    """One output dataset: where its rows come from and how they are converted."""

    name: str
    converter: Any
    location: str = ""  # hub id or local dir in the hub layout, resolved with `datasets`
    config: str | None = None
    files: tuple[str, ...] = ()  # explicit input files instead of `location`
    may_be_empty: bool = False  # keeping no row is expected (text-only configs), not a failure

    def input_files(self) -> list[str]:
        return list(self.files) if self.files else resolve_hub_files(self.location, self.config)


@dataclass(frozen=True)
class RunOptions:
    output_dir: str
    num_processes: int = 1
    rows_per_shard: int = 5000
    limit: int | None = None  # --test_mode: only the first rows
    max_samples: int | None = None
    seed: int = 0
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Layout:
    output_dir: str
    name: str

    @property
    def shard_dir(self) -> str:
        return os.path.join(self.output_dir, self.name)

    @property
    def stats_dir(self) -> str:
        return os.path.join(self.output_dir, "_stats", self.name)

    @property
    def plan_path(self) -> str:
        return os.path.join(self.stats_dir, "plan.json")

    @property
    def summary_path(self) -> str:
        return os.path.join(self.stats_dir, "summary.json")

    def shard_path(self, spec: ShardSpec) -> str:
        return os.path.join(self.shard_dir, f"{self.name}-{spec.index:05d}-of-{spec.count:05d}.parquet")

    def tmp_path(self, spec: ShardSpec) -> str:
        return os.path.join(self.output_dir, ".tmp", f"{self.name}-{spec.index:05d}.parquet.partial")

    def stats_path(self, spec: ShardSpec) -> str:
        return os.path.join(self.stats_dir, f"shard-{spec.index:05d}.json")

    def rejects_path(self, spec: ShardSpec) -> str:
        return os.path.join(self.stats_dir, f"shard-{spec.index:05d}.rejects.jsonl")

    def rejects_tmp_path(self, spec: ShardSpec) -> str:
        return os.path.join(self.output_dir, ".tmp", f"{self.name}-{spec.index:05d}.rejects.jsonl.partial")

    def leftovers(self) -> list[str]:
        """Partial files of this dataset in ``.tmp`` (a killed or failed run leaves them)."""
        return glob.glob(os.path.join(self.output_dir, ".tmp", f"{glob.escape(self.name)}-*.partial"))


# ----------------------------------------------------------------------------------------------- one shard

def _convert_row(converter: Any, row: Any) -> Any:
    if isinstance(row, Reject):  # the reader could not read this row (bad_utf8, bad_unicode)
        raise row
    if isinstance(row, Exception):  # a JSONL line that did not parse
        raise Reject("invalid_json", str(row))
    try:
        result = converter.convert(row)
    except Reject:
        raise
    except Exception as error:  # bad data must not stop a run; the reason says what happened
        raise Reject("unexpected_error", f"{type(error).__name__}: {error}") from None
    for message in result.messages:  # JSON decoded by a converter (synthdog's ground truth) may hold one
        if SURROGATE.search(message["content"]):
            raise Reject("bad_unicode", f"lone surrogate in the {message['role']} text")
    return result


def _image_values(images: list[list], batch: RowBatch) -> pa.Array:
    """The kept rows' images as one binary array: taken in Arrow from the batch when every image is one of
    its views, else (re-encoded or file images) built from the bytes."""
    flat = [image for row_images in images for image in row_images]
    found = [batch.position(image) for image in flat]
    if found and all(f is not None and f[0] == found[0][0] for f in found):
        values = batch.binary[found[0][0]]
        positions = [f[1] for f in found]
        return values if positions == list(range(len(values))) else values.take(int32_array(positions))
    return pa.array(flat, pa.binary())


def process_shard(converter: Any, spec: ShardSpec, layout: Layout, report: Callable[[int], None]) -> dict:
    """Convert one shard; write its parquet, rejects and stats (stats last: the "done" marker)."""
    started = time.time()
    writer = ShardWriter(layout.shard_path(spec), layout.tmp_path(spec))
    rejects = RejectLog(layout.rejects_path(spec), layout.name, layout.rejects_tmp_path(spec))
    rejected, reencoded, seen = Counter(), 0, 0
    try:
        for batch in iter_shard_batches(spec, converter.columns):
            messages, images = [], []
            for row_index, row in zip(batch.indices, batch.rows):
                try:
                    result = _convert_row(converter, row)
                except Reject as reject:
                    rejected[reject.reason] += 1
                    parsed = row.record if isinstance(row, Reject) else None if isinstance(row, Exception) else row
                    row_id = None if parsed is None else converter.row_id(parsed)
                    rejects.add(row_id, row_index, reject)
                    continue
                messages.append(result.messages)
                images.append(result.images)
                reencoded += result.reencoded
            if messages:
                counts = [len(row_images) for row_images in images]
                writer.add_table(output_table(messages, _image_values(images, batch), counts))
            seen += len(batch.rows)
            report(len(batch.rows))
        if seen < spec.num_rows:  # rows left out by --max_samples
            rejected["not_sampled"] += spec.num_rows - seen
        kept = writer.commit()
        rejects.commit()
    except BaseException:
        writer.abort()
        rejects.abort()
        raise
    report(spec.num_rows - seen)
    stats = {
        "shard": spec.index,
        "file": os.path.basename(layout.shard_path(spec)) if kept else None,
        "input": spec.input.path,
        "input_rows": [spec.first_row, spec.first_row + spec.num_rows],
        "rows_in": spec.num_rows,
        "kept": kept,
        "rejected": dict(sorted(rejected.items())),
        "reencoded_images": reencoded,
        "seconds": round(time.time() - started, 3),
    }
    assert stats["rows_in"] == kept + sum(rejected.values()), stats
    write_json_atomic(layout.stats_path(spec), stats)
    return stats


_worker_queue = None


def _init_worker(queue) -> None:
    global _worker_queue
    _worker_queue = queue


def _report_to_queue(rows: int) -> None:
    _worker_queue.put(("rows", rows))


def _pool_task(converter: Any, spec: ShardSpec, layout: Layout) -> dict:
    return process_shard(converter, spec, layout, _report_to_queue)


def _worker_context(start: bool = False):
    """Workers fork from a server that imported the pipeline once: spawn imports pyarrow again in every worker
    (about a second each), and a plain fork is unsafe once Arrow or tqdm threads run here. ``start`` starts
    the server now, so its imports overlap with planning."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, f"{__package__}.rules"])
    if start:
        forkserver.ensure_running()
    return context


def _run_in_pool(converter: Any, specs: list[ShardSpec], layout: Layout, processes: int, bar: tqdm) -> None:
    context = _worker_context()
    queue = context.Queue()
    with context.Pool(processes, initializer=_init_worker, initargs=(queue,)) as pool:
        for spec in specs:
            pool.apply_async(_pool_task, (converter, spec, layout),
                             callback=lambda stats: queue.put(("done", stats)),
                             error_callback=lambda error: queue.put(("error", error)))
        remaining = len(specs)
        while remaining:
            kind, payload = queue.get()
            if kind == "rows":
                bar.update(payload)
            elif kind == "done":
                remaining -= 1
            else:
                pool.terminate()
                raise payload


# ----------------------------------------------------------------------------------------------- one dataset

def _shard_done(layout: Layout, spec: ShardSpec) -> bool:
    stats = read_json(layout.stats_path(spec))
    return stats is not None and (stats["file"] is None or os.path.exists(layout.shard_path(spec)))


def _plan_record(job: DatasetJob, inputs: list[InputFile], options: RunOptions) -> dict:
    return {
        "version": PLAN_VERSION,
        "name": job.name,
        "inputs": [{"file": os.path.basename(f.path), "rows": f.rows} for f in inputs],
        "rows_per_shard": options.rows_per_shard,
        "limit": options.limit,
        "max_samples": options.max_samples,
        "seed": options.seed,
        "converter": repr(job.converter),
    }


def _check_resumable(layout: Layout, plan: dict) -> None:
    previous = read_json(layout.plan_path)
    if previous is None:
        if os.path.isdir(layout.shard_dir) and os.listdir(layout.shard_dir):
            raise SourceError(f"{layout.shard_dir} exists and was not written by this tool: pass --overwrite")
    elif previous != plan:
        changed = sorted(k for k in plan if plan[k] != previous.get(k))
        raise SourceError(f"{layout.shard_dir} was written with other settings ({', '.join(changed)}): "
                          "pass --overwrite to start again")


def _remove_outputs(layout: Layout) -> None:
    for path in (layout.shard_dir, layout.stats_dir):
        shutil.rmtree(path, ignore_errors=True)


def _summarise(job: DatasetJob, layout: Layout, specs: list[ShardSpec]) -> dict:
    rejected, totals, files = Counter(), Counter(), []
    for spec in specs:
        stats = read_json(layout.stats_path(spec))
        rejected.update(stats["rejected"])
        totals.update(rows_in=stats["rows_in"], kept=stats["kept"], reencoded_images=stats["reencoded_images"])
        if stats["file"]:
            files.append(stats["file"])
    return {
        "name": job.name,
        "source": job.location or list(job.files),
        "config": job.config,
        "rows_in": totals["rows_in"],
        "kept": totals["kept"],
        "rejected": dict(sorted(rejected.items())),
        "reencoded_images": totals["reencoded_images"],
        "shards": len(specs),
        "files": files,
    }


def run_dataset(job: DatasetJob, options: RunOptions) -> dict:
    """Convert one dataset (resuming finished shards) and return its summary."""
    layout = Layout(options.output_dir, job.name)
    if options.overwrite:
        _remove_outputs(layout)
    inputs = [scan_input(path, options.rows_per_shard) for path in job.input_files()]
    specs = plan_shards(inputs, options.rows_per_shard, options.limit, options.max_samples, options.seed)
    plan = _plan_record(job, inputs, options)
    _check_resumable(layout, plan)
    write_json_atomic(layout.plan_path, plan)

    pending = [spec for spec in specs if not _shard_done(layout, spec)]
    total_rows = sum(spec.num_rows for spec in specs)
    done_rows = total_rows - sum(spec.num_rows for spec in pending)
    try:
        with tqdm(total=total_rows, initial=done_rows, unit="row", desc=job.name, disable=not options.progress,
                  dynamic_ncols=True) as bar:
            processes = min(options.num_processes, len(pending))
            if processes > 1:
                _run_in_pool(job.converter, pending, layout, processes, bar)
            else:
                for spec in pending:
                    process_shard(job.converter, spec, layout, bar.update)
    finally:  # partial files of an earlier killed run, or of workers stopped by another one's error
        for leftover in layout.leftovers():
            os.remove(leftover)
    summary = _summarise(job, layout, specs)
    write_json_atomic(layout.summary_path, summary)
    if summary["kept"]:
        update_dataset_info(options.output_dir, {job.name: dataset_info_entry(job.name)})
    else:  # nothing to train on (e.g. text-only OneVision configs): no folder, no entry
        shutil.rmtree(layout.shard_dir, ignore_errors=True)
        update_dataset_info(options.output_dir, {}, remove=[job.name])
    return summary


def summary_line(summary: dict) -> str:
    reasons = ", ".join(f"{k}={v:,}" for k, v in summary["rejected"].items()) or "none"
    return (f"{summary['name']}: kept {summary['kept']:,} of {summary['rows_in']:,} rows "
            f"(rejected: {reasons}) in {len(summary['files'])} shard file(s)")


# What to do when most rows are rejected for one reason.
REJECT_HINTS = {
    "image_path_outside_roots": f"Pass --image_roots with the folder the image paths are relative to "
                                f"(or set ${IMAGE_ROOTS_ENV})",
    "image_not_found": f"Check that --image_roots (or ${IMAGE_ROOTS_ENV}) is the folder the image paths are "
                       f"relative to",
    "image_missing": "The rows have no image: a text-only dataset?",
    "missing_image_tag": "The first user turn has no <image> tag, and this dataset's rule requires one",
    "invalid_json": "Is the file JSON Lines? A .json file must hold one JSON array",
    "bad_utf8": "The file is not UTF-8 text: convert it (e.g. iconv -f LATIN1 -t UTF-8)",
    "malformed_row": "The records are not LLaVA-style objects (id, image, conversations)",
}
DOMINANT_SHARE = 0.5  # a reason that rejects this share of the rows or more is reported


def _first_detail(layout: Layout, reason: str) -> str:
    """Row, id and detail of the first row rejected for ``reason`` (from the shard reject logs)."""
    for path in sorted(glob.glob(os.path.join(glob.escape(layout.stats_dir), "shard-*.rejects.jsonl"))):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                if record["reason"] == reason:
                    detail = f": {record['detail']}" if record["detail"] else ""
                    return f"first: row {record['row']}, id {record['id']}{detail}"
    return ""


def rejection_report(summary: dict, layout: Layout, may_be_empty: bool = False) -> tuple[str, str] | None:
    """("error"|"warning", one line) when no row was kept, or one reason rejected most of the rows."""
    rows = summary["rows_in"] - summary["rejected"].get("not_sampled", 0)
    reasons = sorted(((n, r) for r, n in summary["rejected"].items() if r != "not_sampled"), reverse=True)
    if summary["kept"] == 0 and may_be_empty:
        return None
    if summary["kept"] == 0 and not reasons:
        source = summary["source"] if isinstance(summary["source"], str) else ", ".join(summary["source"])
        return "error", f"{summary['name']}: no input rows in {source}"
    if not reasons or reasons[0][0] < DOMINANT_SHARE * rows:
        return None
    count, reason = reasons[0]
    first = _first_detail(layout, reason)
    hint = REJECT_HINTS.get(reason, f"See {layout.stats_dir}/shard-*.rejects.jsonl")
    share = f"all {count:,}" if count == rows else f"{count:,} of {rows:,}"
    line = (f"{summary['name']}: kept {summary['kept']:,} of {summary['rows_in']:,} rows; {share} rejected as "
            f"{reason}{f' ({first})' if first else ''}. {hint}")
    return ("error" if summary["kept"] == 0 else "warning"), line


def run_jobs(jobs: list[DatasetJob], options: RunOptions) -> int:
    """Run every job; a failing dataset is reported in one line and the others still run. Exit code: see the
    module docstring."""
    failed = []
    if options.num_processes > 1:
        _worker_context(start=True)
    for job in jobs:
        try:
            summary = run_dataset(job, options)
        except (SourceError, OSError, pa.ArrowException) as error:
            kind = "" if isinstance(error, SourceError) else f"{type(error).__name__}: "
            print(f"error: {job.name}: {kind}{error}", file=sys.stderr)
            failed.append(job.name)
            continue
        print(summary_line(summary))
        report = rejection_report(summary, Layout(options.output_dir, job.name), job.may_be_empty)
        if report is not None:
            print(f"{report[0]}: {report[1]}", file=sys.stderr)
            if report[0] == "error":
                failed.append(job.name)
    if failed:
        print(f"error: {len(failed)} dataset(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------- CLI

def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def add_run_arguments(parser: argparse.ArgumentParser, default_output_dir: str, test_rows: int,
                      default_max_samples: int | None = None) -> None:
    """Flags shared by the conversion scripts."""
    parser.add_argument("--output_dir", default=default_output_dir,
                        help="where the <name>/ shard folders and dataset_info.json go (default: %(default)s)")
    parser.add_argument("--num_processes", type=positive_int, default=os.cpu_count() or 1,
                        help="worker processes (default: all %(default)s CPU cores)")
    parser.add_argument("--test_mode", action="store_true",
                        help=f"only convert the first {test_rows} rows of each dataset")
    parser.add_argument("--max_samples", type=positive_int, default=default_max_samples,
                        help="per dataset, a seeded uniform sample of this many input rows, kept in input order; "
                             "rejected rows are not replaced (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max_samples selection (default: 0)")
    parser.add_argument("--rows_per_shard", type=positive_int, default=5000,
                        help="input rows per output shard; also the unit of resume (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete earlier output of the selected datasets instead of resuming it")
    parser.add_argument("--image_check", choices=IMAGE_CHECKS, default="structure",
                        help="structure (default): check JPEG and PNG structure (markers, end marker, chunk CRCs, "
                             "size) without decoding pixels, decode the rare other formats; decode: also decode "
                             "every JPEG and PNG (several times slower)")
    parser.add_argument("--max_image_pixels", type=positive_int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="reject larger images as decompression bombs (default: %(default)s)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")


def add_source_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", action="append", default=[], metavar="NAME=LOCAL_DIR",
                        help="read NAME (a hub id or output name) from a local copy in the hub repo's layout "
                             "instead of the hub; repeatable")


def parse_sources(parser: argparse.ArgumentParser, values: list[str]) -> dict[str, str]:
    sources = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            parser.error(f"--source expects NAME=LOCAL_DIR, got {value!r}")
        if not os.path.isdir(path):
            parser.error(f"--source {name}: {path} is not a directory")
        sources[name] = path
    return sources


def run_options(args: argparse.Namespace, test_rows: int) -> RunOptions:
    return RunOptions(
        output_dir=args.output_dir,
        num_processes=args.num_processes,
        rows_per_shard=args.rows_per_shard,
        limit=test_rows if args.test_mode else None,
        max_samples=args.max_samples,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def image_policy(args: argparse.Namespace) -> ImagePolicy:
    return ImagePolicy(max_pixels=args.max_image_pixels, check=args.image_check)
