"""Input files, shard planning and streaming row readers.

A dataset is a list of ``InputFile`` (parquet, JSONL or a JSON array). ``plan_shards`` cuts it into
contiguous row ranges that never span two files; ``iter_shard_batches`` streams one range in small batches,
so memory stays bounded whatever the dataset size. ``--max_samples`` draws a seeded uniform sample whose
per-shard counts are fixed at planning time, so the selection does not depend on ``--num_processes``.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import os
import re
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import Reject, SourceError
from .parquet_out import int32_array

__all__ = ["InputFile", "RowBatch", "ShardSpec", "SourceError", "file_kind", "iter_json_records",
           "iter_shard_batches", "localize", "plan_shards", "resolve_hub_files", "scan_input", "selected_offsets"]

READ_BATCH_ROWS = 100  # the row-group size of HF image datasets
_JSON_CHUNK_CHARS = 1 << 20


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "parquet" | "jsonl" | "json" | "tsv"
    rows: int
    # JSON kinds: byte offset of every `rows_per_shard`-th record (filled by `scan_input`)
    record_offsets: tuple[int, ...] = ()


@dataclass(frozen=True)
class ShardSpec:
    index: int
    count: int
    input: InputFile
    first_row: int  # row index within the input file
    num_rows: int
    global_start: int  # row index within the whole dataset
    byte_offset: int = 0  # JSON kinds: where the first record starts
    num_selected: int | None = None  # None: every row; else a seeded sample of that many rows
    seed: int = 0


def file_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".jsonl"):
        return "jsonl"
    if lower.endswith(".json"):
        return "json"
    if lower.endswith(".tsv"):
        return "tsv"
    raise SourceError(f"{path}: unsupported file type (expected .parquet, .jsonl, .json or .tsv)")


# ----------------------------------------------------------------------------------------------- text checks
# A record is read as a whole or not at all: a byte that is not UTF-8 (``bad_utf8``) or a lone surrogate
# escape such as "\ud800", valid JSON but no character (``bad_unicode``), makes its record a ``Reject``
# instead of failing the file. Both are searched in the raw text first, so clean records cost one regex scan.

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # may start a lone surrogate; pairs are checked below
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8, kept by "surrogateescape"
SURROGATE = re.compile("[\ud800-\udfff]")  # decoded JSON only holds lone ones: pairs are joined


def _lone_surrogate(value: object) -> str | None:
    """The first string in ``value`` (keys included) holding a surrogate that is not part of a pair."""
    if isinstance(value, str):
        return value if SURROGATE.search(value) else None
    if isinstance(value, dict):
        value = itertools.chain.from_iterable(value.items())
    if isinstance(value, (list, itertools.chain)):
        return next((found for item in value if (found := _lone_surrogate(item)) is not None), None)
    return None


def _bad_unicode(record: object, raw: str, start: int = 0, end: int | None = None) -> Reject | None:
    """A ``bad_unicode`` Reject when the JSON text ``raw[start:end]`` decoded to a lone surrogate."""
    if not _SURROGATE_ESCAPE.search(raw, start, len(raw) if end is None else end):
        return None
    text = _lone_surrogate(record)
    if text is None:
        return None
    return Reject("bad_unicode", f"lone surrogate in {text.encode('utf-8', 'backslashreplace')[:80].decode()!r}",
                  record)


def _bad_utf8(error: UnicodeDecodeError, offset: int) -> Reject:
    return Reject("bad_utf8", f"byte 0x{error.object[error.start]:02X} at file byte {offset + error.start} "
                              "is not UTF-8")


# ----------------------------------------------------------------------------------------------- JSON

def _iter_jsonl(path: str, byte_offset: int) -> Iterator[tuple[int, object]]:
    """(record byte offset, record) for every non-blank line; a bad line yields a ``json.JSONDecodeError``
    or a ``Reject`` (``bad_utf8``, ``bad_unicode``)."""
    with open(path, "rb") as handle:
        handle.seek(byte_offset)
        while True:
            offset = handle.tell()
            line = handle.readline()
            if not line:
                return
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8-sig" if offset == 0 else "utf-8")
            except UnicodeDecodeError as error:
                yield offset, _bad_utf8(error, offset)
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield offset, error
                continue
            yield offset, _bad_unicode(record, text) or record


class _JsonArrayReader:
    """Incremental reader of a top-level JSON array that knows the byte offset of every element."""

    def __init__(self, handle, byte_offset: int):
        self.handle = handle
        # bytes that are not UTF-8 become lone surrogates U+DC80..U+DCFF: found per record, counted back as bytes
        self.text_decoder = codecs.getincrementaldecoder("utf-8-sig" if byte_offset == 0 else "utf-8")(
            "surrogateescape")
        self.buffer, self.pos, self.eof = "", 0, False
        self.mark_char, self.mark_byte = 0, byte_offset  # buffer[mark_char] starts at byte mark_byte

    def byte_at(self, pos: int) -> int:
        self.mark_byte += len(self.buffer[self.mark_char:pos].encode("utf-8", "surrogateescape"))
        self.mark_char = pos
        return self.mark_byte

    def refill(self) -> None:
        self.mark_byte, self.mark_char = self.byte_at(self.pos), 0
        chunk = self.handle.read(_JSON_CHUNK_CHARS)
        self.buffer = self.buffer[self.pos:] + self.text_decoder.decode(chunk, final=not chunk)
        self.pos, self.eof = 0, not chunk

    def peek_after(self, skipped: str) -> str:
        """Skip ``skipped`` characters and return the next one ("" at end of file)."""
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos] in skipped:
                self.pos += 1
            if self.pos < len(self.buffer) or self.eof:
                return self.buffer[self.pos:self.pos + 1]
            self.refill()


def _iter_json_array(path: str, byte_offset: int) -> Iterator[tuple[int, object]]:
    """(record byte offset, record) for each element of a top-level JSON array, read incrementally.

    A byte that is not UTF-8 or a lone surrogate escape inside an element makes that element a ``Reject``
    (``bad_utf8``, ``bad_unicode``) and the next elements are read as usual. A syntax error, a bad byte
    between elements included, stops the file with a ``SourceError`` naming the byte: in an array, where
    the next element starts is not known.
    """
    decoder = json.JSONDecoder()
    with open(path, "rb") as handle:
        handle.seek(byte_offset)
        reader = _JsonArrayReader(handle, byte_offset)
        if byte_offset == 0:
            if reader.peek_after(" \t\r\n") != "[":
                raise SourceError(f"{path}: a .json input must hold a JSON array of records")
            reader.pos += 1
        while reader.peek_after(" \t\r\n,") not in ("", "]"):
            while True:
                try:
                    record, end = decoder.raw_decode(reader.buffer, reader.pos)
                    break
                except json.JSONDecodeError as error:
                    if reader.eof:
                        raise SourceError(f"{path}: invalid JSON near byte {reader.byte_at(reader.pos)}: "
                                          f"{error.msg}") from None
                    reader.refill()
            start = reader.pos
            offset = reader.byte_at(start)
            bad_byte = _ESCAPED_BYTE.search(reader.buffer, start, end)
            if bad_byte:
                byte = ord(bad_byte.group()) - 0xDC00
                record = Reject("bad_utf8", f"byte 0x{byte:02X} at file byte {reader.byte_at(bad_byte.start())} "
                                            "is not UTF-8", record)
            else:
                record = _bad_unicode(record, reader.buffer, start, end) or record
            yield offset, record
            reader.pos = end


def _iter_tsv(path: str, byte_offset: int) -> Iterator[tuple[int, object]]:
    """Rows of a tab-separated file with a header (MMBench style) as dicts; offsets are row numbers."""
    if byte_offset:
        raise SourceError(f"{path}: a .tsv input is read as one shard")
    csv.field_size_limit(sys.maxsize)  # base64 image cells are large
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        for index, row in enumerate(csv.DictReader(handle, delimiter="\t")):
            bad = next((value for value in row.values() if isinstance(value, str) and _ESCAPED_BYTE.search(value)),
                       None)
            if bad is not None:
                shown = bad.encode("utf-8", "surrogateescape")[:80]
                row = Reject("bad_utf8", f"a cell is not UTF-8: {shown!r}")
            yield index, row


def iter_json_records(path: str, kind: str, byte_offset: int = 0) -> Iterator[tuple[int, object]]:
    """(offset, record) of a JSONL, JSON-array or TSV file, starting at ``byte_offset``."""
    reader = {"jsonl": _iter_jsonl, "json": _iter_json_array, "tsv": _iter_tsv}[kind]
    return reader(path, byte_offset)


# ----------------------------------------------------------------------------------------------- planning

def scan_input(path: str, rows_per_shard: int) -> InputFile:
    """Count the rows of one file (parquet: footer only; others: one streaming pass)."""
    kind = file_kind(path)
    if kind == "parquet":
        try:
            return InputFile(path, kind, _parquet_num_rows(path))
        except Exception as error:
            raise SourceError(f"{path}: not a readable parquet file ({error})") from None
    offsets, rows = [], 0
    for offset, _ in iter_json_records(localize(path), kind):
        if rows % rows_per_shard == 0:
            offsets.append(offset)
        rows += 1
    return InputFile(path, kind, rows, tuple(offsets))


def _parquet_num_rows(path: str) -> int:
    if path.startswith("hf://"):  # read the footer remotely; workers download the file itself
        from huggingface_hub import HfFileSystem

        with HfFileSystem().open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    return pq.ParquetFile(path).metadata.num_rows


def plan_shards(inputs: list[InputFile], rows_per_shard: int, limit: int | None = None,
                max_samples: int | None = None, seed: int = 0) -> list[ShardSpec]:
    """Cut ``inputs`` into shards of at most ``rows_per_shard`` rows.

    ``limit`` keeps only the first rows of the dataset (``--test_mode``). ``max_samples`` draws that many
    rows uniformly (seeded); each shard's share is drawn here with a hypergeometric chain, the rows
    themselves in the worker (see ``selected_offsets``).
    """
    ranges = []  # (input, first_row, num_rows, byte_offset)
    remaining = limit if limit is not None else float("inf")
    for input_file in inputs:
        for first_row in range(0, input_file.rows, rows_per_shard):
            if remaining <= 0:
                break
            num_rows = int(min(rows_per_shard, input_file.rows - first_row, remaining))
            byte_offset = input_file.record_offsets[first_row // rows_per_shard] if input_file.record_offsets else 0
            ranges.append((input_file, first_row, num_rows, byte_offset))
            remaining -= num_rows
    total = sum(r[2] for r in ranges)
    shares: list[int | None] = [None] * len(ranges)
    if max_samples is not None and max_samples < total:
        rng = np.random.default_rng(seed)
        left_rows, left_samples = total, max_samples
        for i, (_, _, num_rows, _) in enumerate(ranges):
            share = int(rng.hypergeometric(num_rows, left_rows - num_rows, left_samples)) if left_samples else 0
            shares[i] = share
            left_rows -= num_rows
            left_samples -= share
    specs, global_start = [], 0
    for i, ((input_file, first_row, num_rows, byte_offset), share) in enumerate(zip(ranges, shares)):
        specs.append(ShardSpec(i, len(ranges), input_file, first_row, num_rows, global_start,
                               byte_offset, share, seed))
        global_start += num_rows
    return specs


def selected_offsets(spec: ShardSpec) -> np.ndarray | None:
    """Sorted offsets (within the shard) of the sampled rows, or None when every row is used."""
    if spec.num_selected is None:
        return None
    rng = np.random.default_rng([spec.seed, spec.index])
    return np.sort(rng.choice(spec.num_rows, size=spec.num_selected, replace=False))


# ----------------------------------------------------------------------------------------------- reading

@dataclass
class RowBatch:
    """Consecutive rows of one shard (only the sampled ones under ``--max_samples``).

    Parquet rows are dicts of the requested columns that exist, with binary and HF ``Image`` columns left
    in Arrow: their cells hold zero-copy ``memoryview``s of ``binary[column]``, so a writer can ``take``
    unchanged images from there instead of copying them through Python. JSON rows are the records as
    parsed (a ``json.JSONDecodeError`` for a bad JSONL line).
    """

    indices: list[int]  # global row index of each row
    rows: list[object]
    binary: dict[str, pa.Array] = field(default_factory=dict)
    _views: dict[int, tuple[str, int, memoryview]] = field(default_factory=dict, repr=False)

    def position(self, value: object) -> tuple[str, int] | None:
        """(column, position in ``binary[column]``) when ``value`` is one of this batch's image views."""
        found = self._views.get(id(value))
        return found[:2] if found is not None and found[2] is value else None


