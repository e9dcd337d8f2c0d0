"""A toy verifiable task for the tiny model: three sources in our parquet format, one per answer kind.

    tiny_mcq.parquet    "Which colour dominates this picture?" with options A-C, answer a letter
    tiny_math.parquet   a picture of "What is a + b?", answer the sum (one digit)
    tiny_exact.parquet  "Is this picture bright or dark?", answer one word

Answers are computed from the pictures, so they are right. A random tiny model cannot follow the reply format
on its own; ``TOY_GUIDED_REGEX`` constrains its replies to the Qwen3 thinking format with an answer of the
right shape (vLLM guided decoding), so that some replies are right and some wrong, as with a real model.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ("red", "green", "blue")
SIDE = 112
_THOUGHT = r"<think>\n[a-z]{1,6}( [a-z]{1,6}){0,2}\n</think>\n\n"
TOY_GUIDED_REGEX = (f"mcq={_THOUGHT}(A|B|C)", f"math={_THOUGHT}[0-9]", f"exact={_THOUGHT}(bright|dark)")


def pictures(count: int, folder: Path | None = None) -> list[Image.Image]:
    """Photos from ``folder`` (cycled) or seeded colour fields, at most SIDE px a side."""
    if folder is not None:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
        if not files:
            raise SystemExit(f"tiny_task: no png/jpg images in {folder}")
        out = []
        for i in range(count):
            picture = Image.open(files[i % len(files)]).convert("RGB")
            picture.thumbnail((SIDE, SIDE))
            # a different crop per row, so that rows with the same photo are different questions
            out.append(picture.rotate(90 * (i // len(files)), expand=True))
        return out
    rng = np.random.default_rng(0)
    return [Image.fromarray(np.full((SIDE, SIDE, 3), rng.integers(0, 256, 3), dtype="uint8")) for _ in range(count)]


def png(picture: Image.Image) -> dict:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def text_picture(text: str) -> Image.Image:
    picture = Image.new("RGB", (SIDE * 2, SIDE // 2), (250, 250, 245))
    ImageDraw.Draw(picture).text((8, 20), text, fill=(10, 10, 10))
    return picture


def rows(kind: str, photos: list[Image.Image]) -> list[dict]:
    out = []
    for i, picture in enumerate(photos):
        mean = np.asarray(picture, dtype=np.float32).reshape(-1, 3).mean(axis=0)
        if kind == "mcq":
            order = [COLOURS[(i + j) % 3] for j in range(3)]  # the right option moves between rows
            options = "\n".join(f"{'ABC'[j]}. {c}" for j, c in enumerate(order))
            answer = "ABC"[order.index(COLOURS[int(mean.argmax())])]
            question = f"<image>\nWhich colour dominates this picture?\n{options}\nAnswer with the option's letter."
        elif kind == "math":
            a, b = i % 5, (2 * i + 1) % 5
            picture, answer = text_picture(f"What is {a} + {b}?"), str(a + b)
            question = "<image>\nAnswer the question in the image with a number."
        else:
            if i % 2:  # lighten every other picture: both answers occur
                picture = picture.point(lambda v: 255 - (255 - v) // 4)
                mean = np.asarray(picture, dtype=np.float32).reshape(-1, 3).mean(axis=0)
            answer = "bright" if mean.mean() >= 128 else "dark"
            question = "<image>\nIs this picture bright or dark? Answer with one word."
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                    "images": [png(picture)]})
    return out


def write_tiny_task(output: Path, images: Path | None = None, per_kind: int = 4) -> Path:
    """Write the three toy sources under ``output``; returns ``output``."""
    from datasets import Dataset, Features, Sequence, Value, disable_progress_bars
    from datasets import Image as ImageFeature

    disable_progress_bars()
    features = Features({"messages": [{"role": Value("string"), "content": Value("string")}],
                         "images": Sequence(ImageFeature())})
    output.mkdir(parents=True, exist_ok=True)
    photos = pictures(per_kind, images)
    for kind in ("mcq", "math", "exact"):
        table = rows(kind, photos)
        Dataset.from_dict({"messages": [r["messages"] for r in table], "images": [r["images"] for r in table]},
                          features=features).to_parquet(str(output / f"tiny_{kind}.parquet"))
    return output
