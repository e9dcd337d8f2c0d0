"""VLMEvalKit (ms-vlmeval 0.0.18) with the vlmeval overlay: the overlay's edits, circular scoring of thinking outputs,
and the real run.py on a tiny MMBench-format benchmark with the tiny Qwen-Merge, through transformers
(`run.py --config`) and through vLLM (`run.py --model Qwen-Merge-VL-4B --use-vllm`)."""
import difflib
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from eval.answers import final_answer
from eval.mcq_tsv import CIRCULAR_STEP, build_rows, write_tsv
from overlays import apply as applier

REPO = Path(__file__).resolve().parent.parent
RUN_BENCH = "Tiny_MMBench"        # "MMBench" in the name: VLMEvalKit scores it circularly
SCORING_BENCH = "Scoring_MMBench"
MODEL = "Qwen-Merge-VL-4B"


def questions(images):
    return [
        {"question": "What is shown in the photo?", "options": ["an astronaut", "a cat", "a cup of coffee", "a rocket"],
         "answer": "A", "image": str(images[0]), "hint": "One object fills the frame.", "category": "image_topic",
         "l2-category": "coarse_perception"},
        {"question": "Which animal is this?", "options": ["dog", "cat"], "answer": "B", "image": str(images[2]),
         "category": "image_scene", "l2-category": "coarse_perception"},
        {"question": "What is in the cup?", "options": ["coffee", "milk", "soup"], "answer": "A",
         "image": str(images[1]), "category": "attribute_recognition",
         "l2-category": "finegrained_perception (instance-level)"},
    ]


@pytest.fixture(scope="module")
def vlmeval_overlay():
    """The overlay applied to this interpreter's VLMEvalKit, up to date with eval/ (install.sh applies it too; applying
    again only rewrites what changed)."""
    manifest = applier.load_manifest("vlmeval")
    applier.apply(manifest, verbose=False)
    ok, detail = applier.check(manifest)
    assert ok, detail
    return manifest


@pytest.fixture(scope="module")
def lmudata(tmp_path_factory, sample_images) -> Path:
    root = tmp_path_factory.mktemp("LMUData")
    write_tsv(build_rows(questions(sample_images)[:2], circular=True), root / f"{RUN_BENCH}.tsv")
    write_tsv(build_rows(questions(sample_images), circular=True), root / f"{SCORING_BENCH}.tsv")
    return root


@pytest.fixture(scope="module")
def checkpoint(tiny_merged, tmp_path_factory) -> Path:
    """The tiny Qwen-Merge under a name that upstream's path dispatch would take for a stock Qwen2.5-VL."""
    path = tmp_path_factory.mktemp("ckpt") / "Qwen2.5-VL-7B-Instruct"
    path.mkdir()
    for f in tiny_merged.iterdir():
        (path / f.name).symlink_to(f)
    return path