def _is_image_type(type_: pa.DataType) -> bool:
    if pa.types.is_struct(type_):
        index = type_.get_field_index("bytes")
        return index >= 0 and _is_image_type(type_.field(index).type)
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_)


_LARGE = (pa.types.is_large_binary, pa.types.is_large_string, pa.types.is_large_list)


def _bounds(array: pa.Array) -> list[int]:
    """Value offsets of a list, binary or string array (read from the buffer: ``to_numpy`` imports pandas)."""
    if not len(array):
        return [0]
    width = 8 if any(is_large(array.type) for is_large in _LARGE) else 4
    return np.frombuffer(array.buffers()[1], dtype=f"<i{width}", count=len(array) + 1,
                         offset=array.offset * width).tolist()


def _value_views(array: pa.Array) -> list[memoryview | None]:
    """Zero-copy views of the values of a (large) binary or string array; None for nulls."""
    bounds, data = _bounds(array), array.buffers()[2] if len(array) else None
    whole = memoryview(data if data is not None else b"").cast("B")  # Arrow exports signed chars
    views = [whole[a:b] for a, b in itertools.pairwise(bounds)]
    if array.null_count:
        views = [view if valid else None for view, valid in zip(views, array.is_valid().to_pylist())]
    return views


def _pylist(array: pa.Array) -> list:
    """``array.to_pylist()``, built column-wise: several times faster for lists of structs of strings."""
    type_ = array.type
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        return [None if view is None else str(view, "utf-8") for view in _value_views(array)]
    if pa.types.is_struct(type_):
        names = [f.name for f in type_]
        values = [dict(zip(names, row)) for row in zip(*(_pylist(array.field(i)) for i in range(len(names))))]
    elif pa.types.is_list(type_) or pa.types.is_large_list(type_):
        bounds = _bounds(array)
        child = _pylist(array.values.slice(bounds[0], bounds[-1] - bounds[0]))
        values = [child[a - bounds[0]:b - bounds[0]] for a, b in itertools.pairwise(bounds)]
    else:
        return array.to_pylist()
    if array.null_count:
        values = [value if valid else None for value, valid in zip(values, array.is_valid().to_pylist())]
    return values


