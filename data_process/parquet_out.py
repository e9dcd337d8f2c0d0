"""The output format: LLaMA-Factory sharegpt parquet (``messages`` + ``images``), its shard writer, and the
per-shard log of rejected rows."""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import Reject
from .files import atomic_output

__all__ = ["COLUMN_COMPRESSION", "IMAGE_PLACEHOLDER", "OUTPUT_SCHEMA", "ROWS_PER_ROW_GROUP", "RejectLog",
           "ShardWriter", "int32_array", "open_parquet_writer", "output_table", "string_array"]

IMAGE_PLACEHOLDER = "<image>"
ROWS_PER_ROW_GROUP = 100  # what `datasets` uses for image data: keeps readers' memory small

# Same metadata as `datasets.Features({"messages": [{"role": Value("string"), "content": Value("string")}],
# "images": Sequence(Image())}).arrow_schema`, written without importing `datasets` in every worker.
_HF_FEATURES = {
    "messages": [{"role": {"dtype": "string", "_type": "Value"}, "content": {"dtype": "string", "_type": "Value"}}],
    "images": {"feature": {"_type": "Image"}, "_type": "Sequence"},
}
_MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
OUTPUT_SCHEMA = pa.schema(
    [("messages", pa.list_(_MESSAGE_TYPE)), ("images", pa.list_(_IMAGE_TYPE))],
    metadata={"huggingface": json.dumps({"info": {"features": _HF_FEATURES}})},
)
# Image bytes are already compressed: storing them uncompressed saves CPU and costs no space.
COLUMN_COMPRESSION = {
    "messages.list.element.role": "zstd",
    "messages.list.element.content": "zstd",
    "images.list.element.bytes": "none",
    "images.list.element.path": "none",
}


def open_parquet_writer(path: str, schema: pa.Schema) -> pq.ParquetWriter:
    """A parquet writer with our column compression when ``schema`` is the output schema."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not schema.remove_metadata().equals(OUTPUT_SCHEMA.remove_metadata()):
        return pq.ParquetWriter(path, schema, compression="snappy")
    # dictionaries and min/max statistics are useless for unique image bytes and cost CPU: text columns only
    text = [name for name in COLUMN_COMPRESSION if name.startswith("messages.")]
    return pq.ParquetWriter(path, schema, compression=COLUMN_COMPRESSION, use_dictionary=text, write_statistics=text)


# Arrays built from buffers: `pa.array` imports pandas, which costs a second of start-up per process.
def int32_array(values: Iterable[int]) -> pa.Array:
    buffer = array.array("i", values)
    return pa.Array.from_buffers(pa.int32(), len(buffer), [None, pa.py_buffer(buffer)])


def string_array(texts: list[str]) -> pa.Array:
    if not all(isinstance(text, str) for text in texts):
        return pa.array(texts, pa.string())
    data = [text.encode() for text in texts]
    offsets = array.array("i", itertools.accumulate(map(len, data), initial=0))
    return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])


def output_table(messages: list[list[dict]], images: pa.Array, counts: list[int] | None = None) -> pa.Table:
    """Rows of ``OUTPUT_SCHEMA``: ``images`` is a binary array of encoded images, ``counts[i]`` of them
    (default 1) for row ``i``; Arrow arrays are used as they are, so image bytes are not copied."""
    if isinstance(images, pa.LargeBinaryArray):
        images = images.cast(pa.binary())
    flat = [message for row in messages for message in row]
    turns = pa.StructArray.from_arrays([string_array([m.get("role") for m in flat]),
                                        string_array([m.get("content") for m in flat])], fields=list(_MESSAGE_TYPE))
    cells = pa.StructArray.from_arrays([images, pa.nulls(len(images), pa.string())], fields=list(_IMAGE_TYPE))
    counts = [1] * len(messages) if counts is None else counts
    return pa.Table.from_arrays(
        [pa.ListArray.from_arrays(int32_array(itertools.accumulate(map(len, messages), initial=0)), turns,
                                  type=pa.list_(_MESSAGE_TYPE)),
         pa.ListArray.from_arrays(int32_array(itertools.accumulate(counts, initial=0)), cells,
                                  type=pa.list_(_IMAGE_TYPE))],
        schema=OUTPUT_SCHEMA)


class ShardWriter:
    """Streams rows into ``tmp_path`` (row groups of ``rows_per_row_group`` rows) and renames it to
    ``final_path`` on ``commit()``.

    Readers never see a partial shard; a shard with no rows produces no file.
    """

    def __init__(self, final_path: str, tmp_path: str, rows_per_row_group: int = ROWS_PER_ROW_GROUP):
        self.final_path = final_path
        self.tmp_path = tmp_path
        self.rows_per_row_group = rows_per_row_group
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        # one row group is written in the background while the next rows are converted (Arrow releases the GIL)
        self._background: ThreadPoolExecutor | None = None
        self._writing: Future | None = None

    def add(self, messages: list[dict], images: list[bytes]) -> None:
        """Add one row (simple, slow: batches go through ``add_table``)."""
        self.add_table(output_table([messages], pa.array(images, pa.binary()), [len(images)]))

    def add_table(self, table: pa.Table) -> None:
        """Add rows of ``OUTPUT_SCHEMA`` (see ``output_table``)."""
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.rows_per_row_group:
            self._flush(self.rows_per_row_group)

    def _flush(self, rows: int | None = None) -> None:
        """Write the first ``rows`` pending rows (default all) as one row group."""
        if not self._pending_rows:
            return
        if self._writer is None:
            self._writer = open_parquet_writer(self.tmp_path, OUTPUT_SCHEMA)
            self._background = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        pending = pa.concat_tables(self._pending)
        rows = pending.num_rows if rows is None else rows
        self._wait()
        self._writing = self._background.submit(self._writer.write_table, pending.slice(0, rows), row_group_size=rows)
        rest = pending.slice(rows)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        self.rows += rows

    def _wait(self) -> None:
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()

    def _close(self) -> None:
        try:
            self._wait()
        finally:
            self._background.shutdown()
            self._writer.close()

    def commit(self) -> int:
        """Finish the file and move it into place; return the number of rows written."""
        self._flush()
        if self._writer is None:
            return 0
        self._close()
        os.makedirs(os.path.dirname(self.final_path), exist_ok=True)
        os.replace(self.tmp_path, self.final_path)
        return self.rows

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):  # the error that aborts the shard is the one to report
                self._close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp_path)

class RejectLog:
    """Rejected rows of one shard as JSONL lines ``{id, row, source, reason, detail}``, written to ``tmp_path``
    and renamed to ``final_path`` on ``commit()``."""

    def __init__(self, final_path: str, source: str, tmp_path: str | None = None):
        self.final_path = final_path
        self.source = source
        self._output = contextlib.ExitStack()
        self._handle = self._output.enter_context(atomic_output(final_path, tmp_path=tmp_path))

    def add(self, row_id: str | None, row: int, reject: Reject) -> None:
        record = {"id": row_id, "row": row, "source": self.source, "reason": reject.reason, "detail": reject.detail}
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        self._output.close()

    def abort(self) -> None:
        with contextlib.suppress(_Aborted):
            self._output.__exit__(_Aborted, _Aborted(), None)


class _Aborted(Exception):
    """Thrown into the temp file's context to drop it."""
