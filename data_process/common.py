"""Shared helpers of the data scripts: rejects, image checks, image-path confinement, the output parquet
writer, atomic files and ``dataset_info.json`` merging.

Public API (also meant for ``data_process/stage3``):

* ``Reject(reason, detail)``: raise it from a row converter to drop the row; ``reason`` is the counted key.
* ``ImagePolicy(max_pixels, check).prepare(data) -> (bytes, reencoded)``: decode-verify one image.
* ``image_value_bytes(value)``: bytes of an HF ``Image`` cell (``{"bytes", "path"}``) or of raw bytes.
* ``image_roots(paths)`` / ``resolve_image_path(path, roots)``: read local images only below declared roots.
* ``OUTPUT_SCHEMA``: ``messages`` list<{role, content}> + ``images`` list<Image> with HF features metadata.
* ``ShardWriter(final_path, tmp_path)``: streams rows into a temp parquet file, renamed into place on commit.
* ``RejectLog``: per-shard rejects JSONL (id, row, source, reason, detail), committed atomically.
* ``write_json_atomic(path, obj)`` / ``update_dataset_info(output_dir, entries, remove)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_ROOTS_ENV = "QWEN_MERGE_IMAGE_ROOTS"
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# Formats stored as they are; anything else PIL can decode is re-encoded losslessly as PNG.
KEEP_IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
ROWS_PER_ROW_GROUP = 100  # what `datasets` uses for image data: keeps readers' memory small


class Reject(Exception):
    """A row that must be dropped; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------- images

def image_value_bytes(value: Any) -> bytes | None:
    """The encoded bytes of an image cell: an HF ``Image`` struct ``{"bytes", "path"}`` or raw bytes."""
    if isinstance(value, dict):
        return value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return None


def _jpeg_has_end_marker(data: bytes) -> bool:
    return data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _damaged(error: Exception) -> Reject:
    reason = "image_truncated" if "truncated" in str(error).lower() else "image_unreadable"
    return Reject(reason, str(error))


@dataclass(frozen=True)
class ImagePolicy:
    """How images are checked before they are written.

    ``check="decode"`` decodes every image (JPEG at 1/8 scale, which still reads the whole entropy-coded
    stream, so truncation and most corruption are caught); ``check="header"`` only parses headers, runs
    PIL's ``verify()`` and checks the JPEG end marker (much faster, catches less).
    """

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    check: str = "decode"

    def __post_init__(self):
        if self.check not in ("decode", "header"):
            raise ValueError(f"image check must be 'decode' or 'header', not {self.check!r}")

    def prepare(self, data: bytes | None) -> tuple[bytes, bool]:
        """Return ``(bytes to store, re-encoded?)`` or raise ``Reject`` with an ``image_*`` reason."""
        if data is None:
            raise Reject("image_missing")
        if len(data) == 0:
            raise Reject("image_empty")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))
            except Image.DecompressionBombError as error:
                raise Reject("image_too_large", str(error)) from None
            except UnidentifiedImageError:
                raise Reject("image_unreadable", "unknown image format") from None
            except (OSError, ValueError, SyntaxError) as error:
                raise _damaged(error) from None
            width, height = image.size
            if width <= 0 or height <= 0:
                raise Reject("image_bad_size", f"{width}x{height}")
            if width * height > self.max_pixels:
                raise Reject("image_too_large", f"{width}x{height} > {self.max_pixels} pixels")
            keep = image.format in KEEP_IMAGE_FORMATS
            try:
                if self.check == "header" and keep:
                    image.verify()
                    if image.format == "JPEG" and not _jpeg_has_end_marker(data):
                        raise Reject("image_truncated", "no JPEG end marker")
                    return data, False
                if image.format == "JPEG" and keep:
                    image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                image.load()
            except Reject:
                raise
            except Exception as error:  # PIL raises many types for damaged data
                raise _damaged(error) from None
            if keep:
                return data, False
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue(), True


def image_roots(paths: Iterable[str] | None) -> tuple[str, ...]:
    """Resolved image roots: ``paths`` if given, else ``$QWEN_MERGE_IMAGE_ROOTS`` (``os.pathsep``-joined)."""
    paths = list(paths or [])
    if not paths and os.environ.get(IMAGE_ROOTS_ENV):
        paths = [p for p in os.environ[IMAGE_ROOTS_ENV].split(os.pathsep) if p]
    return tuple(os.path.realpath(p) for p in paths)