@pytest.fixture(scope="module")
def run_env(venv_env, lmudata, checkpoint) -> dict:
    env = {**venv_env, "LMUData": str(lmudata), "QWEN_MERGE_4B_PATH": str(checkpoint), "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("QWEN_MERGE_4B_ARGS", None)
    return env


# ---- the overlay -------------------------------------------------------------------------------------------------

def test_overlay_edits_only_add_marked_lines_and_revert_exactly(vlmeval_overlay, tmp_path):
    """Applied to pristine copies of the edited files: they still compile, differ only by marked lines, revert."""
    import vlmeval

    installed = Path(vlmeval.__file__).parent
    originals = installed.parent / applier.STATE_DIR_NAME / "vlmeval" / "originals"
    package = tmp_path / "vlmeval"
    edited = sorted({e["file"] for e in vlmeval_overlay["edits"]})
    for rel in edited:
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(originals / rel if (originals / rel).exists() else installed / rel, package / rel)
    dist = Path(importlib.metadata.distribution("ms-vlmeval")._path)
    shutil.copytree(dist, tmp_path / dist.name)
    pristine = applier.tree_digest(package)

    assert applier.apply(vlmeval_overlay, tmp_path, verbose=False)
    for rel in edited:
        before = (originals / rel if (originals / rel).exists() else installed / rel).read_text().splitlines()
        after = (package / rel).read_text()
        compile(after, rel, "exec")
        added = [d[1:] for d in difflib.unified_diff(before, after.splitlines(), lineterm="", n=0)
                 if d.startswith("+") and not d.startswith("+++")]
        assert added and all(line.endswith(applier.MARKER) for line in added), rel
    assert (package / "vlm/qwen_merge/generation.py").read_bytes() == (REPO / "eval/generation.py").read_bytes()
    assert not applier.apply(vlmeval_overlay, tmp_path, verbose=False)
    applier.revert(vlmeval_overlay, tmp_path, verbose=False)
    assert applier.tree_digest(package) == pristine


def test_registered_entries_explain_a_missing_or_bad_setting(vlmeval_overlay, monkeypatch, tmp_path):
    from vlmeval.config import supported_VLM

    monkeypatch.delenv("QWEN_MERGE_8B_PATH", raising=False)
    monkeypatch.delenv("QWEN_MERGE_8B_ARGS", raising=False)
    with pytest.raises(ValueError, match=r"set \$QWEN_MERGE_8B_PATH to the checkpoint directory"):
        supported_VLM["Qwen-Merge-VL-8B"]()
    monkeypatch.setenv("QWEN_MERGE_8B_PATH", str(tmp_path))
    with pytest.raises(ValueError, match="no config.json"):
        supported_VLM["Qwen-Merge-VL-8B"]()
    monkeypatch.setenv("QWEN_MERGE_8B_ARGS", "[1]")
    with pytest.raises(ValueError, match=r"\$QWEN_MERGE_8B_ARGS must be a JSON object"):
        supported_VLM["Qwen-Merge-VL-8B"]()
    monkeypatch.setenv("QWEN_MERGE_8B_ARGS", '{"on_truncated": "guess"}')
    with pytest.raises(ValueError, match="on_truncated must be one of"):
        supported_VLM["Qwen-Merge-VL-8B"]()


# ---- scoring (VLMEvalKit's own evaluator on predictions we write) ------------------------------------------------

def raw_generation(index: int, answer: str) -> str:
    """What a thinking model might write for each row: right everywhere except two chosen rotations."""
    letters = "ABCD"
    if index == 1 * CIRCULAR_STEP + 1:        # question 1, rotation 1: the thought runs out of tokens
        return f"<think>\nThe animal has whiskers and pointed ears.\n\nSo the answer is {answer}."
    if index == 2 * CIRCULAR_STEP + 2:        # question 2, rotation 2: a wrong answer
        answer = letters[(letters.index(answer) + 1) % 3]
    return f"<think>\nLooking at the picture carefully.\n</think>\n\nThe answer is {answer}."


@pytest.mark.parametrize("policy, expected_overall", [("tail", 2 / 3), ("empty", 1 / 3)])
def test_circular_scores_of_thinking_outputs(vlmeval_overlay, lmudata, monkeypatch, tmp_path, policy,
                                             expected_overall):
    from vlmeval.dataset import build_dataset
    from vlmeval.smp import dump

    monkeypatch.setenv("LMUData", str(lmudata))
    dataset = build_dataset(SCORING_BENCH)
    assert type(dataset).__name__ == "CustomMCQDataset" and len(dataset) == 9
    assert dataset.data["image"].str.len().min() > 1000  # rotations resolved their image reference

    table = dataset.data.drop(columns=["image"])
    table["prediction"] = [final_answer(raw_generation(i, a), on_truncated=policy)
                           for i, a in zip(table["index"], table["answer"])]
    predictions = tmp_path / f"{MODEL}_{SCORING_BENCH}.xlsx"
    dump(table, str(predictions))
    scores = dataset.evaluate(str(predictions), model="exact_matching", nproc=1)
    assert scores["Overall"].iloc[0] == pytest.approx(expected_overall)
    assert scores["CP"].iloc[0] == pytest.approx(1.0 if policy == "tail" else 0.5)   # questions 0 and 1
    assert scores["FP-S"].iloc[0] == 0.0                                                # question 2
    assert (tmp_path / f"{MODEL}_{SCORING_BENCH}_acc.csv").is_file()


# ---- run.py end to end -------------------------------------------------------------------------------------------

def run_vlmeval(args: list[str], env: dict, work_dir: Path, timeout: int) -> str:
    done = subprocess.run([sys.executable, "-m", "vlmeval.run", *args, "--judge", "exact_matching",
                           "--work-dir", str(work_dir)], check=False, env=env, cwd=work_dir.parent, capture_output=True,
                          text=True, timeout=timeout)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "combination failed" not in log, log[-3000:]  # run.py logs and swallows per-dataset errors
    return log


def check_results(work_dir: Path, tsv: Path) -> None:
    """Predictions for every row, no thinking left in them, and the reported score is their circular score."""
    from vlmeval.utils import can_infer

    out = work_dir / MODEL
    predictions = pd.read_excel(out / f"{MODEL}_{RUN_BENCH}.xlsx")
    truth = pd.read_csv(tsv, sep="\t")
    assert sorted(predictions["index"]) == sorted(truth["index"])  # rotations included
    assert predictions["prediction"].map(lambda p: isinstance(p, str) and p.strip() != "").all()
    assert not predictions["prediction"].str.contains("think>").any()

    hits = {}
    for row in predictions.to_dict("records"):
        choices = {c: row[c] for c in "ABCD" if isinstance(row[c], str)}
        question = row["index"] % CIRCULAR_STEP
        hits[question] = hits.get(question, True) and can_infer(row["prediction"], choices) == row["answer"]
    per_question = pd.read_excel(out / f"{MODEL}_{RUN_BENCH}_exact_matching_result.xlsx")
    assert sorted(per_question["index"]) == sorted(hits)
    assert {i: bool(h) for i, h in zip(per_question["index"], per_question["hit"])} == hits
    scores = pd.read_csv(out / f"{MODEL}_{RUN_BENCH}_acc.csv")
    assert scores["Overall"].iloc[0] == pytest.approx(sum(hits.values()) / len(hits))


@pytest.mark.slow
def test_run_py_config_with_transformers_scores_the_tiny_benchmark(vlmeval_overlay, run_env, lmudata, checkpoint,
                                                                   tmp_path):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({
        "model": {MODEL: {"greedy": True, "max_new_tokens": 6}},  # the registered entry, with overrides
        "data": {RUN_BENCH: {"class": "CustomMCQDataset", "dataset": RUN_BENCH}}}))
    log = run_vlmeval(["--config", str(config)], run_env, tmp_path / "outputs", timeout=600)
    assert f"{checkpoint}: qwen2_5_vl_merge on hf; greedy, max_new_tokens=6" in log
    check_results(tmp_path / "outputs", lmudata / f"{RUN_BENCH}.tsv")


@pytest.mark.slow
@pytest.mark.vllm
def test_run_py_model_with_use_vllm_scores_the_tiny_benchmark(vlmeval_overlay, run_env, lmudata, checkpoint,
                                                               tmp_path):
    ok, detail = applier.check(applier.load_manifest("vllm"))
    assert ok, f"the vllm overlay is not applied: {detail}"
    options = {"greedy": True, "max_new_tokens": 6, "max_model_len": 2048, "enforce_eager": True}
    env = {**run_env, "QWEN_MERGE_4B_ARGS": json.dumps(options)}
    log = run_vlmeval(["--data", RUN_BENCH, "--model", MODEL, "--use-vllm"], env, tmp_path / "outputs", timeout=900)
    assert f"{checkpoint}: qwen2_5_vl_merge on vllm; greedy, max_new_tokens=6" in log
    assert "dtype=torch.float32" in log  # the checkpoint's dtype, not vLLM's half-precision default for float32
    check_results(tmp_path / "outputs", lmudata / f"{RUN_BENCH}.tsv")
