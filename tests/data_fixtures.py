"""Local fixtures for the data tests: images (good and broken) and the rows of hub datasets (ReCap, synthdog,
LLaVA-OneVision-Data), written in the hub repos' own layouts by ``examples/tiny/hub_layouts.py``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from examples.tiny.hub_layouts import (  # noqa: F401  (re-exported for the data tests)
    hub_features,
    make_onevision_repo,
    make_recap_repo,
    make_synthdog_repo,
    write_parquet_files,
)

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def jpeg_bytes(width: int = 64, height: int = 48, seed: int = 0, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    small = (rng.random((max(1, height // 8), max(1, width // 8), 3)) * 255).astype("uint8")
    return encoded(Image.fromarray(small).resize((width, height), Image.BICUBIC), "JPEG", quality=quality)


def png_bytes(width: int = 40, height: int = 30, color=(200, 30, 30)) -> bytes:
    return encoded(Image.new("RGB", (width, height), color), "PNG")


def ppm_bytes() -> bytes:
    """A format PIL reads but that is not kept as is (re-encoded to PNG)."""
    return encoded(Image.new("RGB", (8, 8), (1, 2, 3)), "PPM")


def bomb_png_bytes() -> bytes:
    """A tiny file that declares 64 M pixels (over the 50 M default limit)."""
    return encoded(Image.new("1", (8000, 8000)), "PNG")


def png_from_chunks(width: int, height: int, raw: bytes, interlace: int = 0) -> bytes:
    """An 8-bit RGB PNG with the given filtered scanlines ``raw``, written chunk by chunk."""
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, interlace)),
              (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(data)) + kind + data
                                          + struct.pack(">I", zlib.crc32(kind + data)) for kind, data in chunks)


def image_variants() -> dict[str, bytes]:
    """Well-formed JPEG / PNG flavours the structural check must accept (PIL decodes them all)."""
    photo = Image.open(io.BytesIO(jpeg_bytes(96, 64, seed=3)))
    exif = Image.Exif()
    exif[0x010F] = "camera"
    return {
        "jpeg_progressive": encoded(photo, "JPEG", progressive=True),
        "jpeg_optimized": encoded(photo, "JPEG", optimize=True, subsampling=0),
        "jpeg_gray": encoded(photo.convert("L"), "JPEG"),
        "jpeg_cmyk": encoded(photo.convert("CMYK"), "JPEG"),
        "jpeg_exif_icc": encoded(photo, "JPEG", exif=exif, icc_profile=b"\0" * 300),
        "jpeg_trailing_bytes": encoded(photo, "JPEG") + b"\0" * 40 + b"trailer",
        "png_interlaced": png_from_chunks(1, 1, interlace=1, raw=b"\x00\x10\x20\x30"),  # PIL writes no Adam7
        "png_16bit": encoded(Image.new("I;16", (30, 20), 999), "PNG"),
        "png_palette": encoded(photo.convert("P"), "PNG"),
        "png_rgba": encoded(photo.convert("RGBA"), "PNG"),
    }


BAD_IMAGES = {
    "image_truncated": lambda: jpeg_bytes(64, 48, seed=7)[:400],
    "image_empty": lambda: b"",
    "image_unreadable": lambda: b"this is not an image at all",
    "image_too_large": bomb_png_bytes,
}


def _conversation(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(turns)]


# (expected reason or None, conversations) for every rule of the recipe
CONVERSATION_CASES = [
    (None, _conversation("<image>\nDescribe the image.", "A red square.")),
    (None, _conversation("Describe the image.", "No tag, so one is prepended.")),
    (None, _conversation("Render a clear and concise summary of the photo.\n<image>", "Tag at the end.")),
    (None, _conversation("<image>\nWhat is it?", "A cat.", "And the color?", "Black.")),
    ("empty_conversations", []),
    ("odd_turn_count", _conversation("<image>\nHi", "Hello", "Bye")),
    ("bad_role_order", [{"from": "gpt", "value": "<image>\nx"}, {"from": "human", "value": "y"}]),
    ("multiple_image_tags", _conversation("<image>\n<image>\nTwo?", "Yes.")),
    ("media_tag_first_turn", _conversation("<image>\n<Video> what happens?", "Nothing.")),
    ("media_tag_later_turn", _conversation("<image>\nQ1", "A1", "<IMAGE> Q2", "A2")),
    ("media_tag_in_answer", _conversation("<image>\nQ", "see <image>")),
    ("think_tag_in_answer", _conversation("<image>\nQ", "<think>hmm</think> A")),
    ("empty_answer", _conversation("<image>\nQ", " \n")),
    ("malformed_turn", [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]),
]


def recap_rows(num_good: int = 12, seed: int = 0) -> tuple[list[dict], dict]:
    """ReCap rows (``id``, ``image``, ``conversations``) and the expected reject counts by reason."""
    rows, expected = [], {}
    for i in range(num_good):
        image = jpeg_bytes(64 + i, 48, seed=seed + i) if i % 3 else png_bytes(40, 30 + i)
        rows.append({"id": f"good-{i}", "image": {"bytes": image, "path": None},
                     "conversations": CONVERSATION_CASES[i % 4][1]})
    good_image = {"bytes": jpeg_bytes(32, 32, seed=99), "path": None}
    for i, (reason, conversations) in enumerate(CONVERSATION_CASES[4:]):
        if reason == "malformed_turn":  # the hub schema stores strings: this case only exists in JSON
            continue
        rows.append({"id": f"bad-conv-{i}", "image": good_image, "conversations": conversations})
        expected[reason] = expected.get(reason, 0) + 1
    ok = CONVERSATION_CASES[0][1]
    for reason, make in BAD_IMAGES.items():
        rows.append({"id": f"bad-{reason}", "image": {"bytes": make(), "path": None}, "conversations": ok})
        expected[reason] = expected.get(reason, 0) + 1
    rows.append({"id": "no-image", "image": None, "conversations": ok})
    expected["image_missing"] = 1
    rows.append({"id": "ppm", "image": {"bytes": ppm_bytes(), "path": None}, "conversations": ok})
    return rows, expected


def synthdog_rows(num_good: int = 6) -> tuple[list[dict], dict]:
    def ground_truth(text):
        return json.dumps({"gt_parse": {"text_sequence": text}, "meta": {"version": "1.0.0"}}, ensure_ascii=False)

    rows = [{"image": {"bytes": jpeg_bytes(80, 40, seed=i), "path": None},
             "ground_truth": ground_truth(f"  line {i} 文本  ")} for i in range(num_good)]
    good = {"bytes": jpeg_bytes(40, 40, seed=50), "path": None}
    bad = {
        "ground_truth_not_json": "{'gt_parse': {'text_sequence': __import__('os').getcwd()}}",
        "ground_truth_no_text": json.dumps({"gt_parse": {"other": 1}}),
        "ground_truth_empty_text": ground_truth("   "),
    }
    rows += [{"image": good, "ground_truth": text} for text in bad.values()]
    rows.append({"image": {"bytes": BAD_IMAGES["image_truncated"](), "path": None},
                 "ground_truth": ground_truth("x")})
    rows.append({"image": None, "ground_truth": ground_truth("x")})
    expected = {reason: 1 for reason in bad} | {"image_truncated": 1, "image_missing": 1}
    return rows, expected


def onevision_rows(with_tag: bool = True, count: int = 4, with_image: bool = True) -> list[dict]:
    prompt = "<image>\nWhat shape?" if with_tag else "What shape?"
    return [{"id": f"ov-{i}", "image": {"bytes": png_bytes(20 + i, 20), "path": None} if with_image else None,
             "conversations": _conversation(prompt, f"Square {i}."), "data_source": "fixture"}
            for i in range(count)]


def listdir_files(path: str | os.PathLike) -> list[str]:
    return sorted(os.listdir(path))
