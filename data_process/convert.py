"""Format converters between LLaVA JSON(L), Data-Juicer JSONL, MMBench TSV and our parquet.

    python -m data_process.convert llava-to-parquet blip_laion_cc_sbu_558k.json --image_roots images/ --name pretrain
    python -m data_process.convert dj-to-parquet dj.jsonl --image_roots data/ --name dj_captions
    python -m data_process.convert mmbench-to-parquet MMBench_DEV_EN.tsv --name mmbench_dev_en
    python -m data_process.convert parquet-to-llava out/pretrain --output pretrain.json --image_folder images/
    python -m data_process.convert llava-to-dj pretrain.json --output pretrain.jsonl
    python -m data_process.convert dj-to-llava pretrain.jsonl --output pretrain.json
    python -m data_process.convert parquet-to-dj out/pretrain --output pretrain.jsonl --image_folder images/

The ``*-to-parquet`` commands run through the same pipeline as the hub scripts (rules, image checks,
stats/rejects, resume, ``--num_processes``). Image paths are only read below ``--image_roots`` (or
``$QWEN_MERGE_IMAGE_ROOTS``); anything else is rejected with ``image_path_outside_roots``. A record that
cannot be read (not UTF-8: ``bad_utf8``; a lone surrogate escape: ``bad_unicode``; bad JSON) is one counted
reject. In a ``.json`` array the unit is the element: a bad byte or escape inside one rejects that element
only, while a syntax error (a bad byte between elements included) stops the file with one line naming the
byte, since where the next element starts is then unknown. Exit status 1 when nothing at all was kept (the
error line says why and what to pass), 2 for a missing input.

The JSON-to-JSON commands (``llava-to-dj``, ``dj-to-llava``) copy every record or stop: a record they
cannot read is one error line naming its byte, and the output file is not written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator

if __package__ in (None, ""):
    import _bootstrap  # noqa: F401

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_process import pipeline
from data_process.errors import Reject, SourceError
from data_process.files import atomic_output
from data_process.formats import (
    DEFAULT_CAPTION_PROMPT,
    DjRowConverter,
    DjTokens,
    MmbenchRowConverter,
    dj_to_llava,
    llava_to_dj,
)
from data_process.paths import IMAGE_ROOTS_ENV, image_roots
from data_process.rules import LlavaRowConverter, messages_to_conversations
from data_process.sources import iter_json_records

TEST_ROWS = 1000
SINGLE_SHARD = 1 << 62


# ----------------------------------------------------------------------------------------------- writers

def write_records(path: str, records: Iterable[dict]) -> int:
    """Stream records to ``path``: a JSON array for ``.json``, one object a line otherwise."""
    as_array = path.lower().endswith(".json")
    count = 0
    with atomic_output(path) as handle:
        handle.write("[\n" if as_array else "")
        for record in records:
            if as_array and count:
                handle.write(",\n")
            handle.write(json.dumps(record, ensure_ascii=False))
            handle.write("" if as_array else "\n")
            count += 1
        handle.write("\n]\n" if as_array else "")
    return count


def read_records(path: str) -> Iterator[dict]:
    kind = "json" if path.lower().endswith(".json") else "jsonl"
    for offset, record in iter_json_records(path, kind):
        if isinstance(record, Reject):
            raise SourceError(f"{path}: record at byte {offset}: {record} (the *-to-parquet commands skip and "
                              "count such records)")
        if isinstance(record, Exception):
            raise SourceError(f"{path}: invalid JSON line at byte {offset} ({record})")
        yield record


def parquet_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
    else:
        files = [path]
    if not files:
        raise SourceError(f"{path}: no parquet files")
    return files


def export_image(data: bytes, folder: str) -> str:
    """Save image bytes once under ``folder`` as ``<sha1>.<ext>``; return the file name."""
    image_format = (Image.open(io.BytesIO(data)).format or "bin").lower()
    name = f"{hashlib.sha1(data).hexdigest()}.{'jpg' if image_format in ('jpeg', 'mpo') else image_format}"
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        with atomic_output(path, "wb") as handle:
            handle.write(data)
    return name


def parquet_to_llava_records(path: str, image_folder: str) -> Iterator[dict]:
    """Our parquet rows as LLaVA records; images are exported to ``image_folder``."""
    index = 0
    for file in parquet_files(path):
        try:
            batches = pq.ParquetFile(file).iter_batches(batch_size=64, columns=["messages", "images"])
        except (OSError, pa.ArrowException) as error:
            raise SourceError(f"{file}: not a readable parquet file with messages and images ({error})") from None
        for batch in batches:
            try:
                rows = batch.to_pylist()
            except UnicodeDecodeError as error:
                raise SourceError(f"{file}: a string near row {index} is not UTF-8 ({error.reason})") from None
            for row in rows:
                images = row["images"] or []
                if len(images) != 1:
                    raise SourceError(f"{file}: row with {len(images)} images; LLaVA records hold one")
                yield {"id": str(index), "image": export_image(images[0]["bytes"], image_folder),
                       "conversations": messages_to_conversations(row["messages"])}
                index += 1


def first_questions(llava_path: str) -> dict[str, str]:
    """id -> first human turn of a LLaVA JSON(L) file (to restore questions of DJ caption data)."""
    return {str(r.get("id")): r["conversations"][0]["value"] for r in read_records(llava_path)}


# ----------------------------------------------------------------------------------------------- commands

def _tokens(args: argparse.Namespace) -> DjTokens:
    return DjTokens(image=args.image_token, eoc=args.eoc_token)


def _roots(args: argparse.Namespace) -> tuple[str, ...]:
    return image_roots(args.image_roots)


def _to_parquet(args: argparse.Namespace, converter, rows_per_shard: int | None = None) -> int:
    options = pipeline.run_options(args, TEST_ROWS)
    if rows_per_shard is not None:
        options = dataclasses.replace(options, rows_per_shard=rows_per_shard)
    job = pipeline.DatasetJob(name=args.name, converter=converter, files=(os.path.abspath(args.input),))
    return pipeline.run_jobs([job], options)


def cmd_llava_to_parquet(args: argparse.Namespace) -> int:
    converter = LlavaRowConverter(image_policy=pipeline.image_policy(args), image_roots=_roots(args))
    return _to_parquet(args, converter)


def cmd_dj_to_parquet(args: argparse.Namespace) -> int:
    roots = _roots(args)
    # DJ image paths are relative to the dataset file; they must still lie below the roots
    llava = LlavaRowConverter(image_policy=pipeline.image_policy(args), image_roots=roots,
                              image_bases=(os.path.dirname(os.path.abspath(args.input)),) + roots)
    return _to_parquet(args, DjRowConverter(llava, _tokens(args), args.caption_prompt))


def cmd_mmbench_to_parquet(args: argparse.Namespace) -> int:
    converter = MmbenchRowConverter(image_policy=pipeline.image_policy(args), keep_unanswered=args.keep_unanswered)
    return _to_parquet(args, converter, rows_per_shard=SINGLE_SHARD)


def cmd_parquet_to_llava(args: argparse.Namespace) -> int:
    count = write_records(args.output, parquet_to_llava_records(args.input, args.image_folder))
    print(f"wrote {count:,} LLaVA records to {args.output} (images in {args.image_folder})")
    return 0


def cmd_parquet_to_dj(args: argparse.Namespace) -> int:
    tokens = _tokens(args)
    records = (llava_to_dj(r, tokens) for r in parquet_to_llava_records(args.input, args.image_folder))
    count = write_records(args.output, records)
    print(f"wrote {count:,} Data-Juicer records to {args.output} (images in {args.image_folder})")
    return 0


def cmd_llava_to_dj(args: argparse.Namespace) -> int:
    tokens = _tokens(args)
    count = write_records(args.output, (llava_to_dj(r, tokens) for r in read_records(args.input)))
    print(f"wrote {count:,} Data-Juicer records to {args.output}")
    return 0


def cmd_dj_to_llava(args: argparse.Namespace) -> int:
    tokens = _tokens(args)
    questions = first_questions(args.restore_questions_from) if args.restore_questions_from else None
    records = (dj_to_llava(r, tokens, args.caption_prompt, questions) for r in read_records(args.input))
    count = write_records(args.output, records)
    print(f"wrote {count:,} LLaVA records to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert between LLaVA JSON(L), Data-Juicer JSONL, MMBench TSV "
                                                 "and LLaMA-Factory parquet.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help_text: str, to_parquet: bool = False, dj: bool = False,
                roots: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(func=func)
        sub.add_argument("input", help="input file (parquet: a shard folder or file)")
        if to_parquet:
            sub.add_argument("--name", required=True, help="output dataset name (shard folder, dataset_info key)")
            pipeline.add_run_arguments(sub, "./converted", TEST_ROWS)
        else:
            sub.add_argument("--output", required=True, help="output file (.json: JSON array, else JSONL)")
        if roots:
            sub.add_argument("--image_roots", "--image-roots", dest="image_roots", nargs="+", default=None,
                             help=f"folders images may be read from (default: ${IMAGE_ROOTS_ENV})")
        if dj:
            sub.add_argument("--image_token", default="<__dj__image>", help="DJ image token (default: %(default)s)")
            sub.add_argument("--eoc_token", default="<|__dj__eoc|>",
                             help="DJ end-of-chunk token (default: %(default)s)")
        return sub

    command("llava-to-parquet", cmd_llava_to_parquet, "LLaVA JSON/JSONL + image folder to parquet shards.",
            to_parquet=True, roots=True)
    sub = command("dj-to-parquet", cmd_dj_to_parquet, "Data-Juicer JSONL to parquet shards.",
                  to_parquet=True, dj=True, roots=True)
    sub.add_argument("--caption_prompt", default=DEFAULT_CAPTION_PROMPT, help="question for caption-only records")
    sub = command("mmbench-to-parquet", cmd_mmbench_to_parquet, "MMBench-style TSV (base64 images) to parquet.",
                  to_parquet=True)
    sub.add_argument("--keep_unanswered", action="store_true",
                     help="keep rows without an answer (empty assistant turn, for inspection only)")
    sub = command("parquet-to-llava", cmd_parquet_to_llava, "Parquet shards to a LLaVA JSON + image folder.")
    sub.add_argument("--image_folder", required=True, help="where the images are written (<sha1>.<ext>)")
    sub = command("parquet-to-dj", cmd_parquet_to_dj, "Parquet shards to Data-Juicer JSONL + image folder.", dj=True)
    sub.add_argument("--image_folder", required=True, help="where the images are written (<sha1>.<ext>)")
    command("llava-to-dj", cmd_llava_to_dj, "LLaVA JSON/JSONL to Data-Juicer JSONL.", dj=True)
    sub = command("dj-to-llava", cmd_dj_to_llava, "Data-Juicer JSONL to LLaVA JSON.", dj=True)
    sub.add_argument("--caption_prompt", default=DEFAULT_CAPTION_PROMPT, help="question for caption-only records")
    sub.add_argument("--restore_questions_from", default=None, metavar="LLAVA_JSON",
                     help="take caption records' questions from this original LLaVA file, by id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.exists(args.input):
        print(f"error: {args.input}: no such file or folder", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (SourceError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
    except Reject as error:  # a record the JSON-to-JSON commands cannot convert
        print(f"error: {args.input}: {error}", file=sys.stderr)
    except (KeyError, TypeError) as error:
        print(f"error: {args.input}: a record lacks the fields of its format ({type(error).__name__}: {error})",
              file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
