"""Stage 4 end to end on CPU: offline vLLM rollouts of a tiny merged model on the toy verifiable task -> verifier
-> RFT parquet and DPO pairs -> `llamafactory-cli train` RFT, then DPO from the RFT output -> both checkpoints load
in transformers, and the DPO checkpoint runs in vLLM (the rollouts script again: pass@1 after).

Offline resume is checked on the way: a rerun of a finished run starts no engine and rewrites the same bytes, and a
checkpoint cut as kill -9 leaves it resumes with only the missing rollouts into the same outputs. Three small vLLM
engines in this module (before, resume, after), each in a rollouts.py process of its own; both trainings run in one
process through LLaMA-Factory's CLI entry point (imports paid once).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_process.stage4.tiny_task import TOY_GUIDED_REGEX, write_tiny_task
from examples.compare_checkpoints import compare_checkpoints
from tests.test_train_stages import CLI_SEQUENCE, cli_args, losses, run_logged

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[1]
K = 4
PER_KIND = 4
ROLLOUT_FLAGS = ["--k", str(K), "--max_tokens", "48", "--dtype", "float32", "--max_model_len", "1024",
                 "--engine_args", '{"enforce_eager": true, "max_num_seqs": 16}', "--no_progress",
                 *(f"--guided_regex={r}" for r in TOY_GUIDED_REGEX)]


def rollouts(model: Path, questions: Path, output: Path, env: dict, log: Path) -> dict:
    run_logged([sys.executable, str(REPO / "data_process/stage4/rollouts.py"), "--model", str(model), "--data",
                str(questions), "--output_dir", str(output), *ROLLOUT_FLAGS], env, log)
    return json.loads((output / "stats.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stage4_e2e")


@pytest.fixture(scope="module")
def env(venv_env, work) -> dict:
    return {**venv_env, "HF_DATASETS_CACHE": str(work / "hf_datasets"), "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def questions(work, sample_images) -> Path:
    return write_tiny_task(work / "questions", sample_images[0].parent, per_kind=PER_KIND)


@pytest.fixture(scope="module")
def before(tiny_merged_untied, questions, work, env) -> tuple[Path, dict]:
    out = work / "before"
    return out, rollouts(tiny_merged_untied, questions, out, env, work / "before.log")


@pytest.fixture(scope="module")
def trained(before, tiny_merged_untied, work, env) -> dict[str, Path]:
    data = before[0]
    out = {"rft": work / "rft", "dpo": work / "dpo"}
    sequence = [cli_args("train", "stage4_rft.yaml", model_name_or_path=tiny_merged_untied, dataset_dir=data,
                         output_dir=out["rft"]),
                cli_args("train", "stage4_dpo.yaml", model_name_or_path=out["rft"], dataset_dir=data,
                         output_dir=out["dpo"])]
    (work / "sequence.json").write_text(json.dumps(sequence))
    (work / "cli_sequence.py").write_text(CLI_SEQUENCE)
    run_logged([sys.executable, str(work / "cli_sequence.py"), str(work / "sequence.json")], env, work / "train.log")
    return out


@pytest.fixture(scope="module")
def after_dpo(trained, questions, work, env) -> dict:
    return rollouts(trained["dpo"], questions, work / "after_dpo", env, work / "after_dpo.log")


def reply_answer(text: str) -> str:
    """What the toy replies end with (their regex: <think>\\n...\\n</think>\\n\\nANSWER)."""
    return text.rsplit("</think>\n\n", 1)[1]


def test_rollouts_give_k_verified_samples_per_question(before):
    _, stats = before
    overall = stats["overall"]
    assert overall["questions"] == 3 * PER_KIND and overall["samples"] == 3 * PER_KIND * K
    assert overall["missing_rollouts"] == 0 and stats["question_rejects"] == {}
    assert set(stats["sources"]) == {"tiny_mcq", "tiny_math", "tiny_exact"}
    assert overall["all_right"] + overall["all_wrong"] <= overall["questions"]
    print(f"\npass@1 before: {overall['pass@1']}  pass@{K}: {overall['pass@k']}")


def test_rft_rows_are_correct_replies_and_dpo_pairs_correct_against_incorrect(before):
    out, stats = before
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    references = {v["question"]: v["reference"] for v in verdicts}
    solved = {v["question"] for v in verdicts if v["correct"]}
    failed = {v["question"] for v in verdicts if not v["correct"]}
    rft = pq.read_table(out / "rft.parquet").to_pylist()
    assert sorted(r["id"] for r in rft) == sorted(solved)
    assert all(reply_answer(r["messages"][1]["content"]) == references[r["id"]] for r in rft)
    assert all(len(r["images"]) == 1 and r["images"][0]["bytes"] for r in rft)
    dpo = pq.read_table(out / "dpo.parquet").to_pylist()
    assert sorted(r["id"] for r in dpo) == sorted(solved & failed) and dpo, "the toy run should give pairs"
    for row in dpo:
        assert reply_answer(row["chosen"]["content"]) == references[row["id"]]
        assert reply_answer(row["rejected"]["content"]) != references[row["id"]]
    assert stats["overall"]["pairs"] == len(dpo)
    assert stats["overall"]["all_right"] == len(solved - failed) and stats["overall"]["all_wrong"] == len(failed - solved)


OUTPUT_FILES = ("rft.parquet", "dpo.parquet", "kto.parquet", "verdicts.jsonl", "dataset_info.json")


def test_rerun_of_a_finished_run_starts_no_engine_and_rewrites_the_same_bytes(before, tiny_merged_untied,
                                                                              questions, work, env):
    out, _ = before
    files = {name: (out / name).read_bytes() for name in OUTPUT_FILES}
    stats = rollouts(tiny_merged_untied, questions, out, env, work / "rerun.log")
    assert stats["rollouts"]["requests sent"] == 0 and stats["rollouts"]["resumed (already done)"] == 3 * PER_KIND * K
    assert "init engine" not in (work / "rerun.log").read_text()
    assert {name: (out / name).read_bytes() for name in OUTPUT_FILES} == files


def test_cut_checkpoint_resumes_with_only_the_missing_rollouts_and_the_same_outputs(before, tiny_merged_untied,
                                                                                   questions, work, env):
    """What kill -9 leaves in offline mode: the lines of finished batches and a torn last line."""
    out, _ = before
    cut = work / "cut"
    cut.mkdir()
    lines = (out / "rollouts.ckpt.jsonl").read_bytes().splitlines(keepends=True)
    kept = len(lines) // 3
    (cut / "rollouts.ckpt.jsonl").write_bytes(b"".join(lines[:kept]) + lines[kept][:25])
    stats = rollouts(tiny_merged_untied, questions, cut, env, work / "cut.log")
    assert stats["rollouts"]["requests sent"] == len(lines) - kept
    resumed = (cut / "rollouts.ckpt.jsonl").read_bytes().splitlines()
    assert len(resumed) == len({json.loads(line)["id"] for line in resumed}) == len(lines)
    assert {name: (cut / name).read_bytes() for name in OUTPUT_FILES} == {name: (out / name).read_bytes()
                                                                         for name in OUTPUT_FILES}


def test_rft_trains_merger_and_language_model_with_the_vision_tower_frozen(trained, tiny_merged_untied):
    assert losses(trained["rft"])
    problems = compare_checkpoints(tiny_merged_untied, trained["rft"]).check({"projector", "language_model",
                                                                              "lm_head"})
    assert not problems, "\n".join(problems)


def test_dpo_trains_only_the_language_model(trained):
    rows = [json.loads(line) for line in (trained["dpo"] / "trainer_log.jsonl").read_text().splitlines()]
    assert any("loss" in row for row in rows)
    problems = compare_checkpoints(trained["rft"], trained["dpo"]).check({"language_model", "lm_head"})
    assert not problems, "\n".join(problems)


def test_trained_checkpoints_load_in_transformers(trained):
    from transformers import AutoModelForImageTextToText

    for name in ("rft", "dpo"):
        model, info = AutoModelForImageTextToText.from_pretrained(trained[name], output_loading_info=True)
        assert type(model).__name__ == "Qwen2_5_VL_MergeForConditionalGeneration"
        assert not any(info.values()), (name, info)


def test_dpo_checkpoint_runs_in_vllm_for_rollouts(after_dpo, before):
    overall = after_dpo["overall"]
    assert overall["samples"] == 3 * PER_KIND * K and overall["missing_rollouts"] == 0
    print(f"\npass@1 before: {before[1]['overall']['pass@1']}  after RFT + DPO: {overall['pass@1']}")
