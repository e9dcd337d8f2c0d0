#!/usr/bin/env python3
"""Write the tiny datasets of the examples/tiny stage recipes, in the real layout and names.

Each dataset is a folder of parquet shards (`messages` + `images`, as data_process writes them) under --output,
plus a dataset_info.json with the same entries as examples/dataset_info.json:

    LLaVA_ReCap_558K/            captions                          stages 1, 2.1 (template qwen_merge_vl_pt)
    synthdog_en/                 text rendered on a background     stage 2.1
    llavaonevision_converted/    two multi-turn instruction sets   stage 2.2 (template qwen_merge_vl)
    text2image.parquet,          answers with <think> reasoning    stage 3 (single files, as data_process/stage3
    image_thinking.parquet                                          writes them)

Answers are computed from the pictures (colour, brightness, rendered text), so a model can learn them.

    python examples/tiny/make_tiny_data.py --output outputs/tiny/data [--images DIR] [--rows 4]
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from examples.make_dataset_info import dataset_info_entries, folder_of, render

IMAGE_SIDE = 224  # stored pictures are at most 224 px a side: the tiny recipes use <= 112 x 112 pixels
SHARDS = 2
TINY_DATASETS = ("LLaVA_ReCap_558K", "synthdog_en", "ai2d_gpt4v", "sharegpt4v_coco", "text2image", "image_thinking")
WORDS = ("apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "forest")


def synthetic_pictures(count: int) -> list[Image.Image]:
    """Colour gradients with a rectangle, when no photos are given."""
    rng = np.random.default_rng(0)
    pictures = []
    for _ in range(count):
        base = rng.integers(0, 256, size=3)
        ramp = np.linspace(0.4, 1.0, IMAGE_SIDE)[None, :, None]
        pixels = np.broadcast_to(base * ramp, (IMAGE_SIDE, IMAGE_SIDE, 3)).astype("uint8").copy()
        x0, y0 = rng.integers(10, IMAGE_SIDE // 2, size=2)
        pixels[y0:y0 + 60, x0:x0 + 80] = 255 - base
        pictures.append(Image.fromarray(pixels))
    return pictures


def load_pictures(folder: Path | None, count: int) -> list[Image.Image]:
    if folder is None:
        return synthetic_pictures(count)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
    if not files:
        raise SystemExit(f"make_tiny_data: no images (png/jpg/webp/bmp) in {folder}")
    pictures = []
    for i in range(count):
        picture = Image.open(files[i % len(files)]).convert("RGB")
        picture.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
        pictures.append(picture)
    return pictures


def text_picture(text: str) -> Image.Image:
    picture = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE // 2), (250, 250, 245))
    ImageDraw.Draw(picture).text((12, 40), text, fill=(10, 10, 10))
    return picture


def colour_words(picture: Image.Image) -> tuple[str, str]:
    """(dominant colour, 'bright' or 'dark') of a picture."""
    mean = np.asarray(picture, dtype=np.float32).reshape(-1, 3).mean(axis=0)
    return ("red", "green", "blue")[int(mean.argmax())], "bright" if mean.mean() >= 128 else "dark"


def encoded(picture: Image.Image) -> dict:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def chat(*turns: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


def rows_for(name: str, pictures: list[Image.Image]) -> list[tuple[list[dict], Image.Image]]:
    rows = []
    for i, picture in enumerate(pictures):
        colour, light = colour_words(picture)
        word = WORDS[i % len(WORDS)]
        a, b = 3 + 4 * i, 7 + i
        if name == "LLaVA_ReCap_558K":
            rows.append((chat("<image>\nDescribe the image briefly.", f"A {light} picture, mostly {colour}."), picture))
        elif name == "synthdog_en":
            text = f"{word} {a} {WORDS[(i + 3) % len(WORDS)]}"
            rows.append((chat("<image>\nRead the text in the image.", text), text_picture(text)))
        elif name == "ai2d_gpt4v":
            rows.append((chat("<image>\nWhat is the main colour of this picture?", f"It is mostly {colour}.",
                              "Is it bright or dark?", f"It is {light}."), picture))
        elif name == "sharegpt4v_coco":
            rows.append((chat("<image>\nGive a one-word description of the brightness.", light.capitalize() + "."),
                         picture))
        elif name == "text2image":
            answer = f"<think>\nThe question asks for {a} + {b}. Adding them gives {a + b}.\n</think>\n\n{a + b}"
            rows.append((chat("<image>\nPlease answer the question in the image.", answer),
                         text_picture(f"What is {a} + {b}?")))
        elif name == "image_thinking":
            answer = (f"<think>\nThe picture is mostly {colour} and looks {light} overall.\n</think>\n\n"
                      f"The picture is {light}.")
            rows.append((chat("<image>\nIs this picture bright or dark?", answer), picture))
        else:
            raise ValueError(f"no tiny rows for dataset {name!r}")
    return rows


def write_dataset(output: Path, name: str, rows: list[tuple[list[dict], Image.Image]]) -> None:
    from datasets import Dataset, Features, Sequence, Value, disable_progress_bars
    from datasets import Image as ImageFeature

    disable_progress_bars()
    features = Features({"messages": [{"role": Value("string"), "content": Value("string")}],
                         "images": Sequence(ImageFeature())})
    target = output / folder_of(name)
    if target.suffix == ".parquet":  # stage 3: one file
        table = {"messages": [m for m, _ in rows], "images": [[encoded(p)] for _, p in rows]}
        Dataset.from_dict(table, features=features).to_parquet(str(target))
        return
    folder = target
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(SHARDS):
        part = rows[shard::SHARDS]
        table = {"messages": [m for m, _ in part], "images": [[encoded(p)] for _, p in part]}
        shard_file = folder / f"{name}-{shard:05d}-of-{SHARDS:05d}.parquet"
        Dataset.from_dict(table, features=features).to_parquet(str(shard_file))


def make_tiny_data(output: Path, images: Path | None = None, rows: int = 4) -> Path:
    """Write every tiny dataset and dataset_info.json under `output`; returns `output`."""
    pictures = load_pictures(images, rows)
    for name in TINY_DATASETS:
        write_dataset(output, name, rows_for(name, pictures))
    (output / "dataset_info.json").write_text(render(dataset_info_entries(list(TINY_DATASETS))))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--output", type=Path, required=True, help="dataset_dir of the tiny recipes")
    parser.add_argument("--images", type=Path, help="folder of photos to use (default: synthetic pictures)")
    parser.add_argument("--rows", type=int, default=4, help="rows per dataset, split over 2 shards (default: 4)")
    args = parser.parse_args(argv)
    if args.rows < SHARDS:
        parser.error(f"--rows must be at least {SHARDS}")
    if args.images is not None and not args.images.is_dir():
        parser.error(f"--images {args.images} is not a folder")
    make_tiny_data(args.output, args.images, args.rows)
    print(f"wrote {len(TINY_DATASETS)} tiny datasets ({args.rows} rows each) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
