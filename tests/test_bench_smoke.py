"""The benchmarks keep running at toy size (no timing assertions: speed is measured in bench/, not in tests)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_train_benchmark_runs_at_toy_size(tmp_path, venv_env):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench/bench_train_gpu.py"), "--toy", "--json", str(out),
                           "--cases", "stock,merge-matched,merge-4b-packed"],
                          capture_output=True, text=True, env=venv_env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["stock Qwen2.5-VL (matched dims)", "Qwen-Merge (matched dims)",
                                         "Qwen-Merge-4B packed (flex) + grad ckpt"]
    assert all(r["tokens_per_s"] > 0 and r["params_B"] > 0 for r in rows)


def test_merge_benchmark_runs_at_toy_size(tmp_path, venv_env):
    proc = subprocess.run([sys.executable, str(REPO / "bench/bench_merge.py"), "--preset", "toy",
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=venv_env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    row = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("{")))
    assert row["merge_peak_rss_GB"] > 0 and row["written_GB"] > 0