def _text_rows(text: pa.RecordBatch) -> list[dict | Reject]:
    """The rows of the non-image columns as dicts; a row with a string that is not UTF-8 (Arrow does not check
    what it reads) becomes a ``bad_utf8`` Reject, found row by row only in a batch that has one."""
    if not text.num_columns:
        return [{} for _ in range(text.num_rows)]

    try:
        return [dict(zip(text.schema.names, row)) for row in zip(*map(_pylist, text.columns))]
    except UnicodeDecodeError:
        pass
    rows = []
    for i in range(text.num_rows):
        readable, bad = {}, []
        for name, column in zip(text.schema.names, text.slice(i, 1).columns):
            try:
                readable[name] = _pylist(column)[0]
            except UnicodeDecodeError as error:
                bad.append(f"{name} near {bytes(error.object[max(0, error.start - 20):error.start + 20])!r}")
        # the readable columns go with the reject, for its id in the log
        rows.append(Reject("bad_utf8", f"not UTF-8: {'; '.join(bad)}", readable) if bad else readable)
    return rows


def _record_batch(batch: pa.RecordBatch, indices: list[int]) -> RowBatch:
    image_columns = [f.name for f in batch.schema if _is_image_type(f.type)]
    rows = _text_rows(batch.drop_columns(image_columns))
    result = RowBatch(indices, rows)
    for name in image_columns:
        column = batch.column(name)
        is_struct = pa.types.is_struct(column.type)
        values = column.field("bytes") if is_struct else column
        views = _value_views(values)
        result.binary[name] = values
        result._views.update((id(v), (name, i, v)) for i, v in enumerate(views) if v is not None)
        if is_struct:
            has_path = column.type.get_field_index("path") >= 0
            paths = column.field("path").to_pylist() if has_path else [None] * len(views)
            valid = column.is_valid().to_pylist() if column.null_count else [True] * len(views)
            cells = [{"bytes": v, "path": p} if ok else None for v, p, ok in zip(views, paths, valid)]
        else:
            cells = views
        for row, cell in zip(rows, cells):
            if isinstance(row, dict):
                row[name] = cell
    return result


