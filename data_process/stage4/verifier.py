"""One verifier for rollouts of verifiable questions: a verdict and, for a reject, exactly one reason.

Checks run in this order; the first that fails is the reason:

  format       ``over_budget``         the reply hit the token budget (finish_reason "length" or more tokens than
                                       ``max_tokens``)
               ``thought_not_closed``  no ``</think>`` (thinking is on: every reply must close its thought)
               ``no_answer``           nothing after ``</think>``
  correctness  ``no_choice``           MCQ: no option letter can be read from the answer
               ``wrong_choice``        MCQ: another letter than the reference
               ``not_equivalent``      math: ``math-verify`` finds the answer not equal to the reference
               ``mismatch``            exact: the normalised answer differs from the normalised reference

The thought/answer split and ``\\boxed{}`` come from ``eval/answers.py``, as in evaluation. Math equivalence is
``math_verify`` (sympy-based; nothing is ever ``eval``-ed).
"""
from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass

from eval.answers import boxed_content, split_thinking

KINDS = ("mcq", "math", "exact")
FORMAT_REASONS = ("over_budget", "thought_not_closed", "no_answer")
CORRECTNESS_REASONS = ("no_choice", "wrong_choice", "not_equivalent", "mismatch")
REASONS = FORMAT_REASONS + CORRECTNESS_REASONS

LETTERS = "ABCDEFGHIJ"
# "B", "(B)", "B.", "B) text", "B: text", "**B**"; then "answer is B", "option (B)", "choice: B".
_LEADING_LETTER = re.compile(rf"^[\s*(\[]*([{LETTERS}])(?:[*)\].:,]|$)")  # not "I pick ..." / "A cat"
_STATED_LETTER = re.compile(rf"(?i:answer|option|choice)\s*(?i:is|:)?\s*[*(\[]*([{LETTERS}])\b")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reason: str | None  # None when correct, else one of REASONS
    answer: str         # the answer that was scored ("" when there was none)

    @property
    def well_formed(self) -> bool:
        return self.reason not in FORMAT_REASONS


def choice_letter(answer: str) -> str | None:
    """The option letter an MCQ answer gives: boxed, leading ("B. cat"), or stated ("the answer is (B)")."""
    boxed = boxed_content(answer)
    for text in ([boxed] if boxed else []) + [answer]:
        text = text.strip()
        match = _LEADING_LETTER.match(text) or _STATED_LETTER.search(text)
        if match:
            return match.group(1).upper()
    return None


def normalise(text: str) -> str:
    """Lower case, NFKC, no punctuation, no articles, single spaces (SQuAD-style)."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def math_equivalent(answer: str, reference: str) -> bool:
    """Whether ``answer`` equals ``reference`` mathematically (``math_verify``: LaTeX and plain expressions)."""
    from math_verify import parse, verify

    gold = parse(reference if "\\boxed" in reference or "$" in reference else f"${reference}$")
    if not gold:
        gold = parse(reference)
    target = parse(answer)
    return bool(gold and target and verify(gold, target))


def verify_reply(text: str, kind: str, reference: str, *, finish_reason: str | None = None,
                 tokens: int | None = None, max_tokens: int | None = None) -> Verdict:
    """Score one generated reply (raw text, thought included) against the question's reference."""
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r} (one of {KINDS})")
    if finish_reason == "length" or (max_tokens is not None and tokens is not None and tokens > max_tokens):
        return Verdict(False, "over_budget", "")
    split = split_thinking(text)
    if "</think>" not in text:
        return Verdict(False, "thought_not_closed", "")
    answer = split.answer
    if not answer:
        return Verdict(False, "no_answer", "")
    if kind == "mcq":
        letter = choice_letter(answer)
        if letter is None:
            return Verdict(False, "no_choice", answer)
        return Verdict(letter == reference.strip().upper(), None if letter == reference.strip().upper()
                       else "wrong_choice", answer)
    if kind == "math":
        ok = math_equivalent(answer, reference)
        return Verdict(ok, None if ok else "not_equivalent", answer)
    scored = boxed_content(answer) or answer
    ok = normalise(scored) == normalise(reference)
    return Verdict(ok, None if ok else "mismatch", answer)
