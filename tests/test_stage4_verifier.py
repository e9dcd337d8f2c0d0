"""Stage-4 verifier on realistic Qwen3 thinking-mode replies, question loading with counted rejects, and the
output builder's picks (shortest correct, pairs, all-right / all-wrong counts) on hand-written rollouts."""
from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from data_process.stage4.outputs import build_outputs, sample_id
from data_process.stage4.questions import Question, answer_kind, load_questions
from data_process.stage4.verifier import REASONS, choice_letter, normalise, verify_reply

MCQ_REPLY = ("<think>\nThe picture shows a cat sitting on a sofa. The options are A. dog, B. cat, C. bird. "
             "It has pointed ears and whiskers, so it is a cat.\n</think>\n\nB")
MATH_REPLY = ("<think>\nThe triangle has legs 3 and 4, so the hypotenuse is sqrt(9 + 16) = 5. The area is "
              "3 * 4 / 2 = 6.\n</think>\n\nThe area of the triangle is $\\boxed{6}$.")
FRACTION_REPLY = "<think>\nHalf of the 8 slices were eaten: 4 of 8.\n</think>\n\nThe fraction is \\boxed{\\frac{1}{2}}."
TRUNCATED_REPLY = "<think>\nLet me count the apples. There are three in the bowl and two on the table, so"


# ---- verifier ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("(B)", "B"), ("B. cat", "B"), ("**B**", "B"), ("The answer is (C).", "C"),
    ("Answer: D", "D"), ("\\boxed{A}", "A"), ("I pick the cat.", None), ("the answer is a cat", None),
])
def test_choice_letter_reads_the_usual_answer_styles(answer, letter):
    assert choice_letter(answer) == letter


def test_correct_mcq_reply_in_thinking_format():
    verdict = verify_reply(MCQ_REPLY, "mcq", "B", finish_reason="stop", tokens=60, max_tokens=512)
    assert verdict.correct and verdict.reason is None and verdict.answer == "B"


def test_wrong_mcq_letter_is_wrong_choice():
    assert verify_reply(MCQ_REPLY, "mcq", "C").reason == "wrong_choice"


def test_boxed_math_answer_is_equivalent_whatever_its_form():
    assert verify_reply(MATH_REPLY, "math", "6").correct
    assert verify_reply(MATH_REPLY, "math", "6.0").correct
    assert verify_reply(FRACTION_REPLY, "math", "0.5").correct
    assert verify_reply(FRACTION_REPLY, "math", "\\frac{2}{4}").correct
    assert verify_reply(MATH_REPLY, "math", "7").reason == "not_equivalent"


def test_math_answer_is_never_evaluated_as_python():
    reply = "<think>\nx\n</think>\n\n__import__('os').system('echo pwned')"
    assert verify_reply(reply, "math", "0").reason == "not_equivalent"


def test_truncated_reply_is_over_budget_and_nothing_else():
    verdict = verify_reply(TRUNCATED_REPLY, "math", "5", finish_reason="length", tokens=32, max_tokens=32)
    assert (verdict.correct, verdict.reason, verdict.answer) == (False, "over_budget", "")


def test_reply_longer_than_the_budget_is_over_budget_even_if_right():
    assert verify_reply(MCQ_REPLY, "mcq", "B", finish_reason="stop", tokens=600, max_tokens=512).reason == "over_budget"


def test_unclosed_thought_without_truncation_is_thought_not_closed():
    assert verify_reply(TRUNCATED_REPLY + " 5.", "math", "5", finish_reason="stop").reason == "thought_not_closed"
    assert verify_reply("B", "mcq", "B").reason == "thought_not_closed"  # thinking is on: no thought, no pass


def test_closed_thought_without_answer_is_no_answer():
    assert verify_reply("<think>\nIt is B.\n</think>\n\n", "mcq", "B").reason == "no_answer"


def test_exact_answers_match_after_normalisation():
    assert verify_reply("<think>\nbright sky\n</think>\n\nBright.", "exact", "bright").correct
    assert verify_reply("<think>\nx\n</think>\n\nThe Eiffel  Tower", "exact", "eiffel tower").correct
    assert verify_reply("<think>\nx\n</think>\n\n\\boxed{Paris}", "exact", "paris").correct
    assert verify_reply("<think>\nx\n</think>\n\nIt is bright.", "exact", "bright").reason == "mismatch"
    assert normalise("  A  Cat!! ") == "cat"


def test_every_reject_has_exactly_one_known_reason():
    replies = [MCQ_REPLY, MATH_REPLY, TRUNCATED_REPLY, "", "<think></think>", "<think>x</think>\n\nQ"]
    for text in replies:
        for kind, reference in (("mcq", "B"), ("math", "6"), ("exact", "b")):
            verdict = verify_reply(text, kind, reference, finish_reason="stop")
            assert verdict.correct == (verdict.reason is None)
            assert verdict.reason is None or verdict.reason in REASONS


# ---- questions ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("question, reference, kind, normalised", [
    ("Which is it?\nA. cat\nB. dog", "B", "mcq", "B"),
    ("Which is it?\n(A) cat\n(B) dog", "(A)", "mcq", "A"),
    ("How many birds?", "12", "math", "12"),
    ("Find x.", "\\frac{3}{4}", "math", "\\frac{3}{4}"),
    ("Find y.", "\\boxed{2\\sqrt{3}}", "math", "2\\sqrt{3}"),
    ("What colour is the car?", "Red", "exact", "Red"),
    ("Grade of the picture?", "A", "exact", "A"),  # a letter that is not a listed option is a short answer
])
def test_answer_kind_is_read_from_the_reference(question, reference, kind, normalised):
    assert answer_kind(question, reference) == (kind, normalised)


