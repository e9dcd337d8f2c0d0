"""Shared helpers of the data scripts: rejects, image checks, image-path confinement, the output parquet
writer, atomic files and ``dataset_info.json`` merging.

Public API (also meant for ``data_process/stage3``):

* ``Reject(reason, detail)``: raise it from a row converter to drop the row; ``reason`` is the counted key.
* ``ImagePolicy(max_pixels, check).prepare(data) -> (bytes, reencoded)``: verify one image (structure or decode).
* ``image_value_bytes(value)``: bytes of an HF ``Image`` cell (``{"bytes", "path"}``) or of raw bytes.
* ``image_roots(paths)`` / ``resolve_image_path(path, roots)``: read local images only below declared roots.
* ``OUTPUT_SCHEMA``: ``messages`` list<{role, content}> + ``images`` list<Image> with HF features metadata.
* ``output_table(messages, images)``: rows of ``OUTPUT_SCHEMA`` from an Arrow array of image bytes (no copies).
* ``ShardWriter(final_path, tmp_path)``: streams rows into a temp parquet file, renamed into place on commit.
* ``open_parquet_writer(path, schema)``: a writer with our per-column compression.
* ``RejectLog``: per-shard rejects JSONL (id, row, source, reason, detail), committed atomically.
* ``write_json_atomic(path, obj)`` / ``update_dataset_info(output_dir, entries, remove)``.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import io
import itertools
import json
import os
import warnings
import zlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
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

def image_value_bytes(value: Any) -> bytes | memoryview | None:
    """The encoded bytes of an image cell: an HF ``Image`` struct ``{"bytes", "path"}`` or raw bytes.

    Parquet inputs hand images over as zero-copy ``memoryview``s of Arrow buffers; they are kept as such.
    """
    if isinstance(value, dict):
        return value.get("bytes")
    if isinstance(value, (bytes, memoryview)):
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    return None


def _damaged(error: Exception) -> Reject:
    reason = "image_truncated" if "truncated" in str(error).lower() else "image_unreadable"
    return Reject(reason, str(error))


def _u16(data, pos: int) -> int:
    return data[pos] << 8 | data[pos + 1]


def _u32(data, pos: int) -> int:
    return int.from_bytes(data[pos:pos + 4], "big")


_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_NO_LENGTH = frozenset({0xC8, *range(0xD0, 0xD9), *range(0xF0, 0xFE)})  # as in PIL's marker table
_JPEG_END = b"\xff\xd9"
_JPEG_SAMPLING = frozenset(h << 4 | v for h in range(1, 5) for v in range(1, 5))
_JPEG_TABLE_PAIRS = frozenset(dc << 4 | ac for dc in range(4) for ac in range(4))


def _huffman_tables_ok(data, pos: int, end: int) -> bool:
    """The tables of a DHT segment fill it exactly, and each is a valid prefix code (libjpeg's checks)."""
    while pos < end:
        kind, counts = data[pos], data[pos + 1:pos + 17]
        pos += 17 + sum(counts)
        if kind >> 4 > 1 or kind & 15 > 3 or pos > end:
            return False
        if kind >> 4 == 0 and max(data[pos - sum(counts):pos], default=0) > 15:  # DC symbols: bit counts
            return False
        code = 0
        for length, count in enumerate(counts, 1):
            code += count
            if count and code >= 1 << length:
                return False
            code <<= 1
    return pos == end


_HUFFMAN_OK: dict[bytes, bool] = {}  # most encoders share their tables: check each distinct segment once


def _jpeg_structure(data) -> tuple[int, int]:
    """(width, height) of a JPEG whose structure is sound, else ``Reject``.

    Walks the marker segments up to the first scan as PIL's parser does, checking what libjpeg would fail
    on there (segment lengths, quantisation and Huffman tables, an 8-bit frame header with 1, 3 or 4
    components and sane sampling, a first scan over the frame's components with its quantisation tables
    defined), then requires the end-of-image marker after the scan: entropy-coded data cannot contain FF D9,
    so a file cut anywhere after its headers has none. Errors inside the entropy-coded data are not
    detected; libjpeg, and so a full decode with PIL, mostly decodes those with a warning too.
    """
    end, pos, components, quant_tables = len(data), 2, None, set()
    while True:
        if pos + 4 > end:
            raise Reject("image_truncated", "JPEG ends inside its headers")
        if data[pos] != 0xFF:  # junk between segments: skipped, like PIL and libjpeg do
            pos += 1
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_NO_LENGTH or marker == 0x00:
            if marker == 0xD9:
                raise Reject("image_unreadable", "JPEG ends before its first scan")
            pos += 2
            continue
        if marker < 0xC0:
            raise Reject("image_unreadable", f"unknown JPEG marker FF{marker:02X}")
        segment_end = pos + 2 + (data[pos + 2] << 8 | data[pos + 3])
        if segment_end > end:
            raise Reject("image_truncated", "JPEG segment runs past the end of the file")
        if segment_end < pos + 4:
            raise Reject("image_unreadable", "bad JPEG segment length")
        if marker in _JPEG_SOF:
            count = data[pos + 9] if segment_end - pos >= 10 else 0
            if count not in (1, 3, 4) or data[pos + 4] != 8 or pos + 10 + 3 * count != segment_end:
                raise Reject("image_unreadable", "unsupported JPEG frame (PIL reads 8-bit, 1/3/4 components)")
            fields = bytes(data[pos + 10:segment_end])  # (id, sampling, quantisation table) per component
            if not _JPEG_SAMPLING.issuperset(fields[1::3]) or max(fields[2::3]) > 3:
                raise Reject("image_unreadable", "bad JPEG frame components")
            size = (_u16(data, pos + 7), _u16(data, pos + 5))
            components = dict(zip(fields[0::3], fields[2::3]))
        elif marker == 0xDB:  # quantisation tables: 1 + 64 or 1 + 128 bytes each
            table = pos + 4
            while table < segment_end:
                quant_tables.add(data[table] & 15)
                table += 129 if data[table] >> 4 else 65
            if table != segment_end:
                raise Reject("image_unreadable", "bad JPEG quantization table")
        elif marker == 0xC4:
            segment = bytes(data[pos + 4:segment_end])
            if segment not in _HUFFMAN_OK:
                if len(_HUFFMAN_OK) > 4096:
                    _HUFFMAN_OK.clear()
                _HUFFMAN_OK[segment] = _huffman_tables_ok(segment, 0, len(segment))
            if not _HUFFMAN_OK[segment]:
                raise Reject("image_unreadable", "bad JPEG Huffman table")
        elif marker == 0xDA:
            if components is None or not quant_tables.issuperset(components.values()):
                raise Reject("image_unreadable", "JPEG scan before its frame header or quantization tables")
            scan = bytes(data[pos + 4:segment_end - 3])  # count, then (component, Huffman tables) per component
            if not 3 <= len(scan) <= 9 or len(scan) != 1 + 2 * scan[0] or not components.keys() >= set(scan[1::2]) \
                    or not _JPEG_TABLE_PAIRS.issuperset(scan[2::2]):
                raise Reject("image_unreadable", "bad JPEG scan header")
            break
        pos = segment_end
    if data[-2:] != _JPEG_END and bytes(data[segment_end:]).rfind(_JPEG_END) < 0:  # may be followed by padding
        raise Reject("image_truncated", "no JPEG end marker")
    return size


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # by colour type


def _png_structure(data) -> tuple[int, int]:
    """(width, height) of a PNG whose chunks are all intact (CRCs, IHDR first, IDAT, IEND), else ``Reject``.

    The same checks as PIL's ``verify()``; a corrupt zlib stream under valid CRCs is not detected.
    """
    end, pos, size, has_data = len(data), len(_PNG_SIGNATURE), None, False
    while True:
        if pos + 12 > end:
            raise Reject("image_truncated", "PNG ends before its IEND chunk")
        length = _u32(data, pos)
        chunk_end = pos + 12 + length
        if chunk_end > end:
            raise Reject("image_truncated", "PNG chunk runs past the end of the file")
        kind = bytes(data[pos + 4:pos + 8])
        if zlib.crc32(data[pos + 4:pos + 8 + length]) != _u32(data, chunk_end - 4):
            raise Reject("image_unreadable", f"broken PNG file (bad checksum in {kind!r})")
        if size is None:
            if kind != b"IHDR" or length < 13:
                raise Reject("image_unreadable", "PNG does not start with IHDR")
            depth, colour, filtering = data[pos + 16], data[pos + 17], data[pos + 19]
            if depth not in _PNG_BIT_DEPTHS.get(colour, ()) or filtering:
                raise Reject("image_unreadable", f"unsupported PNG ({depth}-bit, colour type {colour})")
            size = (_u32(data, pos + 8), _u32(data, pos + 12))
        elif kind == b"IDAT":
            has_data = True
        elif kind == b"IEND":
            break
        pos = chunk_end
    if not has_data:
        raise Reject("image_unreadable", "PNG without image data")
    return size


def _structure(data) -> tuple[int, int] | None:
    """(width, height) from a structural check of JPEG and PNG data; None for other formats."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_structure(data)
    if data[:8] == _PNG_SIGNATURE:
        return _png_structure(data)
    return None


IMAGE_CHECKS = ("structure", "decode")


@dataclass(frozen=True)
class ImagePolicy:
    """How images are checked before they are written.

    ``check="structure"`` (default) verifies JPEG and PNG files without decoding pixels (see
    ``_jpeg_structure`` / ``_png_structure``: catches empty, cut, corrupt-header and oversized images);
    other formats are opened with PIL and ``verify()``-ed. ``check="decode"`` does the same and then decodes
    every image (JPEG at 1/8 scale, which still entropy-decodes the whole stream). ``"header"`` is the
    former name of ``"structure"``. Formats outside ``KEEP_IMAGE_FORMATS`` are decoded and re-encoded as PNG.
    """

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    check: str = "structure"

    def __post_init__(self):
        if self.check == "header":
            object.__setattr__(self, "check", "structure")
        if self.check not in IMAGE_CHECKS:
            raise ValueError(f"image check must be one of {', '.join(IMAGE_CHECKS)}, not {self.check!r}")

    def _check_size(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise Reject("image_bad_size", f"{width}x{height}")
        if width * height > self.max_pixels:
            raise Reject("image_too_large", f"{width}x{height} > {self.max_pixels} pixels")

    def prepare(self, data: bytes | memoryview | None) -> tuple[bytes | memoryview, bool]:
        """Return ``(bytes to store, re-encoded?)`` or raise ``Reject`` with an ``image_*`` reason.

        An image stored as it is comes back as the very object passed in.
        """
        if data is None:
            raise Reject("image_missing")
        if len(data) == 0:
            raise Reject("image_empty")
        size = _structure(data)
        if size is not None:
            self._check_size(*size)
            if self.check == "structure":
                return data, False
        return self._prepare_with_pil(data)

    def _prepare_with_pil(self, data: bytes | memoryview) -> tuple[bytes | memoryview, bool]:
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
            self._check_size(*image.size)
            keep = image.format in KEEP_IMAGE_FORMATS
            try:
                if self.check == "structure" and keep:
                    image.verify()
                    return data, False
                if image.format == "JPEG" and keep:
                    width, height = image.size
                    image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                image.load()
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


def resolve_image_path(path: str, roots: tuple[str, ...], bases: tuple[str, ...] = ()) -> str:
    """The real path of image ``path`` if it lies below one of ``roots``.

    A relative ``path`` is tried below each of ``bases`` (default: the roots). Symlinks and ``..`` are
    resolved before the check, so nothing outside the roots can be read.
    """
    if not roots:
        raise Reject("image_path_outside_roots", f"{path}: no image roots declared")
    candidates = [path] if os.path.isabs(path) else [os.path.join(base, path) for base in bases or roots]
    inside = False
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if not any(_is_below(real, root) for root in roots):
            continue
        inside = True
        if os.path.isfile(real):
            return real
    raise Reject("image_not_found" if inside else "image_path_outside_roots", path)


def read_image_file(path: str, roots: tuple[str, ...], bases: tuple[str, ...] = ()) -> bytes:
    with open(resolve_image_path(path, roots, bases), "rb") as handle:
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
