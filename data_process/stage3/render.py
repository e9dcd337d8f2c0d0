"""Render a question as one or more images, for text-to-image distillation samples.

* Fonts: ``--font`` / ``$DISTILL_FONT`` first, then fontconfig's fallback list for Chinese sans-serif, then
  known paths (WenQuanYi, Noto CJK, Droid, AR PL, macOS, Windows), then DejaVu/Liberation. Each character
  is drawn with the first font whose character map has it (checked with fontTools); text with a character
  no font covers is refused rather than drawn as a box.
* Layout: newlines kept, CJK wraps between characters, other text between words (over-long words are
  split), leading indentation kept, code fences drawn in a monospace font; nothing is ever cut: the image
  grows, and past the per-image pixel budget the text continues on further pages.
* Colours are drawn from a per-sample seed and kept only at a contrast ratio >= ``min_contrast`` (WCAG).
"""
from __future__ import annotations

import colorsys
import io
import os
import random
import re
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass, field
from functools import cache, lru_cache

from PIL import Image, ImageDraw, ImageFont

FONT_ENV = "DISTILL_FONT"
TAB_SIZE = 4
CJK = r"\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
# Tokens for wrapping: whitespace runs, single CJK characters, runs of anything else (words).
_TOKENS = re.compile(rf"\s+|[{CJK}]|[^\s{CJK}]+")
_IDEOGRAPH = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")

KNOWN_FONT_PATHS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/wqy-microhei/wqy-microhei.ttc",
    "/usr/share/fonts/wqy-zenhei/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/usr/share/fonts/TTF/wqy-microhei.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/simhei.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
)
KNOWN_MONO_PATHS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationMono-Regular.ttf",
)


class RenderError(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------- fonts

@dataclass(frozen=True)
class FontFace:
    path: str
    index: int = 0


def _fontconfig(*args: str) -> list[str]:
    """Output lines of a fontconfig tool, or [] where fontconfig is missing or fails."""
    if not shutil.which(args[0]):
        return []
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.splitlines() if line.strip()]


def _faces_from_fontconfig(pattern: str, *, all_matches: bool) -> list[FontFace]:
    fmt = "%{file}|%{index}|%{style}\\n"
    lines = _fontconfig("fc-match", *(["-s"] if all_matches else []), "-f", fmt, pattern)
    faces = []
    for line in lines:
        path, index, style = (line.split("|") + ["", ""])[:3]
        if all_matches and re.search(r"bold|italic|oblique", style, re.IGNORECASE):
            continue
        if os.path.isfile(path):
            faces.append(FontFace(path, int(index or 0)))
    return faces


def _faces_from_fc_list(pattern: str) -> list[FontFace]:
    """Only the installed fonts that really match ``pattern`` (``fc-match`` would always answer something)."""
    faces = []
    for line in sorted(_fontconfig("fc-list", pattern, "--format", "%{file}|%{index}\\n")):
        path, _, index = line.partition("|")
        if os.path.isfile(path):
            faces.append(FontFace(path, int(index or 0)))
    return faces


def _explicit_faces(entries: list[str]) -> list[FontFace]:
    """``--font``/``$DISTILL_FONT`` entries: a font file (``path`` or ``path:index``) or a fontconfig pattern
    such as ``Noto Sans CJK SC``."""
    faces = []
    for entry in entries:
        path, _, index = entry.rpartition(":") if re.search(r":\d+$", entry) else (entry, "", "0")
        looks_like_file = os.sep in entry or entry.lower().endswith((".ttf", ".ttc", ".otf"))
        if os.path.isfile(path):
            found = [FontFace(path, int(index))]
        else:
            found = [] if looks_like_file else _faces_from_fc_list(entry)
        if not found:
            raise RenderError("font_not_found", entry)
        faces.extend(found)
    return faces


def font_candidates(explicit: tuple[str, ...] = (), *, mono: bool = False) -> list[FontFace]:
    """Ordered, de-duplicated font faces to try for each character."""
    entries = list(explicit) + [e for e in os.environ.get(FONT_ENV, "").split(os.pathsep) if e]
    faces = []
    if mono:
        faces += _faces_from_fontconfig("monospace", all_matches=False)
        faces += [FontFace(p) for p in KNOWN_MONO_PATHS if os.path.isfile(p)]
    faces += _explicit_faces(entries)
    faces += _faces_from_fontconfig("sans-serif:lang=zh-cn", all_matches=True)
    faces += [FontFace(p) for p in KNOWN_FONT_PATHS if os.path.isfile(p)]
    faces += _faces_from_fontconfig("sans-serif", all_matches=False)
    return list(dict.fromkeys(faces))


