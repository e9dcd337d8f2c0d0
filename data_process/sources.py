"""Input files, shard planning and streaming row readers.

A dataset is a list of ``InputFile`` (parquet, JSONL or a JSON array). ``plan_shards`` cuts it into
contiguous row ranges that never span two files; ``iter_shard_rows`` streams one range in small batches,
so memory stays bounded whatever the dataset size. ``--max_samples`` draws a seeded uniform sample whose
per-shard counts are fixed at planning time, so the selection does not depend on ``--num_processes``.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

READ_BATCH_ROWS = 64
_JSON_CHUNK_CHARS = 1 << 20


class SourceError(Exception):
    """Bad input that stops a dataset (reported as one line, no traceback)."""


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "parquet" | "jsonl" | "json"
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
    raise SourceError(f"{path}: unsupported file type (expected .parquet, .jsonl or .json)")


# ----------------------------------------------------------------------------------------------- JSON

def _iter_jsonl(path: str, byte_offset: int) -> Iterator[tuple[int, object]]:
    """(record byte offset, record) for every non-blank line; a bad line yields a ``json.JSONDecodeError``."""
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
                yield offset, json.loads(line)
            except json.JSONDecodeError as error:
                yield offset, error


class _JsonArrayReader:
    """Incremental reader of a top-level JSON array that knows the byte offset of every element."""

    def __init__(self, handle, byte_offset: int):
        self.handle = handle
        self.text_decoder = codecs.getincrementaldecoder("utf-8-sig" if byte_offset == 0 else "utf-8")()
        self.buffer, self.pos, self.eof = "", 0, False
        self.mark_char, self.mark_byte = 0, byte_offset  # buffer[mark_char] starts at byte mark_byte

    def byte_at(self, pos: int) -> int:
        self.mark_byte += len(self.buffer[self.mark_char:pos].encode("utf-8"))
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
    """(record byte offset, record) for each element of a top-level JSON array, read incrementally."""
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
            yield reader.byte_at(reader.pos), record
            reader.pos = end


def iter_json_records(path: str, kind: str, byte_offset: int = 0) -> Iterator[tuple[int, object]]:
    reader = _iter_jsonl if kind == "jsonl" else _iter_json_array
    return reader(path, byte_offset)


# ----------------------------------------------------------------------------------------------- planning

def scan_input(path: str, rows_per_shard: int) -> InputFile:
    """Count the rows of one file (parquet: footer only; JSON: one streaming pass)."""
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

def _iter_parquet_rows(spec: ShardSpec, columns: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
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
        if lo < hi:
            for offset, row in enumerate(batch.slice(lo, hi - lo).to_pylist(), start=position + lo - start):
                yield offset, row
        position += batch.num_rows
        if position >= stop:
            return


def _iter_json_rows(spec: ShardSpec) -> Iterator[tuple[int, object]]:
    records = iter_json_records(localize(spec.input.path), spec.input.kind, spec.byte_offset)
    for offset, (_, record) in enumerate(records):
        if offset >= spec.num_rows:
            return
        yield offset, record


def iter_shard_rows(spec: ShardSpec, columns: tuple[str, ...]) -> Iterator[tuple[int, object]]:
    """(global row index, row) for the rows of ``spec`` (only the sampled ones under ``--max_samples``).

    Parquet rows are dicts with the requested ``columns`` that exist; JSON rows are the records as parsed
    (a ``json.JSONDecodeError`` for a bad JSONL line).
    """
    rows = _iter_parquet_rows(spec, columns) if spec.input.kind == "parquet" else _iter_json_rows(spec)
    wanted = selected_offsets(spec)
    if wanted is None:
        for offset, row in rows:
            yield spec.global_start + offset, row
        return
    wanted_set = set(wanted.tolist())
    for offset, row in rows:
        if offset in wanted_set:
            yield spec.global_start + offset, row


def resolve_hub_files(path_or_id: str, config: str | None = None, split: str = "train") -> list[str]:
    """The data files ``datasets.load_dataset(path_or_id, config)`` would read for ``split``.

    A local directory in the hub repo's layout resolves offline; a hub id is resolved through the hub and
    its files are downloaded one at a time by ``localize``.
    """
    import datasets  # heavy import, only needed here

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
