"""Answer extraction, checkpoint recognition, sampling defaults and the MMBench TSV writer (no model is run)."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from eval.answers import ThinkingSplit, boxed_content, final_answer, split_thinking, thought_tail
from eval.generation import CheckpointError, SamplingSettings, inspect_checkpoint
from eval.mcq_tsv import CIRCULAR_STEP, build_rows, rotations

# ---- answer extraction -------------------------------------------------------------------------------------------

def test_thinking_with_answer_gives_the_text_after_the_thought():
    text = "<think>\nThe suit is white and bulky, so A fits.\n</think>\n\nThe answer is A."
    assert split_thinking(text) == ThinkingSplit("The suit is white and bulky, so A fits.", "The answer is A.", False)
    assert final_answer(text) == "The answer is A."


def test_answer_follows_the_last_thought_when_there_are_several():
    assert final_answer("<think>a</think>draft B<think>b</think>\nC") == "C"


def test_thought_opened_by_the_prompt():
    assert final_answer("reasoning...\n</think>\n\nB", thinking_open=True) == "B"
    split = split_thinking("reasoning that never ends", thinking_open=True)
    assert split.truncated and split.answer == "" and split.thought == "reasoning that never ends"


def test_no_thinking_returns_the_text_unchanged_but_stripped():
    assert final_answer("  The answer is C.\n") == "The answer is C."
    assert not split_thinking("The answer is C.").truncated


@pytest.mark.parametrize("policy, expected", [
    ("tail", "Comparing both, the answer is B."),
    ("empty", ""),
    ("full", "Option A looks odd.\n\nComparing both, the answer is B."),
])
def test_truncated_thought_follows_the_policy(policy, expected):
    text = "<think>\nOption A looks odd.\n\nComparing both, the answer is B."
    assert split_thinking(text).truncated
    assert final_answer(text, on_truncated=policy) == expected


def test_truncated_thought_tail_is_bounded_and_starts_at_a_word():
    thought = "first paragraph\n\n" + " ".join(f"word{i}" for i in range(400))
    tail = thought_tail(thought, max_chars=100)
    assert len(tail) <= 100 and tail.endswith("word399") and tail.split(" ")[0].startswith("word")
    assert thought_tail("\n\n  \n") == ""


def test_unknown_truncation_policy_is_rejected():
    with pytest.raises(ValueError, match="on_truncated"):
        final_answer("<think>x", on_truncated="guess")


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("no box here", None),
    ("\\boxed{unclosed", None),
])
def test_boxed_content(text, expected):
    assert boxed_content(text) == expected


# ---- checkpoint recognition and sampling defaults ----------------------------------------------------------------

def misleading_copy(src, dst):
    """A directory of symlinks to a checkpoint's files, under a name chosen to fool path-based dispatch."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    return dst


def test_qwen_merge_is_recognised_from_its_config_not_its_path(tiny_merged, tiny_qwen25vl, tmp_path):
    merged = inspect_checkpoint(misleading_copy(tiny_merged, tmp_path / "Qwen2.5-VL-7B-Instruct"))
    stock = inspect_checkpoint(misleading_copy(tiny_qwen25vl, tmp_path / "Qwen-Merge-VL-4B-merger"))
    assert merged.is_qwen_merge and merged.model_type == "qwen2_5_vl_merge"
    assert not stock.is_qwen_merge and stock.model_type == "qwen2_5_vl"
    assert merged.path == os.path.abspath(tmp_path / "Qwen2.5-VL-7B-Instruct")

    thinking = SamplingSettings.for_checkpoint(merged)
    assert (thinking.greedy, thinking.temperature, thinking.top_p, thinking.top_k) == (False, 0.6, 0.95, 20)
    assert SamplingSettings.for_checkpoint(stock).greedy
    assert SamplingSettings.for_checkpoint(merged, greedy=True).greedy
    assert SamplingSettings.for_checkpoint(merged, temperature=0.8, top_k=None).temperature == 0.8


def test_checkpoint_errors_are_one_clear_line(tiny_qwen3, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        inspect_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        inspect_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="model_type 'qwen3' is neither Qwen-Merge"):
        inspect_checkpoint(tiny_qwen3)


@pytest.mark.parametrize("overrides, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": 0.0}, "greedy decoding instead"),
    ({"top_p": 1.5}, "top_p"),
])
def test_bad_sampling_settings_are_rejected(tiny_merged, overrides, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings.for_checkpoint(inspect_checkpoint(tiny_merged), **overrides)


# ---- MMBench TSV writer ------------------------------------------------------------------------------------------

def records(images):
    return [
        {"question": "What is shown?", "options": ["an astronaut", "a cat", "a cup", "a rocket"], "answer": "A",
         "image": str(images[0]), "hint": "A photo.", "category": "image_topic", "l2-category": "coarse_perception"},
        {"question": "Which animal?", "options": {"A": "dog", "B": "cat"}, "answer": "B", "image": str(images[1])},
    ]


def test_circular_rows_keep_the_correct_option_and_point_at_the_base_image(sample_images):
    rows = build_rows(records(sample_images), circular=True)
    assert [r["index"] for r in rows] == [0, 1, 1_000_000, 2_000_000, 3_000_000, 1_000_001]
    base = {r["index"]: r for r in rows if r["index"] < CIRCULAR_STEP}
    for row in rows:
        origin = base[row["index"] % CIRCULAR_STEP]
        assert row[row["answer"]] == origin[origin["answer"]]  # the same text is correct in every rotation
        assert sorted(row[c] for c in "ABCD") == sorted(origin[c] for c in "ABCD")
        if row is not origin:
            assert row["image"] == str(origin["index"])
    assert len({tuple(r[c] for c in "ABCD") for r in rotations(base[0])}) == 3


@pytest.mark.parametrize("change, message", [
    ({"answer": "E"}, "not one of the 4 option letters"),
    ({"options": ["a", "b", "c", "d", "e"]}, "2 to 4 choices"),
    ({"options": {"A": "x", "C": "y"}}, "option keys"),
    ({"image": "/nonexistent.png"}, "image not found"),
    ({"question": ""}, "missing question"),
    ({"index": CIRCULAR_STEP}, "index must be"),
])
def test_bad_questions_are_rejected_with_the_record_named(sample_images, change, message):
    bad = {**records(sample_images)[0], **change}
    with pytest.raises(ValueError, match=f"record 2: .*{message}"):
        build_rows([records(sample_images)[1], bad])


def test_mcq_tsv_cli_writes_the_tsv_and_reports_bad_input_in_one_line(sample_images, tmp_path, venv_env):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(r) for r in records(sample_images)))
    out = tmp_path / "LMUData" / "Mini_MMBench.tsv"
    cli = [sys.executable, "-m", "eval.mcq_tsv", str(questions), str(out), "--circular"]
    done = subprocess.run(cli, check=False, env=venv_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 6 rows (2 questions)" in done.stdout
    table = pd.read_csv(out, sep="\t")
    assert list(table["index"]) == [0, 1, 1_000_000, 2_000_000, 3_000_000, 1_000_001]
    assert table.loc[table["index"] == 1, "C"].isna().all()  # a two-option question leaves C and D empty

    questions.write_text('{"question": "q"')
    done = subprocess.run(cli, check=False, env=venv_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
