"""The README's main command, on fewer steps: tiny sources -> merge -> stage 1/2 data -> stage 1 and 2.1 training,
then a rerun that skips every finished step. (Distillation, serving and evaluation have their own test modules.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_quickstart(work: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "examples/quickstart.sh"), "--work", str(work),
                           "--steps", "sources,merge,data,train", "--stages", "stage1,stage2.1", *extra],
                          capture_output=True, text=True, env={**env, "PYTHON": sys.executable}, timeout=1800)


@pytest.mark.slow
def test_quickstart_runs_and_resumes(tmp_path, venv_env):
    work = tmp_path / "qs"
    first = run_quickstart(work, venv_env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state = {p.stem: json.loads(p.read_text()) for p in (work / "state").glob("*.json")}
    assert set(state) == {"sources", "merge", "data", "train"}
    summaries = state["data"]["summaries"]
    assert "rejected: image_truncated=1" in summaries["LLaVA_ReCap_558K"]
    assert "rejected: ground_truth_not_json=1" in summaries["synthdog_en"]
    stages = state["train"]["stages"]
    stage1, stage21 = stages["stage1"], stages["stage2.1"]
    as_int = lambda text: int(text.replace(",", ""))  # noqa: E731
    assert as_int(stage1["trainable_params"]) < as_int(stage1["all_params"]) // 50  # projector only
    assert as_int(stage21["trainable_params"]) > as_int(stage21["all_params"]) // 2  # + language model
    for info in (stage1, stage21):
        assert info["losses"] and info["losses"][-1] < info["losses"][0]
        assert (Path(info["model"]) / "config.json").is_file()
    report = (work / "report.txt").read_text()
    assert "Qwen-Merge quickstart report" in report and "stage2.1" in report

    again = run_quickstart(work, venv_env)
    assert again.returncode == 0, again.stdout[-3000:]
    for step in ("sources", "merge", "data", "train"):
        assert f"{step}: done earlier, skipped" in again.stdout
    assert json.loads((work / "state/train.json").read_text()) == state["train"]


def test_quickstart_rejects_unknown_steps(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples/quickstart.py"), "--work", str(tmp_path),
                           "--steps", "merge,fly"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown step or stage: fly" in proc.stderr


def test_a_step_whose_inputs_are_missing_names_the_steps_to_run_first(tmp_path, venv_env):
    """`--steps train` on a fresh --work: one line naming the earlier steps, exit 2, no traceback, nothing run."""
    proc = subprocess.run(["bash", str(REPO / "examples/quickstart.sh"), "--work", str(tmp_path / "fresh"),
                           "--steps", "train"], capture_output=True, text=True,
                          env={**venv_env, "PYTHON": sys.executable}, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "needs the results of merge, data" in proc.stdout and "run --steps merge,data first" in proc.stdout
    assert not (tmp_path / "fresh" / "models").exists()
