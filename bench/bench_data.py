"""Benchmark of data_process/process_llava.py on synthetic ReCap rows with real-sized JPEGs.

Measured side by side in one run, on the same input files:
  * raw: pyarrow read + write of the same bytes (iter_batches -> ParquetWriter), the I/O floor;
  * ours (the whole process_llava.py command, start-up included) with 1 and 2 processes and the default
    --image_check structure, and 1 process with --image_check decode (full pixel decode);
  * peak RSS (process tree) of a 1-process run at --rss_rows rows and at --rows rows (should be flat).
The machine may be shared: raw and ours run in alternation --repeat times and each keeps its best time.
Before every timed run the previous output is deleted and dirty pages are flushed (os.sync), outside the
timing, so no run pays for another's write-back.

    .venv/bin/python bench/bench_data.py --rows 100000        # the issue's size
    .venv/bin/python bench/bench_data.py --rows 200           # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RECAP_FEATURES = {
    "id": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "conversations": [{"from": {"dtype": "string", "_type": "Value"}, "value": {"dtype": "string", "_type": "Value"}}],
}
RECAP_SCHEMA = pa.schema(
    [("id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
     ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))],
    metadata={"huggingface": json.dumps({"info": {"features": RECAP_FEATURES}})},
)
CAPTION = ("The image shows a busy street market at dusk, with stalls selling fruit and vegetables under strings "
           "of warm lights, people walking between the stands, and a tall building in the background. ") * 2


def jpeg_pool(count: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs of LLaVA-pretrain sizes (about 336-640 px, quality 90, tens of KB)."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(count):
        width, height = int(rng.integers(336, 641)), int(rng.integers(336, 481))
        noise = (rng.random((height // 16, width // 16, 3)) * 255).astype("uint8")
        image = Image.fromarray(noise).resize((width, height), Image.BICUBIC)
        detail = (rng.random((height, width, 3)) * 24).astype("uint8")
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + detail - 12, 0, 255).astype("uint8"))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        pool.append(buffer.getvalue())
    return pool


def write_input(root: Path, rows: int, rows_per_file: int = 10_000, pool_size: int = 64) -> int:
    """A ReCap hub-layout repo (data/train-*.parquet, 100-row row groups); returns its size in bytes."""
    pool = jpeg_pool(pool_size)
    files = max(1, -(-rows // rows_per_file))
    (root / "data").mkdir(parents=True, exist_ok=True)
    for f in range(files):
        start, stop = f * rows_per_file, min(rows, (f + 1) * rows_per_file)
        with pq.ParquetWriter(root / "data" / f"train-{f:05d}-of-{files:05d}.parquet", RECAP_SCHEMA) as writer:
            for group in range(start, stop, 100):
                ids = range(group, min(stop, group + 100))
                writer.write_table(pa.table({
                    "id": [f"{i:09d}" for i in ids],
                    "image": [{"bytes": pool[i % pool_size], "path": None} for i in ids],
                    "conversations": [[{"from": "human", "value": "<image>\nDescribe the image in detail."},
                                       {"from": "gpt", "value": CAPTION}] for _ in ids],
                }, schema=RECAP_SCHEMA))
    return sum(p.stat().st_size for p in (root / "data").iterdir())


def raw_copy(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted((source / "data").iterdir()):
        reader = pq.ParquetFile(path)
        with pq.ParquetWriter(target / path.name, reader.schema_arrow) as writer:
            for batch in reader.iter_batches(batch_size=100):
                writer.write_batch(batch)


def settle(*outputs: Path) -> None:
    """Delete earlier output and flush dirty pages, so the next timed run starts from the same state."""
    for path in outputs:
        shutil.rmtree(path, ignore_errors=True)
    os.sync()


def run_ours(source: Path, out: Path, processes: int, image_check: str = "structure") -> tuple[float, int]:
    """Seconds and peak RSS (bytes, summed over the process tree) of one process_llava run."""
    settle(out)
    cmd = [sys.executable, str(REPO / "data_process" / "process_llava.py"), "--datasets", "bench/ReCap",
           "--source", f"bench/ReCap={source}", "--output_dir", str(out), "--num_processes", str(processes),
           "--image_check", image_check, "--no_progress", "--overwrite"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    process = psutil.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    while process.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    output = process.stdout.read().decode()
    if process.returncode:
        raise SystemExit(f"process_llava failed:\n{output}")
    return seconds, peak


def raw_seconds(source: Path, target: Path) -> float:
    settle(target)
    started = time.perf_counter()
    raw_copy(source, target)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the main run (default: %(default)s)")
    parser.add_argument("--rss_rows", type=int, default=10_000,
                        help="rows of the small run the peak RSS is compared with (default: %(default)s)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed after)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="alternating rounds of raw / ours 1 proc / ours 2 procs; best time of each (default: 2)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    small_rows = min(args.rss_rows, args.rows)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    try:
        big, small, out = workdir / "in_big", workdir / "in_small", workdir / "out"
        size = write_input(big, args.rows)
        write_input(small, small_rows)
        raw, one, two, rss_big = [], [], [], 0
        for _ in range(max(1, args.repeat)):
            raw.append(raw_seconds(big, workdir / "raw"))
            seconds, rss = run_ours(big, out, 1)
            one.append(seconds)
            rss_big = max(rss_big, rss)
            two.append(run_ours(big, out, 2)[0])
        settle(workdir / "raw")
        decode, _ = run_ours(big, out, 1, "decode")
        _, rss_small = run_ours(small, workdir / "out_small", 1)
        settle(out, workdir / "out_small")
        raw_s, one_s, two_s = min(raw), min(one), min(two)
        figures = {
            "rows": args.rows,
            "input_mb": round(size / 2**20, 1),
            "mean_jpeg_kb": round(size / args.rows / 1024, 1),
            "raw_pyarrow_rows_per_s": round(args.rows / raw_s),
            "ours_1proc_rows_per_s": round(args.rows / one_s),
            "ours_2proc_rows_per_s": round(args.rows / two_s),
            "ours_1proc_decode_check_rows_per_s": round(args.rows / decode),
            "ratio_1proc_vs_raw": round(raw_s / one_s, 3),
            "ratio_2proc_vs_raw": round(raw_s / two_s, 3),
            "ratio_1proc_decode_vs_raw": round(raw_s / decode, 3),
            "speedup_2proc": round(one_s / two_s, 2),
            f"peak_rss_mb_{small_rows}_rows": round(rss_small / 2**20, 1),
            f"peak_rss_mb_{args.rows}_rows": round(rss_big / 2**20, 1),
            "seconds_raw_each_round": [round(x, 1) for x in raw],
            "seconds_1proc_each_round": [round(x, 1) for x in one],
            "seconds_2proc_each_round": [round(x, 1) for x in two],
            "cpu_count": os.cpu_count(),
            "load_average_1min_at_end": round(os.getloadavg()[0], 1),
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
