"""Image checks before an image is written: the image must be complete, of a sane size, and in a format kept
as it is (else it is re-encoded losslessly as PNG).

``ImagePolicy.prepare`` is the entry point. JPEG, nearly all of the data, is checked by walking its markers
(``_jpeg_structure``, microseconds, no pixels decoded); PNG by Pillow's ``verify()`` (every chunk CRC up to
IEND, nothing inflated). Pillow's ``verify()`` does nothing for GIF, BMP, TIFF and WebP, so those rare formats
are decoded (``load()``, first frame: the one training reads).

Never set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``: with it, a cut JPEG "loads" with its missing rows flat grey
and every truncation check here passes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from .errors import Reject

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "IMAGE_CHECKS", "KEEP_IMAGE_FORMATS", "ImagePolicy", "image_value_bytes"]

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# Formats stored as they are; anything else PIL can decode is re-encoded losslessly as PNG.
KEEP_IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
IMAGE_CHECKS = ("structure", "decode")


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
    return Reject(reason, str(error) or type(error).__name__)


def _u16(data, pos: int) -> int:
    return data[pos] << 8 | data[pos + 1]


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


# The walker branches once per marker kind that libjpeg checks; split up, it would only be harder to compare.
def _jpeg_structure(data) -> tuple[int, int]:  # noqa: C901
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


_JPEG_START = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
_TIFF_DATA_TAGS = ((273, 279), (324, 325))  # (offsets, byte counts) of strips, of tiles


def _cut_short(data) -> str | None:
    """Why ``data`` is shorter than its own header says (WebP's RIFF size, TIFF's first directory), else None.

    A cut WebP, or a TIFF whose directory was written after its pixels, does not even open in PIL; this
    tells a truncated file from an unknown one.
    """
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and 8 + int.from_bytes(head[4:8], "little") > len(data):
        return "WebP shorter than its RIFF header says"
    if head[:4] in _TIFF_MAGICS:
        order = "little" if head[0] == 0x49 else "big"
        directory = int.from_bytes(head[4:8], order)
        entries = int.from_bytes(data[directory:directory + 2], order) if directory + 2 <= len(data) else None
        if entries is None or directory + 2 + 12 * entries + 4 > len(data):  # count, 12-byte entries, next link
            return "TIFF directory runs past the end of the file"
    return None


def _tiff_data_end(image: Image.Image) -> int:
    """The end of the last strip or tile a TIFF's directory points at."""
    end = 0
    for offsets_tag, counts_tag in _TIFF_DATA_TAGS:
        offsets, counts = image.tag_v2.get(offsets_tag), image.tag_v2.get(counts_tag)
        if offsets and counts:
            end = max(end, *(offset + count for offset, count in zip(offsets, counts)))
    return end


@dataclass(frozen=True)
class ImagePolicy:
    """How images are checked before they are written.

    ``check="structure"`` (default): JPEG by its markers (see ``_jpeg_structure``: empty, cut, corrupt-header
    and oversized images), PNG by Pillow's ``verify()`` (chunk CRCs up to IEND), GIF, BMP, TIFF and WebP by
    decoding them (Pillow's ``verify()`` checks nothing for those). ``check="decode"`` also decodes JPEG
    (at 1/8 scale, which still entropy-decodes the whole stream) and PNG. Formats outside
    ``KEEP_IMAGE_FORMATS`` are decoded and re-encoded as PNG.
    """

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    check: str = "structure"

    def __post_init__(self):
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
        if data[:3] == _JPEG_START:
            self._check_size(*_jpeg_structure(data))
            if self.check == "structure":
                return data, False
        cut = _cut_short(data)
        if cut:
            raise Reject("image_truncated", cut)
        return self._prepare_with_pil(data)

    def _open(self, data: bytes | memoryview) -> Image.Image:
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise Reject("image_too_large", str(error)) from None
        except UnidentifiedImageError:
            raise Reject("image_unreadable", "unknown image format") from None
        except (OSError, ValueError, SyntaxError) as error:
            raise _damaged(error) from None

    def _prepare_with_pil(self, data: bytes | memoryview) -> tuple[bytes | memoryview, bool]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damage is reported as a Reject, not as PIL's warnings
            image = self._open(data)
            self._check_size(*image.size)
            keep = image.format in KEEP_IMAGE_FORMATS
            try:
                if image.format == "PNG":
                    image.verify()  # CRCs and IEND, without inflating: all the structure check does
                    if self.check == "structure" and keep:
                        return data, False
                    image = self._open(data)  # verify() leaves the image unusable
                elif image.format == "TIFF" and _tiff_data_end(image) > len(data):
                    raise Reject("image_truncated", "TIFF strips or tiles run past the end of the file")
                elif image.format == "JPEG" and keep:
                    width, height = image.size
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
