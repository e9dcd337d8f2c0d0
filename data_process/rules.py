"""Per-row rules of the stage 1/2 recipe and the row converters the scripts hand to the pipeline.

A converter is a small picklable object with ``columns`` (input columns to read), ``row_id(row)`` and
``convert(row) -> Converted``; it raises ``Reject(reason)`` for a row that must be dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import Reject
from .images import ImagePolicy, image_value_bytes
from .parquet_out import IMAGE_PLACEHOLDER
from .paths import read_image_file

_MEDIA_TAG = re.compile(r"<(image|audio|video)>", re.IGNORECASE)
_NON_IMAGE_MEDIA_TAG = re.compile(r"<(audio|video)>", re.IGNORECASE)
_THINK_TAG = re.compile(r"</?think>", re.IGNORECASE)
_ROLE_NAMES = {"human": "user", "gpt": "assistant"}

FIRST_TURN_PREPEND = "prepend"  # no <image> in the first user turn: prepend "<image>\n"
FIRST_TURN_REQUIRE = "require"  # the first user turn must hold exactly one <image>


class Converted(NamedTuple):
    messages: list[dict]
    images: list[bytes]
    reencoded: int = 0


def _first_turn_text(text: str, policy: str) -> str:
    if _NON_IMAGE_MEDIA_TAG.search(text):
        raise Reject("media_tag_first_turn", "audio/video tag in the first user turn")
    count = text.count(IMAGE_PLACEHOLDER)
    if count > 1:
        raise Reject("multiple_image_tags", f"{count} <image> tags in the first user turn")
    if count == 0:
        if policy == FIRST_TURN_REQUIRE:
            raise Reject("missing_image_tag", "no <image> tag in the first user turn")
        return f"{IMAGE_PLACEHOLDER}\n{text}"
    stripped = text.rstrip()
    if stripped.endswith(IMAGE_PLACEHOLDER) and stripped != IMAGE_PLACEHOLDER:
        # LLaVA-558K style "question\n<image>": move the image in front, as at inference time
        return f"{IMAGE_PLACEHOLDER}\n{stripped[:-len(IMAGE_PLACEHOLDER)].rstrip()}"
    return text


def _check_answer(text: str, turn_index: int) -> None:
    if not text.strip():  # training on it teaches the model to stop at once
        raise Reject("empty_answer", f"turn {turn_index}")
    if _MEDIA_TAG.search(text):
        raise Reject("media_tag_in_answer", f"turn {turn_index}")
    if _THINK_TAG.search(text):
        raise Reject("think_tag_in_answer", f"turn {turn_index}")


def conversations_to_messages(conversations: Any, first_turn: str = FIRST_TURN_PREPEND) -> list[dict]:
    """LLaVA ``conversations`` ([{from, value}], human/gpt alternating) to sharegpt ``messages``.

    Exactly one ``<image>`` ends up in the first user turn; no media tag may appear later, and answers
    may not be blank or hold ``<think>`` tags.
    """
    if not isinstance(conversations, list) or not conversations:
        raise Reject("empty_conversations")
    if len(conversations) % 2:
        raise Reject("odd_turn_count", f"{len(conversations)} turns")
    messages = []
    for turn_index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise Reject("malformed_turn", f"turn {turn_index}")
        expected = "human" if turn_index % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise Reject("bad_role_order", f"turn {turn_index} is {turn.get('from')!r}, expected {expected!r}")
        text = turn["value"]
        if turn_index == 0:
            text = _first_turn_text(text, first_turn)
        elif expected == "human" and _MEDIA_TAG.search(text):
            raise Reject("media_tag_later_turn", f"turn {turn_index}")
        elif expected == "gpt":
            _check_answer(text, turn_index)
        messages.append({"role": _ROLE_NAMES[expected], "content": text})
    return messages


def messages_to_conversations(messages: list[dict]) -> list[dict]:
    """The inverse of ``conversations_to_messages`` (roles only; text kept as is)."""
    names = {v: k for k, v in _ROLE_NAMES.items()}
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


def _require_dict(row: Any) -> dict:
    if not isinstance(row, dict):
        raise Reject("malformed_row", f"expected an object, got {type(row).__name__}")
    return row


@dataclass(frozen=True)
class LlavaRowConverter:
    """Rows with ``id``, ``image`` and LLaVA ``conversations`` (ReCap, OneVision, LLaVA JSON/JSONL).

    ``image`` is an HF Image cell or raw bytes, or, for JSON inputs, a path read below ``image_roots``
    (relative paths are looked up below ``image_bases``, default the roots).
    """

    first_turn: str = FIRST_TURN_PREPEND
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    image_roots: tuple[str, ...] = ()
    image_bases: tuple[str, ...] = ()
    columns: tuple[str, ...] = ("id", "image", "conversations")

    def row_id(self, row: Any) -> str | None:
        value = row.get("id") if isinstance(row, dict) else None
        return None if value is None else str(value)

    def load_image(self, value: Any) -> bytes:
        if isinstance(value, list):  # LLaVA JSON may hold a one-element list of paths
            if len(value) != 1:
                raise Reject("multiple_images" if value else "image_missing", f"{len(value)} images")
            value = value[0]
        data = image_value_bytes(value)
        if data is None:
            path = value.get("path") if isinstance(value, dict) else value
            if not isinstance(path, str) or not path:
                raise Reject("image_missing")
            data = read_image_file(path, self.image_roots, self.image_bases)
        return data

    def convert(self, row: Any) -> Converted:
        row = _require_dict(row)
        if row.get("image") in (None, []):
            raise Reject("image_missing")
        messages = conversations_to_messages(row.get("conversations"), self.first_turn)
        data, reencoded = self.image_policy.prepare(self.load_image(row["image"]))
        return Converted(messages, [data], int(reencoded))


SYNTHDOG_PROMPTS = {
    "en": "Please recognize all text in the image and output the text.",
    "zh": "Please identify the text in this image and output plain text.",
}


def synthdog_text(ground_truth: Any) -> str:
    """``gt_parse.text_sequence`` of a synthdog ``ground_truth`` JSON string (parsed with ``json.loads``)."""
    if not isinstance(ground_truth, str):
        raise Reject("ground_truth_missing")
    try:
        parsed = json.loads(ground_truth)
    except json.JSONDecodeError as error:
        raise Reject("ground_truth_not_json", error.msg) from None
    text = parsed.get("gt_parse", {}).get("text_sequence") if isinstance(parsed, dict) else None
    if not isinstance(text, str):
        raise Reject("ground_truth_no_text")
    if not text.strip():
        raise Reject("ground_truth_empty_text")
    return text.strip()


@dataclass(frozen=True)
class SynthdogRowConverter:
    """synthdog rows (``image``, ``ground_truth``) to an OCR instruction."""

    language: str = "en"
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    columns: tuple[str, ...] = ("image", "ground_truth")

    def row_id(self, row: Any) -> str | None:
        return None

    def convert(self, row: Any) -> Converted:
        row = _require_dict(row)
        data = image_value_bytes(row.get("image"))
        if data is None:
            raise Reject("image_missing")
        text = synthdog_text(row.get("ground_truth"))
        data, reencoded = self.image_policy.prepare(data)
        prompt = f"{IMAGE_PLACEHOLDER}\n{SYNTHDOG_PROMPTS[self.language]}"
        return Converted([{"role": "user", "content": prompt}, {"role": "assistant", "content": text}],
                         [data], int(reencoded))