def _is_below(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def resolve_image_path(path: str, roots: tuple[str, ...]) -> str:
    """The real path of image ``path`` (relative to a root, or absolute) if it lies below one of ``roots``.

    Symlinks and ``..`` are resolved first, so nothing outside the roots can be read.
    """
    if not roots:
        raise Reject("image_path_outside_roots", f"{path}: no image roots declared")
    candidates = [path] if os.path.isabs(path) else [os.path.join(root, path) for root in roots]
    inside = False
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if not any(_is_below(real, root) for root in roots):
            continue
        inside = True
        if os.path.isfile(real):
            return real
    raise Reject("image_not_found" if inside else "image_path_outside_roots", path)


def read_image_file(path: str, roots: tuple[str, ...]) -> bytes:
    with open(resolve_image_path(path, roots), "rb") as handle:
        return handle.read()


# ----------------------------------------------------------------------------------------------- output

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
_COLUMN_COMPRESSION = {
    "messages.list.element.role": "zstd",
    "messages.list.element.content": "zstd",
    "images.list.element.bytes": "none",
    "images.list.element.path": "none",
}


class ShardWriter:
    """Streams rows into ``tmp_path`` and renames it to ``final_path`` on ``commit()``.

    Readers never see a partial shard; a shard with no rows produces no file.
    """

    def __init__(self, final_path: str, tmp_path: str, rows_per_row_group: int = ROWS_PER_ROW_GROUP):
        self.final_path = final_path
        self.tmp_path = tmp_path
        self.rows_per_row_group = rows_per_row_group
        self.rows = 0
        self._pending: list[tuple[list[dict], list[bytes]]] = []
        self._writer: pq.ParquetWriter | None = None

    def add(self, messages: list[dict], images: list[bytes]) -> None:
        self._pending.append((messages, images))
        if len(self._pending) >= self.rows_per_row_group:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            os.makedirs(os.path.dirname(self.tmp_path), exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp_path, OUTPUT_SCHEMA, compression=_COLUMN_COMPRESSION)
        table = pa.table(
            {
                "messages": [messages for messages, _ in self._pending],
                "images": [[{"bytes": data, "path": None} for data in images] for _, images in self._pending],
            },
            schema=OUTPUT_SCHEMA,
        )
        self._writer.write_table(table)
        self.rows += len(self._pending)
        self._pending.clear()

    def commit(self) -> int:
        """Finish the file and move it into place; return the number of rows written."""
        self._flush()
        if self._writer is None:
            return 0
        self._writer.close()
        os.makedirs(os.path.dirname(self.final_path), exist_ok=True)
        os.replace(self.tmp_path, self.final_path)
        return self.rows

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp_path)


class RejectLog:
    """Rejected rows of one shard as JSONL lines ``{id, row, source, reason, detail}``; atomic on commit."""

    def __init__(self, final_path: str, source: str):
        self.final_path = final_path
        self.source = source
        self._tmp_path = final_path + ".partial"
        os.makedirs(os.path.dirname(final_path), exist_ok=True)
        self._handle = open(self._tmp_path, "w", encoding="utf-8")

    def add(self, row_id: str | None, row: int, reject: Reject) -> None:
        record = {"id": row_id, "row": row, "source": self.source, "reason": reject.reason, "detail": reject.detail}
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        self._handle.close()
        os.replace(self._tmp_path, self.final_path)

    def abort(self) -> None:
        self._handle.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._tmp_path)


# ----------------------------------------------------------------------------------------------- files

def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` through a temp file in the same folder and an atomic rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.{os.getpid()}.partial"
    with open(tmp_path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, ensure_ascii=False, indent=2)
        handle.write("\n")
    os.replace(tmp_path, path)


def read_json(path: str, default: Any = None) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return default


@contextlib.contextmanager
def file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_dataset_info(output_dir: str, entries: dict[str, dict], remove: Iterable[str] = ()) -> str:
    """Merge ``entries`` into ``<output_dir>/dataset_info.json`` (and drop ``remove``), under a lock."""
    path = os.path.join(output_dir, "dataset_info.json")
    with file_lock(os.path.join(output_dir, ".tmp", "dataset_info.lock")):
        info = read_json(path, default={})
        for name in remove:
            info.pop(name, None)
        info.update(entries)
        write_json_atomic(path, dict(sorted(info.items())))
    return path
