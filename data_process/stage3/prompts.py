"""Prompt texts of the stage-3 scripts (this project's own wording)."""
from __future__ import annotations

NO_THINK = " /no_think"  # Qwen3 soft switch, appended to the user turn

# User turn of a rendered text2image sample (after the <image> placeholders).
RENDERED_INSTRUCTION = {
    ("en", 1): "Answer the question shown in the image.",
    ("en", 2): "The question is split across these images, in order. Answer it.",
    ("zh", 1): "请回答图片中展示的问题。",
    ("zh", 2): "问题按顺序分布在这几张图片中，请作答。",
}

VERDICT_INSTRUCTION = ("First explain your judgement in at most three sentences. Then end with one line that is "
                       "exactly `VERDICT: PASS` or exactly `VERDICT: FAIL`, and nothing after it.")

_JUDGE_RULES = """\
Rules:
1. If the reference is objective (a number, an option letter, a name, a date, a formula or another short fixed \
result), the candidate's final result must agree with it.
2. If the reference is open-ended (an explanation, an essay, advice, a translation), the candidate passes when it \
does not contradict the reference and is at least as helpful; it may be better than the reference.
3. The candidate fails if it is factually wrong, misses an essential part of the question, contradicts itself, \
is off-topic or is harmful.
4. Judge only the content, not the language or the formatting."""

TEXT_JUDGE = """\
You are checking an answer written by an AI model against a reference answer.

{rules}

### Question
{question}

### Reference answer
{reference}

### Candidate answer
{candidate}

{verdict}"""

IMAGE_JUDGE = """\
You are checking an answer written by an AI model about the attached image against a reference answer. \
Look at the image yourself to check any facts the answer states about it.

{rules}

### Question about the image
{question}

### Reference answer
{reference}

### Candidate answer
{candidate}

{verdict}"""

NO_REFERENCE = "(no reference is available: judge the candidate on its own correctness and completeness)"


def judge_prompt(question: str, reference: str, candidate: str, *, with_image: bool = False) -> str:
    template = IMAGE_JUDGE if with_image else TEXT_JUDGE
    return template.format(rules=_JUDGE_RULES, question=question.strip(),
                           reference=reference.strip() or NO_REFERENCE, candidate=candidate.strip(),
                           verdict=VERDICT_INSTRUCTION)


def rendered_instruction(language: str, pages: int) -> str:
    return RENDERED_INSTRUCTION[(language, 1 if pages == 1 else 2)]
