"""Teacher-response checks and verdict parsing (``data_process/stage3/judge.py``), on hand-written edge cases
and on recorded replies in the formats real servers return (``tests/data/replies``: GLM-4.1V-Thinking and
Qwen3, each with and without vLLM's reasoning parser, and replies cut by ``finish_reason: length``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_process.stage3.client import message_text
from data_process.stage3.judge import FormatError, parse_verdict, strip_answer_markup, teacher_answer

REPLIES = Path(__file__).resolve().parent / "data" / "replies"


def reply(name: str) -> tuple[str, str | None]:
    """``(text as the pipeline sees it, finish_reason)`` of a recorded chat completion."""
    record = json.loads((REPLIES / f"{name}.json").read_text(encoding="utf-8"))
    choice = record["response"]["choices"][0]
    return message_text(choice["message"]), choice["finish_reason"]


# ----------------------------------------------------------------------------------------------- verdicts

@pytest.mark.parametrize("text, expected", [
    ("The answer matches.\nVERDICT: PASS", ("PASS", None)),
    ("Wrong result.\nVERDICT: FAIL", ("FAIL", None)),
    ("**Verdict:** `pass`", ("PASS", None)),
    ("verdict：FAIL", ("FAIL", None)),  # full-width colon
    ("<think>\nVERDICT: FAIL? no...\n</think>\n\nFine.\nVERDICT: PASS", ("PASS", None)),  # thoughts ignored
    ("<think>\n\n</think>\n\nVERDICT: PASS", ("PASS", None)),  # Qwen3 no-think output
    ("<|begin_of_box|>VERDICT: PASS<|end_of_box|>", ("PASS", None)),
    ("VERDICT: PASS\nVERDICT: PASS", ("PASS", None)),  # repeated but consistent
    ("VERDICT: PASS\nVERDICT: FAIL", (None, "ambiguous_verdict")),
    ("VERDICT: PASS or FAIL", (None, "malformed_verdict")),
    ("VERDICT: PASS or VERDICT: FAIL", (None, "malformed_verdict")),
    ("VERDICT: mostly fine", (None, "malformed_verdict")),
    ("I think it passes.", (None, "no_verdict")),
    ("The answer is excellent, PASS", (None, "no_verdict")),  # the keyword alone is not a verdict line
    ("<think>\nVERDICT: PASS\n", (None, "judge_unclosed_think")),  # thoughts never ended
    ("<think>a</think><think>b</think>VERDICT: PASS", (None, "judge_bad_think_tags")),
    ("", (None, "no_verdict")),
    # GLM-4.1V-Thinking wraps its answer in <answer>…</answer> and may box the key part (issue 14).
    ("<think>ok</think><answer>The candidate agrees.\nVERDICT: PASS</answer>", ("PASS", None)),
    ("<think>ok</think><answer>VERDICT: PASS</answer>", ("PASS", None)),
    ("<think>ok</think>\n<answer>\nVERDICT: FAIL\n</answer>\n", ("FAIL", None)),
    ("<think>ok</think><answer>Right.\nVERDICT: <|begin_of_box|>PASS<|end_of_box|></answer>", ("PASS", None)),
    ("<think>ok</think><answer>VERDICT: PASS</answer><answer>VERDICT: FAIL</answer>", (None, "judge_bad_answer_tags")),
    ("<think>ok</think><answer>VERDICT: PASS", (None, "judge_bad_answer_tags")),
    ("<think>ok</think><answer>Good.\nVERDICT: PASS</answer> VERDICT: FAIL", (None, "judge_text_outside_answer")),
])
def test_judge_output_gives_a_verdict_or_a_named_reason(text, expected):
    verdict = parse_verdict(text)
    assert (verdict.value, verdict.reason) == expected


# ----------------------------------------------------------------------------------------------- teacher

@pytest.mark.parametrize("text, thought_required, expected", [
    ("<think>\nstep\n</think>\n\nanswer", True, ("<think>\nstep\n</think>\n\nanswer", "answer")),
    ("<think>\n\n</think>\n\nanswer", False, ("<think>\n\n</think>\n\nanswer", "answer")),
    ("<think>t</think><answer>A is <|begin_of_box|>4<|end_of_box|></answer>", True,
     ("<think>\nt\n</think>\n\nA is 4", "A is 4")),
    ("<think>\n\n</think>\n\nanswer", True, "empty_thought"),
    ("answer only", False, "no_think_block"),
    ("<think>never closed", False, "unclosed_think"),
    ("<think>a</think>b<think>c</think>d", False, "repeated_think_tags"),
    ("<think>a</think>\n  ", False, "empty_answer"),
    ("<think>a</think><answer>x", False, "bad_answer_tags"),
    ("<think>a</think>see <answer>x</answer>", False, "text_outside_answer"),
    ("<think>a</think><|begin_of_box|>x", False, "unbalanced_box"),
    ("<think>a</think><answer> <|begin_of_box|><|end_of_box|> </answer>", False, "empty_answer"),
])
def test_teacher_response_is_normalised_or_rejected_with_reason(text, thought_required, expected):
    if isinstance(expected, str):
        with pytest.raises(FormatError) as err:
            teacher_answer(text, require_thought=thought_required)
        assert err.value.reason == expected
    else:
        training, answer, _ = teacher_answer(text, require_thought=thought_required)
        assert (training, answer) == expected


def test_answer_markup_is_stripped_and_plain_answers_are_kept_as_they_are():
    assert strip_answer_markup("<answer>It is <|begin_of_box|>red<|end_of_box|>.</answer>") == ("It is red.", True)
    assert strip_answer_markup("\n<answer>\nPlain.\n</answer>\n") == ("Plain.", False)
    assert strip_answer_markup("The value is **1/3**.") == ("The value is **1/3**.", False)


# ----------------------------------------------------------------------------------------------- recorded replies

GLM_TRAINING = ("<think>\nThe user asks which colour dominates the picture. Looking at the image: a large red "
                "double-decker bus fills most of the frame, the sky is grey and the road is dark. Red covers the "
                "largest area.\n</think>\n\nThe dominant colour is red, from the double-decker bus that fills most of "
                "the frame.")
QWEN_ANSWER = "The value is **1/3**.\n\n∫₀¹ x² dx = [x³/3]₀¹ = 1/3."
QWEN_THOUGHT = "The integral of x^2 from 0 to 1 is [x^3/3] evaluated at 1 and 0, so 1/3 - 0 = 1/3."


@pytest.mark.parametrize("name, thought_required, expected", [
    ("glm41v_teacher", True, GLM_TRAINING),
    ("glm41v_teacher_parser", True, GLM_TRAINING),
    ("qwen3_think", True, f"<think>\n{QWEN_THOUGHT}\n</think>\n\n{QWEN_ANSWER}"),
    ("qwen3_think_parser", True, f"<think>\n{QWEN_THOUGHT}\n</think>\n\n{QWEN_ANSWER}"),
    ("qwen3_think_parser_reasoning_field", True, f"<think>\n{QWEN_THOUGHT}\n</think>\n\n{QWEN_ANSWER}"),
    ("qwen3_no_think", False, f"<think>\n\n</think>\n\n{QWEN_ANSWER}"),
    ("qwen3_no_think_parser", False, f"<think>\n\n</think>\n\n{QWEN_ANSWER}"),
])
def test_recorded_teacher_replies_give_the_same_training_text_with_or_without_a_reasoning_parser(
        name, thought_required, expected):
    text, finish = reply(name)
    assert finish == "stop"
    training, answer, _ = teacher_answer(text, require_thought=thought_required)
    assert training == expected
    assert "<answer>" not in training and "<|begin_of_box|>" not in training
    assert answer == expected.split("</think>\n\n", 1)[1]


@pytest.mark.parametrize("name", ["glm41v_teacher_length", "glm41v_teacher_length_parser", "qwen3_think_length",
                                  "qwen3_think_length_parser", "glm41v_judge_length", "qwen3_judge_length"])
def test_recorded_replies_cut_by_length_are_flagged_by_finish_reason_and_never_parse_as_complete(name):
    text, finish = reply(name)
    assert finish == "length"
    if "judge" in name:
        assert parse_verdict(text).value is None
    else:
        with pytest.raises(FormatError):
            teacher_answer(text, require_thought=True)


@pytest.mark.parametrize("name, verdict", [
    ("glm41v_judge_pass", "PASS"),
    ("glm41v_judge_pass_answer_only", "PASS"),
    ("glm41v_judge_pass_boxed", "PASS"),
    ("glm41v_judge_fail_boxed_value", "FAIL"),
    ("glm41v_judge_fail_parser", "FAIL"),
    ("qwen3_judge_no_think", "PASS"),
    ("qwen3_judge_no_think_parser", "FAIL"),
    ("qwen3_judge_think", "FAIL"),
    ("qwen3_judge_think_parser", "PASS"),
])
def test_recorded_judge_replies_give_their_verdict(name, verdict):
    text, finish = reply(name)
    assert finish == "stop"
    assert parse_verdict(text) == parse_verdict(text).__class__(verdict)


def test_every_recorded_reply_is_covered_by_a_test():
    covered = {"glm41v_teacher", "glm41v_teacher_parser", "qwen3_think", "qwen3_think_parser",
               "qwen3_think_parser_reasoning_field", "qwen3_no_think", "qwen3_no_think_parser",
               "glm41v_teacher_length", "glm41v_teacher_length_parser", "qwen3_think_length",
               "qwen3_think_length_parser", "glm41v_judge_length", "qwen3_judge_length", "glm41v_judge_pass",
               "glm41v_judge_pass_answer_only", "glm41v_judge_pass_boxed", "glm41v_judge_fail_boxed_value",
               "glm41v_judge_fail_parser", "qwen3_judge_no_think", "qwen3_judge_no_think_parser",
               "qwen3_judge_think", "qwen3_judge_think_parser"}
    assert {p.stem for p in REPLIES.glob("*.json")} == covered
