"""Stage-4 rollouts through the servers mode (the stage-3 client) against a real `vllm serve`, behind a recording
proxy: a run killed with -9 and then rerun re-sends no finished rollout, its checkpoint holds each rollout once,
and its outputs equal those of an uninterrupted run (per-request seeds make the samples reproducible)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_process.stage4.tiny_task import TOY_GUIDED_REGEX, write_tiny_task
from tests.distill_fixtures import FaultProxy, module_server, read_jsonl, start_script, wait_for_lines

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "data_process" / "stage4" / "rollouts.py")
K, PER_SOURCE = 4, 2
TOTAL = 3 * PER_SOURCE * K

server = module_server("tiny_merged")


@pytest.fixture(scope="module")
def questions(tmp_path_factory, sample_images) -> Path:
    return write_tiny_task(tmp_path_factory.mktemp("stage4_questions"), sample_images[0].parent, per_kind=PER_SOURCE)


def args(proxy: FaultProxy, model: Path, questions: Path, out: Path) -> list[str]:
    return [SCRIPT, "--mode", "server", "--model", str(model), "--api_ips", proxy.url + "/v1", "--data",
            str(questions), "--output_dir", str(out), "--k", str(K), "--max_tokens", "48", "--max_workers", "2",
            "--max_retries", "2", "--request_timeout", "120", "--no_progress",
            *(f"--guided_regex={r}" for r in TOY_GUIDED_REGEX)]


def run(cmd: list[str]) -> None:
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600, check=False,
                          env={"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def outputs(out: Path) -> dict:
    return {name: pq.read_table(out / f"{name}.parquet").to_pylist() for name in ("rft", "dpo", "kto")} | {
        "verdicts": (out / "verdicts.jsonl").read_text()}


def test_kill_9_then_rerun_resends_nothing_finished_and_gives_the_clean_output(server, tiny_merged, questions,
                                                                              tmp_path):
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    ckpt = resumed / "rollouts.ckpt.jsonl"
    with FaultProxy(server.url, latency_s=(0.2, 0.6), seed=4) as proxy:
        run(args(proxy, tiny_merged, questions, clean))
        assert len(read_jsonl(clean / "rollouts.ckpt.jsonl")) == TOTAL

        seen = len(proxy.chat_events())
        proc = start_script(args(proxy, tiny_merged, questions, resumed), tmp_path / "killed.log")
        wait_for_lines(ckpt, 6, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        finished = {line["id"] for line in read_jsonl(ckpt)}
        assert 6 <= len(finished) < TOTAL and not (resumed / "stats.json").exists()

        seen = len(proxy.chat_events())
        run(args(proxy, tiny_merged, questions, resumed))
        resent = [e.sample_id for e in proxy.chat_events()[seen:] if e.sample_id in finished]
        assert resent == []
        assert len(proxy.chat_events()[seen:]) == TOTAL - len(finished)  # the missing ones, each sent once

    lines = read_jsonl(ckpt)
    assert len(lines) == len({line["id"] for line in lines}) == TOTAL
    stats = json.loads((resumed / "stats.json").read_text())
    assert stats["rollouts"]["resumed (already done)"] == len(finished)
    assert stats["overall"]["samples"] == TOTAL and stats["overall"]["missing_rollouts"] == 0
    assert outputs(resumed) == outputs(clean)
