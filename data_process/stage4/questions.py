"""Verifiable questions from parquet in our format (``messages`` + ``images``, as data_process writes them).

Each row gives one question: its first user turn (``<image>`` tags mark the images, in order) and, as the
reference, the first assistant turn or an ``answer`` column. The kind comes from an ``answer_type`` column
(``mcq`` / ``math`` / ``exact``) or is read from the reference:

* ``mcq``: the reference is one option letter ("B", "(B)", "B.") and the question lists that option;
* ``math``: the reference is a number, a fraction or LaTeX (``\\frac``, ``\\sqrt``, ``$...$``, ``\\boxed``);
* ``exact``: a short answer of at most ``EXACT_MAX_WORDS`` words.

A row that gives no verifiable question is a counted reject (``Reject`` reasons below); the same question
with the same images twice is kept once (``duplicate_question``).
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from data_process.common import IMAGE_PLACEHOLDER, Reject, image_value_bytes
from data_process.stage3.image.process import discover_sources
from data_process.stage3.records import iter_rows
from data_process.stage4.verifier import KINDS, LETTERS

EXACT_MAX_WORDS = 6
EXACT_MAX_CHARS = 64
QUESTION_COLUMNS = ["messages", "images", "answer", "answer_type"]
_LETTER_REFERENCE = re.compile(rf"^\(?([{LETTERS}])\)?[.:]?$")
_NUMBER = re.compile(r"^[-+]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?\s*%?$")
_FRACTION = re.compile(r"^[-+]?\d+\s*/\s*\d+$")
_LATEX = re.compile(r"\\(frac|dfrac|sqrt|pi|boxed|cdot|times|circ)|\$|\^")


@dataclass(frozen=True)
class Question:
    id: str           # hash of the prompt text and image bytes: stable across runs and input order
    source: str
    row: int
    text: str         # the user turn without its <image> tags
    user_turn: str    # the user turn as stored (with its <image> tags), for the training rows
    images: tuple[bytes, ...]
    kind: str
    reference: str


def option_listed(text: str, letter: str) -> bool:
    """Whether the question lists option ``letter`` ("B. ...", "(B) ...", "B: ..." at a line start)."""
    return re.search(rf"(^|\n)\s*\(?{letter}[.):]\s*\S", text) is not None


def answer_kind(question: str, reference: str) -> tuple[str, str]:
    """``(kind, normalised reference)`` read from the reference; raise ``Reject`` when it is not verifiable."""
    reference = reference.strip()
    boxed = re.fullmatch(r"\\boxed\{(.*)\}", reference)
    letter = _LETTER_REFERENCE.match(reference)
    if letter and option_listed(question, letter.group(1)):
        return "mcq", letter.group(1)
    if _NUMBER.match(reference) and any(c.isdigit() for c in reference) or _FRACTION.match(reference) \
            or boxed or _LATEX.search(reference):
        return "math", boxed.group(1) if boxed else reference
    if reference and len(reference.split()) <= EXACT_MAX_WORDS and len(reference) <= EXACT_MAX_CHARS:
        return "exact", reference
    raise Reject("not_verifiable", "the reference is neither a letter, a math answer nor a short answer")


def question_from_row(row: dict, source: str, index: int) -> Question:
    """One row as a :class:`Question`; raise ``Reject`` with a reason when it cannot be one."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Reject("malformed_row", "no messages")
    first_user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
    if first_user is None:
        raise Reject("no_user_turn")
    user_turn = messages[first_user].get("content") or ""
    text = user_turn.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
    if not text:
        raise Reject("empty_question")
    images = tuple(bytes(image_value_bytes(v) or b"") for v in (row.get("images") or []))
    if user_turn.count(IMAGE_PLACEHOLDER) != len(images):
        raise Reject("image_count_mismatch", f"{user_turn.count(IMAGE_PLACEHOLDER)} <image> tags, {len(images)} images")
    if any(not data for data in images):
        raise Reject("image_missing")
    reference = row.get("answer")
    if reference is None:
        after = messages[first_user + 1:first_user + 2]
        reference = after[0].get("content") if after and after[0].get("role") == "assistant" else None
    if not isinstance(reference, str) or not reference.strip():
        raise Reject("no_reference")
    declared = row.get("answer_type")
    if declared:
        if declared not in KINDS:
            raise Reject("unknown_answer_type", f"{declared!r} is not one of {KINDS}")
        kind, reference = declared, reference.strip()
        if kind == "mcq":
            letter = _LETTER_REFERENCE.match(reference)
            if not letter:
                raise Reject("not_verifiable", f"mcq reference {reference[:20]!r} is not a letter")
            reference = letter.group(1)
    else:
        kind, reference = answer_kind(text, reference)
    digest = hashlib.sha256(user_turn.encode())
    for data in images:
        digest.update(hashlib.sha256(data).digest())
    return Question(digest.hexdigest()[:16], source, index, text, user_turn, images, kind, reference)


def load_questions(paths: list[str], rejects: Counter, *, per_source: int | None = None,
                   exclude: tuple[str, ...] = ()) -> list[Question]:
    """Questions of every source (a shard folder or a parquet file) in file and row order.

    ``rejects`` counts the rows left out, by reason. ``per_source`` keeps the first N questions of each source.
    """
    questions: list[Question] = []
    seen: set[str] = set()
    for source in discover_sources(paths, list(exclude)):
        kept = 0
        for index, row in enumerate(_rows(source.files)):
            if per_source is not None and kept >= per_source:
                break
            try:
                question = question_from_row(row, source.name, index)
            except Reject as reject:
                rejects[reject.reason] += 1
                continue
            if question.id in seen:
                rejects["duplicate_question"] += 1
                continue
            seen.add(question.id)
            questions.append(question)
            kept += 1
    return questions


def _rows(files: tuple[str, ...]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for path in files:
        present = set(pq.read_schema(path).names)
        yield from iter_rows(path, columns=[c for c in QUESTION_COLUMNS if c in present])