@cache
def _cmap(face: FontFace) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    with TTFont(face.path, fontNumber=face.index, lazy=True) as font:
        return frozenset(font.getBestCmap() or {})


def _needs_glyph(ch: str) -> bool:
    return not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf")


class FontSet:
    """Fonts in priority order; each character is drawn with the first one that has a glyph for it."""

    def __init__(self, faces: list[FontFace], size: int):
        if not faces:
            raise RenderError("no_font", "no usable font found; install fonts-wqy-microhei or pass --font")
        self.faces = faces
        self.size = size
        self._fonts: dict[int, ImageFont.FreeTypeFont] = {}
        self._choice: dict[str, int | None] = {}

    def face_index(self, ch: str) -> int | None:
        """Index of the face that draws ``ch`` (whitespace uses the first face); None if none can."""
        if ch not in self._choice:
            if not _needs_glyph(ch):
                self._choice[ch] = 0
            else:
                code = ord(ch)
                self._choice[ch] = next((i for i, f in enumerate(self.faces) if code in _cmap(f)), None)
        return self._choice[ch]

    def font(self, i: int) -> ImageFont.FreeTypeFont:
        if i not in self._fonts:
            face = self.faces[i]
            self._fonts[i] = ImageFont.truetype(face.path, self.size, index=face.index)
        return self._fonts[i]

    def missing(self, text: str) -> list[str]:
        return sorted({ch for ch in text if self.face_index(ch) is None})

    def runs(self, text: str) -> list[tuple[int, str]]:
        """``text`` split into ``(face index, piece)`` runs."""
        out: list[tuple[int, str]] = []
        for ch in text:
            i = self.face_index(ch) or 0
            if out and out[-1][0] == i:
                out[-1] = (i, out[-1][1] + ch)
            else:
                out.append((i, ch))
        return out

    def width(self, text: str) -> float:
        return sum(self.font(i).getlength(piece) for i, piece in self.runs(text))


# ----------------------------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Line:
    start: int  # offsets into the normalised text
    end: int
    mono: bool = False


def normalize(text: str) -> str:
    """Unify newlines, expand tabs, drop other control characters and surrounding blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.expandtabs(TAB_SIZE) for line in text.split("\n"))
    text = "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch) != "Cc")
    return text.strip("\n").rstrip()


def _wrap(text: str, start: int, end: int, fonts: FontSet, width: float, mono: bool) -> list[Line]:
    """Greedy wrap of ``text[start:end]`` (one paragraph); whitespace at a soft break is dropped."""
    lines: list[Line] = []
    line_start, line_end, used = start, start, 0.0
    for match in _TOKENS.finditer(text, start, end):
        tok, t0, t1 = match.group(), match.start(), match.end()
        w = fonts.width(tok)
        if used + w <= width or (tok.isspace() and line_end == line_start and t0 == start):
            line_end, used = t1, used + w  # fits (leading indentation is always kept)
            continue
        if tok.isspace():  # soft break: the whitespace is not drawn
            lines.append(Line(line_start, line_end, mono))
            line_start = line_end = t1
            used = 0.0
            continue
        if line_end > line_start:
            lines.append(Line(line_start, line_end, mono))
            line_start = line_end = t0
            used = 0.0
        if w <= width:
            line_end, used = t1, w
            continue
        for i in range(t0, t1):  # a word wider than the line: split between characters
            cw = fonts.width(text[i])
            if used + cw > width and line_end > line_start:
                lines.append(Line(line_start, line_end, mono))
                line_start, used = i, 0.0
            line_end, used = i + 1, used + cw
    lines.append(Line(line_start, line_end, mono))
    return lines


def layout(text: str, fonts: FontSet, mono_fonts: FontSet, width: float) -> list[Line]:
    """Lines of the normalised ``text``; code fences and their content use ``mono_fonts``."""
    lines: list[Line] = []
    pos, in_code = 0, False
    for paragraph in text.split("\n"):
        end = pos + len(paragraph)
        fence = paragraph.lstrip().startswith("```")
        mono = in_code or fence
        lines += _wrap(text, pos, end, mono_fonts if mono else fonts, width, mono)
        if fence:
            in_code = not in_code
        pos = end + 1
    return lines


# ----------------------------------------------------------------------------------------------- drawing

def _luminance(rgb: tuple[int, int, int]) -> float:
    def channel(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v))


def pick_colors(rng: random.Random, min_contrast: float) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A light background and a dark complementary text colour with at least ``min_contrast``."""
    for _ in range(32):
        hue = rng.random()
        background = _hsv(hue, rng.uniform(0.03, 0.25), rng.uniform(0.9, 1.0))
        text = _hsv((hue + 0.5) % 1.0, rng.uniform(0.4, 0.9), rng.uniform(0.05, 0.45))
        if contrast_ratio(background, text) >= min_contrast:
            return background, text
    return (255, 255, 255), (0, 0, 0)


