"""Rendering a question as images (``data_process/stage3/render.py``): every character drawn with a real glyph,
nothing cut, seeded colours with enough contrast."""
from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_process.stage3 import render

QUESTION = ("计算定积分 ∫₀¹ x² dx，并说明每一步。\nThen explain, in English, why the result is 1/3 — "
            "and check it with code:\n```python\nprint(sum((i / 1000) ** 2 for i in range(1000)) / 1000)\n```")


def _ink_rows(png: bytes) -> np.ndarray:
    image = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.int16)
    return np.abs(image - np.median(image)).max(axis=1) > 60


def test_render_draws_the_question_itself():
    config = render.RenderConfig()
    out = render.render_text(QUESTION, config, random.Random(1))
    fonts, mono = render.font_sets(config)
    # Every character of the question has a real glyph in the font that draws it.
    assert not fonts.missing(QUESTION) and not mono.missing(QUESTION)
    # The laid-out lines cover the whole text: only whitespace is dropped at soft line breaks.
    covered = list(out.text)
    for line in out.lines:
        covered[line.start:line.end] = [None] * (line.end - line.start)
    assert all(c is None or c.isspace() for c in covered)
    assert out.text.split("\n")[0] in "".join(out.line_texts())  # CJK + formula line kept whole
    assert any(t.strip().startswith("print(sum(") for t in out.line_texts())  # code kept
    # Pixel check: redraw each line's text with PIL directly and compare it with the page.
    page = np.asarray(Image.open(io.BytesIO(out.pages[0])).convert("RGB"))
    background, ink = out.colors
    ref = Image.new("RGB", (config.width, page.shape[0]), background)
    draw = ImageDraw.Draw(ref)
    for row, line in enumerate(out.lines):
        fs = mono if line.mono else fonts
        x, y = float(config.margin), config.margin + row * config.line_height + round(
            (config.line_height - config.font_size) / 2 + config.font_size * 0.8)
        for i, piece in fs.runs(out.text[line.start:line.end]):
            draw.text((x, y), piece, font=fs.font(i), fill=ink, anchor="ls")
            x += fs.font(i).getlength(piece)
    assert np.array_equal(np.asarray(ref), page)
    # ... and a different text gives a different image.
    other = render.render_text(QUESTION.replace("1/3", "2/3"), config, random.Random(1))
    assert other.pages[0] != out.pages[0]
    assert render.contrast_ratio(*out.colors) >= config.min_contrast


def test_render_never_cuts_long_text():
    config = render.RenderConfig(max_pages=50)
    text = "\n".join(f"第{i}行：这是一段很长的题目文字，用来检查换行和分页。line {i} with latin words" for i in range(60))
    out = render.render_text(text, config, random.Random(0))
    assert len(out.pages) > 1
    for png in out.pages:
        with Image.open(io.BytesIO(png)) as image:
            assert image.width * image.height <= config.max_pixels
            assert image.width == config.width
    assert out.text.endswith("line 59 with latin words") and out.lines[-1].end == len(out.text)
    assert sum(_ink_rows(p).any() for p in out.pages) == len(out.pages)  # every page has ink
    with pytest.raises(render.RenderError, match="too_long"):
        render.render_text(text, render.RenderConfig(max_pages=2), random.Random(0))


def test_render_refuses_characters_without_glyph_and_seeds_colours():
    with pytest.raises(render.RenderError) as err:
        render.render_text("question \U000f0000", render.RenderConfig(), random.Random(0))  # private-use plane
    assert err.value.reason == "missing_glyphs"
    a = render.render_text("same", render.RenderConfig(), random.Random(7))
    b = render.render_text("same", render.RenderConfig(), random.Random(7))
    assert a.pages == b.pages


def test_font_discovery_honours_explicit_font(monkeypatch):
    dejavu = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    assert os.path.exists(dejavu), "install.sh installs fonts-dejavu-core"
    monkeypatch.setenv(render.FONT_ENV, dejavu)
    faces = render.font_candidates()
    assert faces[0] == render.FontFace(dejavu)
    assert any("wqy" in f.path or "Noto" in f.path or "CJK" in f.path for f in faces), "no CJK font found"
    with pytest.raises(render.RenderError, match="font_not_found"):
        render.font_candidates(("/no/such/font.ttf",))


def test_language_detection():
    assert render.language_of("识别并解释细胞理论和日心说。") == "zh"
    assert render.language_of("Explain the theory of cells.") == "en"
    assert render.language_of("翻译成中文：The fox jumps") == "zh"  # a Chinese request about English text
    assert render.language_of("Translate this word: 猫") == "en"
    assert render.language_of("用Python写一个排序函数") == "zh"
