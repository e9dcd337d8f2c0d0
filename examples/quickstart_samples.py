"""The quickstart's toy task and its inputs in the hub datasets' own layouts.

The task: a picture of one filled shape (circle, square, triangle, ellipse or rectangle) in one of six colours,
covering 10-80 % of a 64-448 px picture at a random position, on a light background. The question:
"What colour is the shape in the picture? Answer with one word."

Every picture is drawn from a seeded generator; the sets use different seeds, so the held-out benchmark and the
served picture are pictures no training set contains. Written here:
  * LLaVA-ReCap (captions), synthdog (rendered text) and LLaVA-OneVision (questions) in their hub layouts, for
    data_process/process_*.py; a few deliberately broken rows show the scripts' reject counting;
  * the text version of the task in the DeepSeek-R1-distill and alpaca layouts, for stage-3 text2image;
  * a held-out four-option benchmark (eval.mcq_tsv input) and a held-out picture for the served model.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from examples.tiny.hub_layouts import make_onevision_repo, make_recap_repo, make_synthdog_repo

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (240, 210, 20),
           "purple": (130, 40, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle", "ellipse", "rectangle")
BACKGROUNDS = {"white": (255, 255, 255), "light grey": (225, 225, 225), "beige": (245, 240, 220),
               "light blue": (220, 235, 250)}
QUESTION = "What colour is the shape in the picture? Answer with one word."
ONEVISION_CONFIGS = ["clevr(cauldron,llava_format)", "CLEVR-Math(MathV360K)"]
# One seed per picture set: the training data, the benchmark and the served picture never share a picture.
SEEDS = {"hub": 1, "benchmark": 3, "serve": 4, "text": 5}


def draw_picture(rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """One picture of the task and what is in it (``colour``, ``shape``, ``background``, ``cover``)."""
    width, height = (int(v) for v in rng.integers(64, 449, size=2))
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    background_name = str(rng.choice(list(BACKGROUNDS)))
    tint = tuple(int(v) for v in np.clip(np.array(BACKGROUNDS[background_name]) + rng.integers(-8, 9, 3), 0, 255))
    while True:  # a shape whose bounding box fits, covering 10-80 % of the picture
        cover = rng.uniform(0.10, 0.80)
        fill = {"circle": np.pi / 4, "ellipse": np.pi / 4, "triangle": 0.5}.get(shape, 1.0)  # of its bounding box
        box = cover * width * height / fill
        aspect = 1.0 if shape in ("circle", "square") else rng.uniform(0.5, 2.0)
        box_w, box_h = (box * aspect) ** 0.5, (box / aspect) ** 0.5
        if box_w <= width and box_h <= height:
            break
    x0, y0 = rng.uniform(0, width - box_w), rng.uniform(0, height - box_h)
    picture = Image.new("RGB", (width, height), tint)
    draw, xy, rgb = ImageDraw.Draw(picture), [x0, y0, x0 + box_w, y0 + box_h], COLOURS[colour]
    if shape in ("circle", "ellipse"):
        draw.ellipse(xy, fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x0 + box_w / 2, y0), (x0, y0 + box_h), (x0 + box_w, y0 + box_h)], fill=rgb)
    else:
        draw.rectangle(xy, fill=rgb)
    return picture, {"colour": colour, "shape": shape, "background": background_name, "cover": round(cover, 3)}


def pictures(kind: str, count: int) -> list[tuple[Image.Image, dict]]:
    rng = np.random.default_rng(SEEDS[kind])
    return [draw_picture(rng) for _ in range(count)]


def encoded(image: Image.Image, fmt: str = "PNG") -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return {"bytes": buffer.getvalue(), "path": None}


def conversation(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def option_question(colour: str, rng: np.random.Generator) -> str:
    """The colour question with four colour options (the right one among them), laid out as VLMEvalKit's
    multiple-choice benchmarks ask it (``ImageMCQDataset.build_prompt``)."""
    others = [c for c in COLOURS if c != colour]
    options = [colour, *rng.choice(others, size=3, replace=False)]
    rng.shuffle(options)
    lines = "".join(f"{letter}. {option}\n" for letter, option in zip("ABCD", options))
    return f"Question: {QUESTION}\nOptions:\n{lines}Please select the correct answer from the options above. \n"


def write_hub_samples(root: Path, rows: int = 96) -> dict[str, Path]:
    """LLaVA-ReCap, synthdog and LLaVA-OneVision copies of `rows` task pictures each (plus broken rows)."""
    drawn = pictures("hub", 3 * rows)
    recap_part, clevr_part, math_part = drawn[:rows], drawn[rows:2 * rows], drawn[2 * rows:]
    rng = np.random.default_rng(SEEDS["hub"] + 100)
    recap = [{"id": f"recap-{i}", "image": encoded(p, "JPEG"),
              "conversations": conversation("Describe the image.\n<image>",  # LLaVA-558K puts <image> last
                                            f"A {m['colour']} {m['shape']} on a {m['background']} background.")}
             for i, (p, m) in enumerate(recap_part)]
    recap.append({"id": "broken-image", "image": {"bytes": encoded(drawn[0][0], "JPEG")["bytes"][:300], "path": None},
                  "conversations": conversation("<image>\nDescribe the image.", "Truncated file.")})
    synthdog = []
    for i, word in enumerate(["red circle", "blue square", "green triangle", "orange ellipse", "purple box"]):
        canvas = Image.new("RGB", (224, 56), (250, 250, 245))
        ImageDraw.Draw(canvas).text((8, 20), word, fill=(20, 20, 20))
        truth = {"gt_parse": {"text_sequence": word}, "meta": {"split": "train"}}
        synthdog.append({"image": encoded(canvas, "JPEG"), "ground_truth": json.dumps(truth)})
    synthdog.append({"image": encoded(drawn[0][0], "JPEG"), "ground_truth": "{'not': json}"})
    onevision = {  # cauldron configs carry no <image> tag (the converter prepends it); MathV360K ones carry one
        ONEVISION_CONFIGS[0]: [{"id": f"clevr-{i}", "image": encoded(p), "data_source": "quickstart",
                                "conversations": conversation(QUESTION, m["colour"])}
                               for i, (p, m) in enumerate(clevr_part)],
        ONEVISION_CONFIGS[1]: [{"id": f"clevr-math-{i}", "image": encoded(p), "data_source": "quickstart",
                                "conversations": conversation("<image>\n" + option_question(m["colour"], rng),
                                                              m["colour"])}
                               for i, (p, m) in enumerate(math_part)],
    }
    return {"recap": make_recap_repo(root / "LLaVA-ReCap-558K", recap, num_files=2),
            "synthdog": make_synthdog_repo(root / "synthdog-en", synthdog),
            "onevision": make_onevision_repo(root / "LLaVA-OneVision-Data", onevision)}


def text_question(meta: dict) -> str:
    """The task with the picture described in words (what the teacher answers in the text2image pipeline)."""
    return f"A {meta['colour']} {meta['shape']} is drawn on a {meta['background']} background. {QUESTION}"


def write_text_sources(root: Path, rows: int = 8) -> dict[str, Path]:
    """The text version of the task in the layouts of Congliu/Chinese-DeepSeek-R1-Distill-data-110k and
    tatsu-lab/alpaca (reference answers: the colour)."""
    metas = [m for _, m in pictures("text", rows)]
    deepseek, alpaca = root / "deepseek-r1-distill", root / "alpaca"
    deepseek.mkdir(parents=True, exist_ok=True)
    alpaca.mkdir(parents=True, exist_ok=True)
    half = rows // 2
    with open(deepseek / "distill_r1_110k.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"input": text_question(m), "content": m["colour"], "reasoning_content": "...",
                                "repo_name": "quickstart", "score": 10}) + "\n" for m in metas[:half])
    records = [{"instruction": text_question(m), "input": "", "output": m["colour"]} for m in metas[half:]]
    (alpaca / "alpaca_data.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    return {"deepseek": deepseek, "alpaca": alpaca}


def write_benchmark(root: Path, count: int = 24) -> Path:
    """Held-out four-option colour questions (eval.mcq_tsv input): pictures no training set contains."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEEDS["benchmark"] + 100)
    lines = []
    for i, (picture, meta) in enumerate(pictures("benchmark", count)):
        path = images / f"shape-{i:03d}.png"
        picture.save(path)
        others = [c for c in COLOURS if c != meta["colour"]]
        options = [meta["colour"], *rng.choice(others, size=3, replace=False)]
        rng.shuffle(options)
        lines.append(json.dumps({"question": QUESTION, "options": [str(o) for o in options],
                                 "answer": "ABCD"[options.index(meta["colour"])], "image": str(path.resolve()),
                                 "category": meta["shape"], "index": i}))
    questions = root / "questions.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    return questions


def write_serve_picture(root: Path) -> tuple[Path, dict]:
    """One held-out picture for the served model, and what is in it."""
    root.mkdir(parents=True, exist_ok=True)
    picture, meta = pictures("serve", 1)[0]
    path = root / "held-out.png"
    picture.save(path)
    return path, meta
