"""Turn a raw Qwen3-style generation into the answer that gets scored.

A thinking model writes ``<think> reasoning </think> answer``. The answer is the text after the *last* ``</think>``.
When the thought never closes (the token budget ran out) there is no answer; what to score then is a policy:

* ``"tail"`` (default): the last paragraph of the unfinished thought, at most ``TAIL_CHARS`` characters. That is
  where a conclusion reached so far sits ("... so the answer is B."), small enough that an exact matcher or a
  judge does not pick option letters out of the whole deliberation.
* ``"empty"``: an empty answer (the original recipe's behaviour; the sample is scored wrong).
* ``"full"``: the whole thought.

The generation layer avoids the case where it can: on a truncated thought it closes the thought itself and lets
the model answer with a small extra budget (see ``eval.generation``), so these policies are the last resort.

Some chat templates open the thought in the prompt (``...<|im_start|>assistant\\n<think>\\n``); then the generation
holds only ``reasoning </think> answer`` and callers pass ``thinking_open=True``.
"""
from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TRUNCATION_POLICIES = ("tail", "empty", "full")
TAIL_CHARS = 500


@dataclass(frozen=True)
class ThinkingSplit:
    thought: str      # reasoning text without the tags ("" when there was none)
    answer: str       # text after the last </think>; "" when the thought is truncated
    truncated: bool   # a thought was opened and never closed


def split_thinking(text: str, thinking_open: bool = False) -> ThinkingSplit:
    """Split a generation into thought and answer. ``thinking_open``: the prompt already ended with ``<think>``."""
    if THINK_CLOSE in text:
        head, _, answer = text.rpartition(THINK_CLOSE)
        thought = head.split(THINK_OPEN, 1)[1] if THINK_OPEN in head else head
        return ThinkingSplit(thought.strip(), answer.strip(), False)
    if THINK_OPEN in text:
        return ThinkingSplit(text.split(THINK_OPEN, 1)[1].strip(), "", True)
    if thinking_open:
        return ThinkingSplit(text.strip(), "", True)
    return ThinkingSplit("", text.strip(), False)


def thought_tail(thought: str, max_chars: int = TAIL_CHARS) -> str:
    """The last non-empty paragraph of a thought, cut to its last ``max_chars`` characters at a word boundary."""
    paragraphs = [p.strip() for p in thought.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if not paragraphs:
        return ""
    tail = paragraphs[-1]
    if len(tail) > max_chars:
        tail = tail[-max_chars:]
        tail = tail.split(" ", 1)[1] if " " in tail else tail
    return tail


def final_answer(text: str, thinking_open: bool = False, on_truncated: str = "tail") -> str:
    """The answer to score for a raw generation (see the module docstring for ``on_truncated``)."""
    if on_truncated not in TRUNCATION_POLICIES:
        raise ValueError(f"on_truncated must be one of {TRUNCATION_POLICIES}, got {on_truncated!r}")
    split = split_thinking(text, thinking_open)
    if not split.truncated:
        return split.answer
    if on_truncated == "tail":
        return thought_tail(split.thought)
    return split.thought if on_truncated == "full" else ""


def boxed_content(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed); None when there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 1, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
    return None
