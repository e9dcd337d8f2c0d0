"""Files of the stage-3 scripts: JSON record lists and parquet outputs, always written atomically.

Parquet outputs use the project's sharegpt schema (``data_process.common.OUTPUT_SCHEMA``: ``messages``
list<{role, content}>, ``images`` list<Image> with HF features metadata), optionally with extra scalar
columns, so ``datasets.load_dataset("parquet")`` decodes the images and LLaMA-Factory reads them directly.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_process.common import OUTPUT_SCHEMA, write_json_atomic  # noqa: F401  (re-exported)

ROWS_PER_GROUP = 100
_VALUE_DTYPES = {pa.string(): "string", pa.int64(): "int64", pa.float64(): "float64", pa.bool_(): "bool"}


def sharegpt_schema(extra: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """``OUTPUT_SCHEMA`` plus extra scalar columns, with matching HF ``Value`` features in the metadata."""
    meta = json.loads(OUTPUT_SCHEMA.metadata[b"huggingface"])
    fields = list(OUTPUT_SCHEMA)
    for name, dtype in (extra or {}).items():
        fields.append(pa.field(name, dtype))
        meta["info"]["features"][name] = {"dtype": _VALUE_DTYPES[dtype], "_type": "Value"}
    return pa.schema(fields, metadata={"huggingface": json.dumps(meta)})


def image_cell(data: bytes) -> dict:
    return {"bytes": data, "path": None}


class ParquetSink:
    """Write rows (dicts matching ``schema``) to ``<path>.partial`` in row groups; rename on success.

    Used as a context manager: an exception removes the partial file and leaves ``path`` untouched.
    """

    def __init__(self, path: str, schema: pa.Schema = OUTPUT_SCHEMA, rows_per_group: int = ROWS_PER_GROUP):
        self.path = path
        self.tmp = f"{path}.{os.getpid()}.partial"
        self.schema = schema
        self.rows_per_group = rows_per_group
        self.rows = 0
        self._buffer: list[dict] = []
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> ParquetSink:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        return self

    def add(self, row: dict) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self.rows += len(self._buffer)
            self._buffer.clear()

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self._flush()
        finally:
            self._writer.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.tmp)


def iter_rows(path: str, columns: list[str] | None = None, batch_size: int = 64,
              rejects: Counter | None = None) -> Iterator[dict | None]:
    """Rows of a parquet file as dicts, one small batch in memory at a time.

    With ``rejects``, a row holding an invalid UTF-8 string (possible in files other tools wrote) is counted
    as ``bad_utf8`` and yielded as None, so row numbers stay those of the file; without, it raises.
    """
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
        try:
            yield from batch.to_pylist()
            continue
        except UnicodeDecodeError:
            if rejects is None:
                raise
        for i in range(batch.num_rows):
            try:
                yield batch.slice(i, 1).to_pylist()[0]
            except UnicodeDecodeError:
                rejects["bad_utf8"] += 1
                yield None


def image_data_url(data: bytes) -> str:
    """A ``data:`` URL of the image bytes as they are (no re-encoding), with the real MIME type."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        fmt = (image.format or "png").lower()
    mime = {"jpeg": "image/jpeg", "mpo": "image/jpeg"}.get(fmt, f"image/{fmt}")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def read_records(paths: Iterable[str], rejects: Counter | None = None) -> list[dict]:
    """Records from JSON list files or JSONL files, in file order.

    A record with an invalid UTF-8 byte (``bad_utf8``), a lone surrogate such as the valid JSON escape
    ``"\\ud800"`` (``bad_unicode``), or a JSONL line that is not a JSON object (``bad_json``) is counted in
    ``rejects`` and skipped; the other records are kept. A JSON list file that does not parse is an error.
    """
    rejects = Counter() if rejects is None else rejects
    records: list[dict] = []
    for path in paths:
        with open(path, "rb") as handle:
            data = handle.read()
        if data.lstrip()[:1] == b"[":
            try:
                items = json.loads(data.decode("utf-8", "surrogateescape"))
            except ValueError as err:
                raise SystemExit(f"error: {path}: not valid JSON ({err})") from None
            records += [item for item in items if _usable(item, rejects)]
            continue
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                item = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                rejects["bad_utf8"] += 1
                continue
            except ValueError:
                rejects["bad_json"] += 1
                continue
            if _usable(item, rejects):
                records.append(item)
    return records


def _usable(item: Any, rejects: Counter) -> bool:
    if not isinstance(item, dict):
        rejects["bad_json"] += 1
        return False
    text = json.dumps(item, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:  # surrogates that stand for undecodable bytes: a bad byte in the file; others: a lone escape
            text.encode("utf-8", "surrogateescape")
            rejects["bad_utf8"] += 1
        except UnicodeEncodeError:
            rejects["bad_unicode"] += 1
        return False
    return True


def require_paths(*paths: str) -> None:
    """Stop with one line naming the first input path that does not exist."""
    for path in paths:
        if not os.path.exists(path):
            raise SystemExit(f"error: {path}: no such file or folder")


def checkpoint_path(output_path: str) -> str:
    return output_path + ".ckpt.jsonl"


def stats_path(output_path: str) -> str:
    return output_path + ".stats.json"


def dumps_compact(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)