def _iter_parquet_batches(spec: ShardSpec, columns: tuple[str, ...], wanted: set[int] | None) -> Iterator[RowBatch]:
    parquet = pq.ParquetFile(localize(spec.input.path))
    present = [c for c in columns if c in parquet.schema_arrow.names]
    start, stop = spec.first_row, spec.first_row + spec.num_rows
    groups, group_start, first_group_start = [], 0, None
    for g in range(parquet.metadata.num_row_groups):
        group_rows = parquet.metadata.row_group(g).num_rows
        if group_start < stop and group_start + group_rows > start:
            groups.append(g)
            first_group_start = group_start if first_group_start is None else first_group_start
        group_start += group_rows
    position = first_group_start or 0
    for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=present):
        lo, hi = max(start - position, 0), min(stop - position, batch.num_rows)
        offsets = range(position + lo - start, position + hi - start)  # within the shard
        keep = [i for i, offset in enumerate(offsets) if wanted is None or offset in wanted]
        if keep:
            part = batch.slice(lo, hi - lo)
            if len(keep) < len(offsets):
                part = part.take(int32_array(keep))
            yield _record_batch(part, [spec.global_start + offsets[i] for i in keep])
        position += batch.num_rows
        if position >= stop:
            return


def _iter_json_batches(spec: ShardSpec, wanted: set[int] | None) -> Iterator[RowBatch]:
    records = iter_json_records(localize(spec.input.path), spec.input.kind, spec.byte_offset)
    batch = RowBatch([], [])
    for offset, (_, record) in enumerate(records):
        if offset >= spec.num_rows:
            break
        if wanted is None or offset in wanted:
            batch.indices.append(spec.global_start + offset)
            batch.rows.append(record)
        if len(batch.rows) == READ_BATCH_ROWS:
            yield batch
            batch = RowBatch([], [])
    if batch.rows:
        yield batch


