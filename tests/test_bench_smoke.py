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
                                         "Qwen-Merge-4B packed, attention per document + grad ckpt"]
    assert all(r["tokens_per_s"] > 0 and r["params_B"] > 0 for r in rows)


def test_merge_benchmark_runs_at_toy_size(tmp_path, venv_env):
    proc = subprocess.run([sys.executable, str(REPO / "bench/bench_merge.py"), "--preset", "toy",
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=venv_env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    row = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("{")))
    assert row["merge_peak_rss_GB"] > 0 and row["written_GB"] > 0


def test_gpu_recipe_data_has_the_recipes_dataset_names_and_a_sample_near_cutoff(tmp_path, tiny_merged, venv_env):
    """bench/gpu_recipes.py data: the datasets the 4B recipes name, in examples/dataset_info.json's layout, with one
    sample per stage close to cutoff_len 8192 (counted by the model's own processor)."""
    import yaml
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_recipes.py"), "data", "--work", str(tmp_path),
                           "--model", str(tiny_merged), "--stage1-rows", "6", "--stage3-rows", "4"],
                          capture_output=True, text=True, env=venv_env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "data/dataset_info.json").read_text())
    wanted = {name for stage in ("stage1", "stage3") for name in
              yaml.safe_load((REPO / f"examples/qwen_merge_4b/{stage}.yaml").read_text())["dataset"].split(",")}
    assert set(info) == wanted
    real = json.loads((REPO / "examples/dataset_info.json").read_text())
    assert all(info[name] == real[name] for name in wanted)
    counts = json.loads((tmp_path / "data/token_counts.json").read_text())
    assert [len(counts["stage1"]), len(counts["stage3"])] == [6, 4]
    assert all(7000 < max(lengths) <= 8192 for lengths in counts.values()), counts
    assert all(min(lengths) >= 256 for lengths in counts.values())  # every sample carries an image of >= 256 tokens