def write_rows(path, rows):
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    features = {"messages": [{"role": Value("string"), "content": Value("string")}],
                "images": Sequence(ImageFeature()), "answer": Value("string"), "answer_type": Value("string")}
    table = {name: [row.get(name) for row in rows] for name in features}
    Dataset.from_dict(table, features=Features(features)).to_parquet(str(path))


def test_bad_rows_are_counted_rejects_and_duplicates_kept_once(tmp_path, sample_images):
    picture = {"bytes": sample_images[0].read_bytes(), "path": None}
    ask = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    write_rows(tmp_path / "mine.parquet", [
        {"messages": ask("<image>\nWhich animal?\nA. cat\nB. dog", "A"), "images": [picture]},
        {"messages": ask("<image>\nWhich animal?\nA. cat\nB. dog", "A"), "images": [picture]},     # duplicate
        {"messages": ask("<image>\nDescribe it.", "A long caption that goes on and on about many things."),
         "images": [picture]},                                                                    # not verifiable
        {"messages": ask("<image>\nHow many?", "3"), "images": []},                               # image missing
        {"messages": [{"role": "assistant", "content": "3"}], "images": []},                      # no user turn
        {"messages": ask("What is 2+2?", "four"), "images": [], "answer": "4", "answer_type": "math"},
        {"messages": ask("Pick one.\nA. x\nB. y", "B"), "images": [], "answer_type": "choice"},   # unknown type
    ])
    rejects = Counter()
    questions = load_questions([str(tmp_path / "mine.parquet")], rejects)
    assert [(q.kind, q.reference, len(q.images)) for q in questions] == [("mcq", "A", 1), ("math", "4", 0)]
    assert rejects == {"duplicate_question": 1, "not_verifiable": 1, "image_count_mismatch": 1, "no_user_turn": 1,
                       "unknown_answer_type": 1}


# ---- outputs -----------------------------------------------------------------------------------------------------

def question(qid: str, kind: str = "mcq", reference: str = "B") -> Question:
    return Question(qid, "src", 0, "Which?\nA. x\nB. y", "<image>\nWhich?\nA. x\nB. y", (b"\x89PNG fake",), kind,
                    reference)


def rollout(qid: str, sample: int, text: str, tokens: int, finish: str = "stop") -> tuple[str, dict]:
    return sample_id(qid, sample), {"id": sample_id(qid, sample), "status": "ok",
                                    "result": {"text": text, "finish_reason": finish, "tokens": tokens}}


def test_outputs_pick_the_shortest_correct_and_pair_it_with_a_wrong_reply(tmp_path):
    long_right = "<think>\nOption B is y, which matches what I see in the picture.\n</think>\n\nB"
    short_right = "<think>\nIt is y.\n</think>\n\nB"
    wrong = "<think>\nIt is x.\n</think>\n\nA"
    records = dict([
        rollout("mixed", 0, long_right, 20), rollout("mixed", 1, wrong, 8), rollout("mixed", 2, short_right, 9),
        rollout("mixed", 3, TRUNCATED_REPLY, 32, "length"),
        *(rollout("right", i, short_right + " " * i, 9) for i in range(4)),  # the same reply: one RFT row
        *(rollout("wrong", i, wrong, 8) for i in range(3)), rollout("wrong", 3, TRUNCATED_REPLY, 32, "length"),
        rollout("partial", 0, short_right, 9),  # samples 1-3 never arrived (failed requests)
    ])
    stats = build_outputs([question("mixed"), question("right"), question("wrong"), question("partial")], records,
                          str(tmp_path), k=4, max_tokens=32)
    rft = pq.read_table(tmp_path / "rft.parquet").to_pylist()
    assert [(r["id"], r["messages"][1]["content"]) for r in rft] == [
        ("mixed", short_right), ("right", short_right), ("partial", short_right)]
    dpo = pq.read_table(tmp_path / "dpo.parquet").to_pylist()
    # the well-formed wrong answer is preferred over the truncated one as the rejected reply
    assert [(r["id"], r["chosen"]["content"], r["rejected"]["content"]) for r in dpo] == [("mixed", short_right, wrong)]
    assert dpo[0]["messages"] == [{"role": "user", "content": "<image>\nWhich?\nA. x\nB. y"}]
    kto = pq.read_table(tmp_path / "kto.parquet").to_pylist()
    assert [(r["id"], r["kto_tag"]) for r in kto] == [("mixed", True), ("mixed", False), ("right", True),
                                                      ("wrong", False), ("partial", True)]
    overall = stats["overall"]
    assert (overall["all_right"], overall["all_wrong"], overall["pairs"], overall["missing_rollouts"]) == (1, 1, 1, 3)
    # pass@1: mixed 2/4, right 4/4, wrong 0/4, partial 1/1; pass@k over the three complete questions
    assert overall["pass@1"] == pytest.approx((0.5 + 1 + 0 + 1) / 4, abs=1e-4)
    assert overall["pass@k"] == pytest.approx(2 / 3, abs=1e-4)  # rounded to 4 places
    assert overall["rejects"] == {"over_budget": 2, "wrong_choice": 4}
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved["sources"]["src"]["pass@1"] == overall["pass@1"]
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["stage4_dpo"]["ranking"] is True and info["stage4_kto"]["columns"]["kto_tag"] == "kto_tag"
