"""Record-level conversions between LLaVA JSON, Data-Juicer JSONL and MMBench TSV rows.

LLaVA record:  {"id", "image": "rel/path.jpg", "conversations": [{"from": "human"|"gpt", "value"}]}
DJ dialog:     {"id", "images": [path], "text": "[[human]]: <__dj__image>\\nQ\\n[[gpt]]: A <|__dj__eoc|>"}
DJ caption:    {"id", "images": [path], "text": "<__dj__image>\\ncaption <|__dj__eoc|>"} (no role markers)
MMBench row:   {"index", "question", "hint", "A".."D", "answer", "image": base64 | index of another row}
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import Reject
from .images import ImagePolicy
from .parquet_out import IMAGE_PLACEHOLDER
from .rules import Converted, LlavaRowConverter

DJ_IMAGE_TOKEN = "<__dj__image>"
DJ_EOC_TOKEN = "<|__dj__eoc|>"
DEFAULT_CAPTION_PROMPT = "Describe the image briefly."
_DJ_ROLE_MARKER = re.compile(r"\[\[([a-zA-Z]*?)\]\]: ")


@dataclass(frozen=True)
class DjTokens:
    image: str = DJ_IMAGE_TOKEN
    eoc: str = DJ_EOC_TOKEN


def llava_to_dj(record: dict, tokens: DjTokens = DjTokens()) -> dict:
    """A LLaVA record as a Data-Juicer dialog record (role markers ``[[human]]: ``, one eoc at the end)."""
    turns = [f"[[{turn['from']}]]: {turn['value'].replace(IMAGE_PLACEHOLDER, tokens.image)}"
             for turn in record["conversations"]]
    result = {"id": record.get("id"), "text": "\n".join(turns) + f" {tokens.eoc}"}
    result["images"] = [record["image"]] if record.get("image") else []
    return result


def _strip_eoc(text: str, tokens: DjTokens) -> str:
    text = text.rstrip()
    if text.endswith(tokens.eoc):
        text = text[:-len(tokens.eoc)]
        text = text[:-1] if text.endswith(" ") else text
    return text


def dj_to_llava(record: dict, tokens: DjTokens = DjTokens(), caption_prompt: str = DEFAULT_CAPTION_PROMPT,
                questions: dict[str, str] | None = None) -> dict:
    """A Data-Juicer record as a LLaVA record.

    Dialog text (with role markers) maps turn by turn. Caption text becomes one exchange: the question is
    the original one from ``questions`` (id -> first human turn) when known, else ``caption_prompt``.
    """
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise Reject("malformed_row", "a DJ record needs a 'text' string")
    images = record.get("images") or []
    if len({str(p) for p in images}) > 1:
        raise Reject("multiple_images", f"{len(images)} distinct images")
    text = _strip_eoc(record["text"], tokens)
    parts = _DJ_ROLE_MARKER.split(text)
    if len(parts) > 1:
        if parts[0].strip():
            raise Reject("malformed_dialog", "text before the first role marker")
        roles, values = parts[1::2], parts[2::2]
        values = [v[:-1] if v.endswith("\n") else v for v in values[:-1]] + values[-1:]
        conversations = [{"from": r, "value": v.replace(tokens.image, IMAGE_PLACEHOLDER)}
                         for r, v in zip(roles, values)]
    else:
        caption = text.replace(tokens.image, "").strip()
        question = (questions or {}).get(str(record.get("id")))
        if question is None:
            question = f"{IMAGE_PLACEHOLDER}\n{caption_prompt}"
        conversations = [{"from": "human", "value": question}, {"from": "gpt", "value": caption}]
    result = {"id": record.get("id"), "conversations": conversations}
    if images:
        result["image"] = images[0]
    return result


@dataclass(frozen=True)
class DjRowConverter:
    """Data-Juicer JSONL rows to messages, through ``dj_to_llava`` and the LLaVA rules."""

    llava: LlavaRowConverter
    tokens: DjTokens = DjTokens()
    caption_prompt: str = DEFAULT_CAPTION_PROMPT
    columns: tuple[str, ...] = ()

    def row_id(self, row: Any) -> str | None:
        return self.llava.row_id(row)

    def convert(self, row: Any) -> Converted:
        return self.llava.convert(dj_to_llava(row, self.tokens, self.caption_prompt))


# ----------------------------------------------------------------------------------------------- MMBench

MMBENCH_OPTIONS = ("A", "B", "C", "D")
MMBENCH_SUFFIX_EN = "Answer with the option's letter from the given choices directly."
MMBENCH_SUFFIX_ZH = "请直接回答选项字母。"
_CJK = re.compile(r"[\u4e00-\u9fff]")


def _cell(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text if text and text.lower() != "nan" else None


def mmbench_prompt(row: dict) -> str:
    """``<image>`` + hint + question + lettered options + the answer instruction (Chinese if the text is)."""
    question = _cell(row, "question")
    if question is None:
        raise Reject("question_missing")
    options = [f"{key}. {_cell(row, key)}" for key in MMBENCH_OPTIONS if _cell(row, key) is not None]
    if len(options) < 2:
        raise Reject("options_missing", f"{len(options)} option(s)")
    hint = _cell(row, "hint")
    body = "\n".join(([hint] if hint else []) + [question] + options)
    suffix = MMBENCH_SUFFIX_ZH if _CJK.search(body) else MMBENCH_SUFFIX_EN
    return f"{IMAGE_PLACEHOLDER}\n{body}\n{suffix}"


@dataclass
class MmbenchRowConverter:
    """MMBench TSV rows. Rows may point at another row's image by index, so one converter must see the
    file in order (the ``mmbench-to-parquet`` command uses a single shard)."""

    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    keep_unanswered: bool = False
    columns: tuple[str, ...] = ()
    _images: dict[str, str] = field(default_factory=dict, repr=False)

    def row_id(self, row: Any) -> str | None:
        return _cell(row, "index") if isinstance(row, dict) else None

    def _image_bytes(self, row: dict) -> bytes:
        cell = _cell(row, "image")
        if cell is None:
            raise Reject("image_missing")
        if len(cell) < 16:  # an index of the row that holds the image
            if cell not in self._images:
                raise Reject("image_missing", f"refers to unknown row {cell}")
            cell = self._images[cell]
        else:
            self._images[_cell(row, "index") or ""] = cell
        try:
            return base64.b64decode(cell.split(",", 1)[-1] if cell.startswith("data:") else cell, validate=True)
        except (binascii.Error, ValueError):
            raise Reject("image_unreadable", "bad base64") from None

    def convert(self, row: Any) -> Converted:
        if not isinstance(row, dict):
            raise Reject("malformed_row")
        data = self._image_bytes(row)
        prompt = mmbench_prompt(row)
        answer = _cell(row, "answer")
        if answer is None and not self.keep_unanswered:
            raise Reject("answer_missing")
        data, reencoded = self.image_policy.prepare(data)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer or ""}]
        return Converted(messages, [data], int(reencoded))
