"""Small sample inputs for the quickstart, written in the hub datasets' own layouts and schemas from real photos
(scikit-image / matplotlib sample data): LLaVA-ReCap, synthdog, LLaVA-OneVision, the DeepSeek-R1 distill set and
alpaca, plus a four-option benchmark. A few deliberately broken rows show the data scripts' reject counting."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from examples.tiny.hub_layouts import make_onevision_repo, make_recap_repo, make_synthdog_repo

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "gray": (128, 128, 128)}


def photos(images_dir: Path, side: int = 112) -> list[Image.Image]:
    return [Image.open(p).convert("RGB").resize((side, side)) for p in sorted(images_dir.iterdir())]


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def dominant_colour(image: Image.Image) -> str:
    mean = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda name: float(np.sum((mean - np.array(COLOURS[name])) ** 2)))


def conversation(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def write_hub_samples(root: Path, images_dir: Path) -> dict[str, Path]:
    pics = photos(images_dir)
    recap = [{"id": f"recap-{i}", "image": {"bytes": jpeg(p), "path": None},
              "conversations": conversation("Describe the image.\n<image>",  # LLaVA-558K puts <image> last
                                            f"A photo whose colours are mostly {dominant_colour(p)}.")}
             for i, p in enumerate(pics)]
    recap.append({"id": "broken-image", "image": {"bytes": jpeg(pics[0])[:300], "path": None},
                  "conversations": conversation("<image>\nDescribe the image.", "Truncated file.")})
    synthdog = []
    for i, word in enumerate(["qwen merge", "vision tower", "language model", "projector", "文本 识别"]):
        canvas = Image.new("RGB", (224, 56), (250, 250, 245))
        ImageDraw.Draw(canvas).text((8, 20), word.encode("ascii", "ignore").decode() or "text", fill=(20, 20, 20))
        truth = {"gt_parse": {"text_sequence": word}, "meta": {"split": "train"}}
        synthdog.append({"image": {"bytes": jpeg(canvas), "path": None}, "ground_truth": json.dumps(truth)})
    synthdog.append({"image": {"bytes": jpeg(pics[0]), "path": None}, "ground_truth": "{'not': json}"})
    onevision = {
        "ai2d(cauldron,llava_format)": [
            {"id": f"ai2d-{i}", "image": {"bytes": jpeg(p), "path": None}, "data_source": "quickstart",
             "conversations": conversation("Which colour dominates the picture?", dominant_colour(p),
                                           "Is the picture bright?", "yes" if np.asarray(p).mean() > 110 else "no")}
            for i, p in enumerate(pics)],
        "geo3k": [{"id": f"geo-{i}", "image": {"bytes": jpeg(p), "path": None}, "data_source": "quickstart",
                   "conversations": conversation("<image>\nHow wide is the picture in pixels?", str(p.width))}
                  for i, p in enumerate(pics)],
    }
    return {"recap": make_recap_repo(root / "LLaVA-ReCap-558K", recap, num_files=1),
            "synthdog": make_synthdog_repo(root / "synthdog-en", synthdog),
            "onevision": make_onevision_repo(root / "LLaVA-OneVision-Data", onevision)}


QA = [("12 加 30 等于多少？", "42"), ("把“你好”翻译成英文。", "Hello."), ("What is the capital of France?", "Paris."),
      ("Name a primary colour.", "Red."), ("一周有几天？", "七天。"), ("What is 7 times 6?", "42")]


def write_text_sources(root: Path) -> dict[str, Path]:
    """Local copies in the layouts of Congliu/Chinese-DeepSeek-R1-Distill-data-110k and tatsu-lab/alpaca."""
    deepseek, alpaca = root / "deepseek-r1-distill", root / "alpaca"
    deepseek.mkdir(parents=True, exist_ok=True)
    alpaca.mkdir(parents=True, exist_ok=True)
    with open(deepseek / "distill_r1_110k.jsonl", "w", encoding="utf-8") as f:
        for q, a in QA[:3]:
            f.write(json.dumps({"input": q, "content": a, "reasoning_content": "...", "repo_name": "quickstart",
                                "score": 10}, ensure_ascii=False) + "\n")
    records = [{"instruction": q, "input": "", "output": a} for q, a in QA[3:]]
    (alpaca / "alpaca_data.json").write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return {"deepseek": deepseek, "alpaca": alpaca}


def write_mini_benchmark(root: Path, images_dir: Path) -> Path:
    """Four-option colour questions about the photos (answers computed from the pixels), as eval.mcq_tsv input."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, path in enumerate(sorted(images_dir.iterdir())):
        colour = dominant_colour(Image.open(path).convert("RGB"))
        options = list(COLOURS)
        lines.append(json.dumps({"question": "Which colour dominates the picture?", "options": options,
                                 "answer": "ABCD"[options.index(colour)], "image": str(path.resolve()),
                                 "category": "colour", "index": i}))
    questions = root / "questions.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    return questions