@dataclass(frozen=True)
class RenderConfig:
    fonts: tuple[str, ...] = ()  # explicit fonts (paths or fontconfig patterns), tried first
    font_size: int = 22
    line_spacing: float = 1.45
    margin: int = 24
    width: int = 672
    max_pixels: int = 262144  # per image; matches the stage-3 training `image_max_pixels`
    max_pages: int = 6
    min_contrast: float = 7.0

    @property
    def line_height(self) -> int:
        return round(self.font_size * self.line_spacing)

    @property
    def lines_per_page(self) -> int:
        return max(1, (self.max_pixels // self.width - 2 * self.margin) // self.line_height)


@dataclass
class Rendered:
    pages: list[bytes]  # PNG files
    text: str  # the normalised text that was drawn
    lines: list[Line]
    colors: tuple
    faces: list[FontFace] = field(default_factory=list)

    def line_texts(self) -> list[str]:
        return [self.text[line.start:line.end] for line in self.lines]


@lru_cache(maxsize=8)
def font_sets(config: RenderConfig) -> tuple[FontSet, FontSet]:
    """The proportional and monospace font sets of ``config`` (cached per process)."""
    return (FontSet(font_candidates(config.fonts), config.font_size),
            FontSet(font_candidates(config.fonts, mono=True), config.font_size))


def _draw_page(lines: list[Line], text: str, fonts: FontSet, mono: FontSet, config: RenderConfig,
               colors) -> bytes:
    background, ink = colors
    height = 2 * config.margin + len(lines) * config.line_height
    image = Image.new("RGB", (config.width, height), background)
    draw = ImageDraw.Draw(image)
    baseline_offset = round((config.line_height - config.font_size) / 2 + config.font_size * 0.8)
    for row, line in enumerate(lines):
        fs = mono if line.mono else fonts
        x = float(config.margin)
        y = config.margin + row * config.line_height + baseline_offset
        for i, piece in fs.runs(text[line.start:line.end]):
            font = fs.font(i)
            draw.text((x, y), piece, font=font, fill=ink, anchor="ls")
            x += font.getlength(piece)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_text(text: str, config: RenderConfig, rng: random.Random) -> Rendered:
    """Render ``text`` (normalised first); raise :class:`RenderError` rather than lose any of it."""
    text = normalize(text)
    if not text.strip():
        raise RenderError("empty_text")
    fonts, mono = font_sets(config)
    missing = fonts.missing(text)
    if missing:
        raise RenderError("missing_glyphs", "".join(missing[:20]))
    lines = layout(text, fonts, mono, config.width - 2 * config.margin)
    per_page = config.lines_per_page
    pages = [lines[i:i + per_page] for i in range(0, len(lines), per_page)]
    if len(pages) > config.max_pages:
        raise RenderError("too_long", f"{len(lines)} lines > {config.max_pages} pages of {per_page}")
    colors = pick_colors(rng, config.min_contrast)
    images = [_draw_page(page, text, fonts, mono, config, colors) for page in pages]
    return Rendered(images, text, lines, colors, fonts.faces)


def language_of(text: str) -> str:
    """``zh`` when Chinese characters make up at least 30 % of the words (a CJK character counts as one)."""
    cjk = len(_IDEOGRAPH.findall(text))
    latin = len(_LATIN_WORD.findall(text))
    return "zh" if cjk and cjk / (cjk + latin) >= 0.3 else "en"
