"""Rollout bookkeeping without an engine: per-sample seeds and checkpoint keys, flag errors as one line."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from data_process.stage4.questions import Question
from data_process.stage4.rollouts import Sampling, rollout_tasks

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "data_process" / "stage4" / "rollouts.py")
QUESTIONS = [Question("q1", "s", 0, "Which?\nA. x\nB. y", "Which?\nA. x\nB. y", (), "mcq", "A"),
             Question("q2", "s", 1, "2+2?", "2+2?", (), "math", "4")]
SAMPLING = Sampling("model", 3, 0.6, 0.95, 20, 64, 42)


def test_every_sample_has_its_own_seed_and_the_same_one_on_every_run():
    tasks = rollout_tasks(QUESTIONS, SAMPLING)
    assert [t.id for t in tasks] == ["q1/0", "q1/1", "q1/2", "q2/0", "q2/1", "q2/2"]
    seeds = [t.data["seed"] for t in tasks]
    assert len(set(seeds)) == len(seeds)
    assert [t.data["seed"] for t in rollout_tasks(QUESTIONS, SAMPLING)] == seeds
    assert [t.data["seed"] for t in rollout_tasks(QUESTIONS, dataclasses.replace(SAMPLING, seed=7))] != seeds


def test_checkpoint_key_changes_with_what_defines_the_sample_and_only_with_it():
    keys = [t.key for t in rollout_tasks(QUESTIONS, SAMPLING)]
    by_id = {t.id: t.key for t in rollout_tasks(list(reversed(QUESTIONS)), SAMPLING)}
    assert [by_id[t.id] for t in rollout_tasks(QUESTIONS, SAMPLING)] == keys  # input order does not matter
    for change in ({"temperature": 1.0}, {"top_k": 5}, {"max_tokens": 32}, {"model": "other"},
                   {"guided_regex": (("mcq", "A|B"),)}):
        changed = [t.key for t in rollout_tasks(QUESTIONS, dataclasses.replace(SAMPLING, **change))]
        if "guided_regex" in change:  # only the mcq question's samples are constrained
            assert changed[:3] != keys[:3] and changed[3:] == keys[3:]
        else:
            assert not set(changed) & set(keys), change
    assert [t.key for t in rollout_tasks(QUESTIONS, dataclasses.replace(SAMPLING, k=5))][:3] == keys[:3]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)})


def test_bad_flags_and_inputs_fail_with_one_line(tmp_path):
    proc = run_cli("--model", str(tmp_path / "missing"), "--data", str(tmp_path), "--output_dir", str(tmp_path))
    assert proc.returncode == 2 and "needs --model to be a checkpoint folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("--model", str(tmp_path), "--data", str(tmp_path), "--output_dir", str(tmp_path / "o"),
                   "--guided_regex", "letters=A|B")
    assert proc.returncode == 1 and "--guided_regex wants KIND=REGEX" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "empty.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"messages": pa.array([[{"role": "user", "content": "Describe it."},
                                                    {"role": "assistant", "content": " ".join(["word"] * 20)}]])}),
                   empty)
    proc = run_cli("--model", str(tmp_path), "--data", str(empty), "--output_dir", str(tmp_path / "o"),
                   "--skip_generation")
    assert proc.returncode == 1 and "no verifiable question" in proc.stderr and "not_verifiable" in proc.stderr
    assert "Traceback" not in proc.stderr
