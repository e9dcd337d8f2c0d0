"""Teacher-response format checks and the LLM judge: prompt, request and strict verdict parsing."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .client import ChatClient
from .prompts import NO_THINK, judge_prompt  # noqa: F401  (judge_prompt re-exported for the scripts)
from .runner import Outcome

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"

# A verdict line: optional markdown around "VERDICT: PASS|FAIL" and nothing else on the line.
_VERDICT_LINE = re.compile(r"^[\W_]*verdict[\W_]*?[:：](?P<rest>.*)$", re.IGNORECASE | re.MULTILINE)
_VERDICT_VALUE = re.compile(r"^[\s*`_\[\]().]*(?P<value>pass|fail)[\s*`_\[\]().!]*$", re.IGNORECASE)


class FormatError(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def split_thinking(text: str) -> tuple[str, str]:
    """``<think>T</think>A`` -> ``(T, A)``, both stripped; strict about the tags, ``A`` must not be empty."""
    body = text.strip()
    if not body.startswith(THINK_OPEN):
        raise FormatError("no_think_block")
    if body.count(THINK_OPEN) != 1 or body.count(THINK_CLOSE) != 1:
        raise FormatError("unclosed_think" if THINK_CLOSE not in body else "repeated_think_tags")
    thought, answer = body[len(THINK_OPEN):].split(THINK_CLOSE, 1)
    answer = answer.strip()
    if not answer:
        raise FormatError("empty_answer")
    return thought.strip(), answer


def strip_answer_markup(answer: str) -> tuple[str, bool]:
    """GLM-4.1V's ``<answer>…</answer>`` wrapper and ``<|begin_of_box|>…<|end_of_box|>`` markers removed.

    Returns ``(text, had_box)``; text without the markup is returned stripped, as it is. Training targets of
    both stage-3 pipelines go through here, so the student never learns GLM's markup.
    """
    if ANSWER_OPEN in answer or ANSWER_CLOSE in answer:
        if answer.count(ANSWER_OPEN) != 1 or answer.count(ANSWER_CLOSE) != 1:
            raise FormatError("bad_answer_tags")
        before, rest = answer.split(ANSWER_OPEN, 1)
        if ANSWER_CLOSE not in rest:
            raise FormatError("bad_answer_tags")
        inner, after = rest.split(ANSWER_CLOSE, 1)
        if before.strip() or after.strip():
            raise FormatError("text_outside_answer")
        answer = inner
    has_box = BOX_OPEN in answer
    if answer.count(BOX_OPEN) != answer.count(BOX_CLOSE):
        raise FormatError("unbalanced_box")
    answer = answer.replace(BOX_OPEN, "").replace(BOX_CLOSE, "").strip()
    if not answer:
        raise FormatError("empty_answer")
    return answer, has_box


def teacher_answer(text: str, *, require_thought: bool) -> tuple[str, str, bool]:
    """Check a teacher response; return ``(training text "<think>T</think>\\n\\nA", answer A, had_box)``."""
    thought, answer = split_thinking(text)
    if require_thought and not thought:
        raise FormatError("empty_thought")
    answer, has_box = strip_answer_markup(answer)
    return f"{THINK_OPEN}\n{thought}\n{THINK_CLOSE}\n\n{answer}", answer, has_box


@dataclass(frozen=True)
class Verdict:
    value: str | None  # "PASS", "FAIL" or None (rejected)
    reason: str | None = None  # why there is no value


def parse_verdict(text: str) -> Verdict:
    """The judge's verdict, or None with a reason; anything unclear is rejected.

    Only the part after the thinking block counts (a judge's thoughts may mention both verdicts); GLM's
    ``<answer>`` wrapper and box markers are removed first. Every line of the form ``VERDICT: ...`` must say
    exactly PASS or FAIL, and all of them must agree.
    """
    body = text
    if THINK_CLOSE in body or THINK_OPEN in body:
        if THINK_CLOSE not in body:
            return Verdict(None, "judge_unclosed_think")  # ran out of tokens while thinking
        if body.count(THINK_CLOSE) != 1 or body.count(THINK_OPEN) > 1:
            return Verdict(None, "judge_bad_think_tags")
        body = body.split(THINK_CLOSE, 1)[1]
    try:
        body, _ = strip_answer_markup(body)
    except FormatError as err:
        if err.reason == "empty_answer":
            return Verdict(None, "no_verdict")
        return Verdict(None, f"judge_{err.reason}")
    values = set()
    for match in _VERDICT_LINE.finditer(body):
        value = _VERDICT_VALUE.match(match.group("rest"))
        if value is None:
            return Verdict(None, "malformed_verdict")
        values.add(value.group("value").upper())
    if not values:
        return Verdict(None, "no_verdict")
    if len(values) > 1:
        return Verdict(None, "ambiguous_verdict")
    return Verdict(values.pop())


async def judge_once(client: ChatClient, content: str | list, *, sample_id: str, max_tokens: int | None,
                     context_len: int | None, temperature: float | None, top_p: float | None,
                     seed: int) -> Outcome:
    """Ask the judge once; ``ok`` for PASS, ``rejected`` (with the reason) for anything else."""
    res = await client.ask([{"role": "user", "content": content}], sample_id=sample_id, max_tokens=max_tokens,
                           context_len=context_len, temperature=temperature, top_p=top_p, seed=seed)
    if res is None:
        return Outcome("rejected", "judge_prompt_too_long")
    result = {"evaluation_content": res.text, "evaluation_token_usage": res.usage,
              "evaluation_finish_reason": res.finish_reason}
    if res.finish_reason != "stop":
        return Outcome("rejected", f"judge_finish_{res.finish_reason}", result)
    verdict = parse_verdict(res.text)
    result["assessment"] = verdict.value
    if verdict.value is None:
        return Outcome("rejected", verdict.reason, result)
    return Outcome("ok" if verdict.value == "PASS" else "rejected",
                   None if verdict.value == "PASS" else "judged_fail", result)