def read_ahead(items: Iterator, depth: int = 2) -> Iterator:
    """``items``, produced ``depth`` items ahead in a thread (Arrow reads and decodes without the GIL)."""
    end = object()
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as thread:
        queued = deque(thread.submit(next, items, end) for _ in range(depth))
        while (item := queued.popleft().result()) is not end:
            queued.append(thread.submit(next, items, end))
            yield item


def iter_shard_batches(spec: ShardSpec, columns: tuple[str, ...]) -> Iterator[RowBatch]:
    """The rows of ``spec`` in batches of at most ``READ_BATCH_ROWS`` (see ``RowBatch``), read ahead."""
    wanted = selected_offsets(spec)
    wanted = None if wanted is None else set(wanted.tolist())
    if spec.input.kind == "parquet":
        return read_ahead(_iter_parquet_batches(spec, columns, wanted))
    return read_ahead(_iter_json_batches(spec, wanted))


_SHARDED_GLOB = "*-" + "[0-9]" * 5 + "-of-" + "[0-9]" * 5 + "*.*"  # datasets' SPLIT_PATTERN_SHARDED in data/
_SHARDED_SPLIT = re.compile(r"(.+)-[0-9]{5}-of-[0-9]{5}")
_README_CONFIGS = re.compile(r"\A---\s*\n(?:.*\n)*?configs\s*:")


def _sharded_layout_files(directory: str, split: str) -> list[str]:
    """What ``datasets`` resolves for a local copy in the ``push_to_hub`` layout (``data/{split}-00000-of-00002*``,
    its first rule) when nothing overrides it, found without importing ``datasets`` (seconds of start-up);
    [] whenever the case is less plain, to let ``datasets`` decide."""
    root = Path(directory).expanduser().resolve()
    readme = root / "README.md"
    if (root / ".huggingface.yaml").exists() or (readme.is_file() and _README_CONFIGS.match(readme.read_text("utf-8"))):
        return []
    splits = {path.name: _SHARDED_SPLIT.match(path.name)[1] for path in (root / "data").glob(_SHARDED_GLOB)}
    if not all(re.fullmatch(r"\w+(\.\w+)*", s) and n.endswith(".parquet") and n[0] != "_" for n, s in splits.items()):
        return []
    return sorted((root / "data" / name).as_posix() for name, s in splits.items() if s == split)


def resolve_hub_files(path_or_id: str, config: str | None = None, split: str = "train") -> list[str]:
    """The data files ``datasets.load_dataset(path_or_id, config)`` would read for ``split``.

    A local directory in the hub repo's layout resolves offline; a hub id is resolved through the hub and
    its files are downloaded one at a time by ``localize``.
    """
    if config is None and os.path.isdir(path_or_id):
        files = _sharded_layout_files(path_or_id, split)
        if files:
            return files
    import datasets  # heavy import (seconds), only needed here

    try:
        builder = datasets.load_dataset_builder(path_or_id, name=config)
    except Exception as error:
        raise SourceError(f"{path_or_id}{f' [{config}]' if config else ''}: cannot resolve data files "
                          f"({type(error).__name__}: {error})") from None
    data_files = builder.config.data_files or {}
    if split not in data_files:
        raise SourceError(f"{path_or_id}: no '{split}' split (found: {', '.join(data_files) or 'none'})")
    return sorted(str(f) for f in data_files[split])


def localize(path: str) -> str:
    """A local path for ``path``; ``hf://`` files are downloaded into the HF cache (resumable)."""
    if not path.startswith("hf://"):
        return path
    from huggingface_hub import HfFileSystem, hf_hub_download

    resolved = HfFileSystem().resolve_path(path)
    return hf_hub_download(resolved.repo_id, resolved.path_in_repo, repo_type=resolved.repo_type,
                           revision=resolved.revision)
