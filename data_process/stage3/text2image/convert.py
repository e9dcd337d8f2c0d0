"""Turn judged teacher answers into text-to-image training samples (stage 3).

The *question itself* is rendered into one or more images (see ``render.py``); the user turn is one
``<image>`` per page plus a short instruction (and `` /no_think`` for no-think samples), the assistant turn
is the teacher's answer with its ``<think>`` block (GLM ``<answer>`` and box markers removed, as in the image
pipeline). With ``--processor`` (the student model), a row whose training sequence is longer than
``--cutoff_len`` is dropped as ``too_long`` rather than cut by the trainer. Output: one parquet file (PNG bytes
embedded, ``messages`` + ``images`` with HF features metadata), written atomically, rows in input order.

    python data_process/stage3/text2image/convert.py --input_files evaluated_generated_responses_Qwen3-32B.json \\
        --output_file ./LLaMA-Factory/data/text2image.parquet --max_workers 8
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import random
import re
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from data_process.stage3.judge import FormatError, teacher_answer
from data_process.stage3.length import add_length_args, training_length
from data_process.stage3.prompts import NO_THINK, rendered_instruction
from data_process.stage3.records import (
    ParquetSink,
    image_cell,
    read_records,
    require_paths,
    stats_path,
    write_json_atomic,
)
from data_process.stage3.render import RenderConfig, RenderError, language_of, render_text
from data_process.stage3.runner import one_line_os_errors, stable_seed

IMAGE_PLACEHOLDER = "<image>"
_MEDIA_TAG = re.compile(r"<(image|video|audio)>", re.IGNORECASE)

log = logging.getLogger("text2image.convert")


def convert_record(record: dict, config: RenderConfig, seed: int,
                   length: tuple | None = None) -> tuple[dict | None, str | None]:
    """``(row, None)`` for a training row, ``(None, reason)`` for a dropped record.

    ``length`` is ``(processor path, cutoff_len, min_pixels, max_pixels)`` or None (no length check).
    """
    query, response = record.get("query") or "", record.get("response") or ""
    if _MEDIA_TAG.search(response) or _MEDIA_TAG.search(query):
        return None, "media_tag_in_text"
    try:
        response, _, _ = teacher_answer(response, require_thought=record.get("mode") != "no_thinking")
    except FormatError as err:
        return None, f"format_{err.reason}"
    sample_id = record.get("id") or query
    try:
        rendered = render_text(query, config, random.Random(stable_seed(seed, sample_id, "render")))
    except RenderError as err:
        return None, f"render_{err.reason}"
    pages = len(rendered.pages)
    user = IMAGE_PLACEHOLDER * pages + "\n" + rendered_instruction(language_of(query), pages)
    if record.get("mode") == "no_thinking":
        user += NO_THINK
    row = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": response}],
           "images": [image_cell(page) for page in rendered.pages]}
    if length is not None:
        processor, cutoff_len, min_pixels, max_pixels = length
        if training_length(processor, min_pixels, max_pixels).count(row["messages"], rendered.pages) > cutoff_len:
            return None, "too_long"
    return row, None


def _convert_job(job: tuple) -> tuple[dict | None, str | None]:
    return convert_record(*job)


def input_paths(args: argparse.Namespace) -> list[str]:
    paths = list(args.input_files or [])
    require_paths(*paths)
    if args.input_pattern:
        matched = sorted(glob.glob(args.input_pattern))
        if not matched:
            raise SystemExit(f"error: {args.input_pattern}: no file matches")
        paths += matched
    if not paths:
        raise SystemExit("error: no input files (use --input_files or --input_pattern)")
    return paths


def unique_records(records: list[dict], counts: Counter) -> list[dict]:
    """The first record of each id (inputs may overlap)."""
    seen, out = set(), []
    for rec in records:
        key = rec.get("id") or (rec.get("query"), rec.get("mode"), rec.get("response"))
        if key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(key)
        out.append(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with one_line_os_errors():
        return convert(args)


def convert(args: argparse.Namespace) -> int:
    output = args.output_file if args.output_file.endswith(".parquet") else args.output_file + ".parquet"
    config = RenderConfig(fonts=tuple(args.font or ()), font_size=args.font_size, width=args.image_width,
                          max_pixels=args.max_image_pixels, max_pages=args.max_pages, margin=args.margin)
    counts: Counter = Counter()
    paths = input_paths(args)
    length = None
    if args.processor:
        length = (args.processor, args.cutoff_len, args.train_image_min_pixels, args.train_image_max_pixels)
    else:
        log.warning("no --processor: rows are not measured against --cutoff_len %d; the trainer may cut long ones",
                    args.cutoff_len)
    read = Counter()
    records = unique_records(read_records(paths, read), counts)
    counts.update(read)
    jobs = ((rec, config, args.seed, length) for rec in records)
    workers = max(1, args.max_workers or 1)
    pool = ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext()
    with ParquetSink(output) as sink, pool:
        results = pool.map(_convert_job, jobs, chunksize=16) if workers > 1 else map(_convert_job, jobs)
        for row, reason in results:
            _collect(sink, row, reason, counts)
    modes = Counter(r.get("mode", "unknown") for r in records)
    stats = {"input records": len(records) + counts["duplicate"] + sum(read.values()), "written": sink.rows,
             "length check": f"cutoff_len {args.cutoff_len}" if length else "off",
             "dropped by reason": {k: v for k, v in counts.items() if k != "pages"},
             "pages": counts["pages"], "modes": dict(modes)}
    write_json_atomic(stats_path(output), stats)
    log.info("wrote %d rows to %s; %s", sink.rows, output, stats)
    return 0


def _collect(sink: ParquetSink, row: dict | None, reason: str | None, counts: Counter) -> None:
    if row is None:
        counts[reason] += 1
        return
    counts["pages"] += len(row["images"])
    sink.add(row)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_files", nargs="+", help="outputs of text2image/evaluate.py")
    p.add_argument("--input_pattern", help="glob of input files")
    p.add_argument("--output_file", required=True, help=".parquet is appended if missing")
    p.add_argument("--max_workers", type=int, default=None, help="rendering processes (default 1)")
    p.add_argument("--seed", type=int, default=42, help="seed of the per-sample colours")
    g = p.add_argument_group("rendering")
    g.add_argument("--font", action="append",
                   help="font file (path or path:index) or fontconfig pattern to try first; repeatable; "
                        "also $DISTILL_FONT")
    g.add_argument("--font_size", type=int, default=22)
    g.add_argument("--image_width", type=int, default=672)
    g.add_argument("--margin", type=int, default=24)
    g.add_argument("--max_image_pixels", type=int, default=262144,
                   help="pixel budget per image (keep <= the training image_max_pixels so text stays sharp)")
    g.add_argument("--max_pages", type=int, default=6, help="longer questions are dropped, never cut")
    add_length_args(p)
    p.add_argument("--log_level", default="INFO")
    args = p.parse_args(argv)
    if not args.input_files and not args.input_pattern:
        p.error("one of --input_files or --input_pattern is required")
    return args


if __name__ == "__main__":
    sys.exit(main())
