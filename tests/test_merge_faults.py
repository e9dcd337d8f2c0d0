"""merge/model_merger.py and examples/compare_checkpoints.py under faults and user mistakes: each ends with one line
on stderr (no traceback), a non-zero exit and nothing left behind, or (stale staging folders) is repaired and said.

Every CLI run has a timeout, so a regression that hangs fails instead of blocking the suite."""
from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
MERGER = REPO / "merge/model_merger.py"
TIMEOUT = 120


def run(args: list, timeout: int = TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, **kwargs)


def merge_cli(vlm, llm, out, *extra, **kwargs) -> subprocess.CompletedProcess:
    return run([MERGER, "--quiet", "--vlm-path", vlm, "--llm-path", llm, "--output-path", out, *extra], **kwargs)


def assert_one_line_error(proc: subprocess.CompletedProcess, *expected: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in err and err.count("\n") == 0, err
    for text in expected:
        assert text in err, (text, err)
    return err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def shard_copy(src: Path, dst: Path, max_bytes: int) -> Path:
    """Copy a single-file checkpoint to `dst`, its weights split into several shards + index (hub layout)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.numel() * t.element_size() > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * t.element_size()
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_truncated_shard_fails_fast_naming_the_shard_and_the_missing_bytes(tiny_qwen25vl, tiny_qwen3, tmp_path):
    llm = shard_copy(tiny_qwen3, tmp_path / "llm", max_bytes=40 * 10**6)
    shards = sorted(llm.glob("model-*.safetensors"))
    assert len(shards) >= 2
    victim = shards[-1]
    with open(victim, "r+b") as f:  # an interrupted download: the last 1000 bytes never arrived
        f.truncate(victim.stat().st_size - 1000)
    started = time.time()
    proc = merge_cli(tiny_qwen25vl, llm, tmp_path / "out", timeout=60)
    assert_one_line_error(proc, victim.name, "1000 bytes missing")
    assert time.time() - started < 60
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_absurd_header_length_is_one_line(tiny_qwen25vl, tiny_qwen3, tmp_path):
    vlm = tmp_path / "vlm"
    shutil.copytree(tiny_qwen25vl, vlm)
    blob = (vlm / "model.safetensors").read_bytes()
    (vlm / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + blob[8:])
    proc = merge_cli(vlm, tiny_qwen3, tmp_path / "out")
    assert_one_line_error(proc, "model.safetensors", "header length 1099511627776")
    assert not (tmp_path / "out").exists()


def test_output_parent_that_is_a_file(tiny_qwen25vl, tiny_qwen3, tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    proc = merge_cli(tiny_qwen25vl, tiny_qwen3, tmp_path / "notes.txt" / "merged")
    assert_one_line_error(proc, "notes.txt is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder"


def drop_root_file_override() -> None:
    """In the child, before exec: as root, drop CAP_DAC_OVERRIDE from the bounding set, so that file modes apply to
    it as to any user (root keeps reading its own files). Other users are subject to modes anyway."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_read_only_output_folder(tiny_qwen25vl, tiny_qwen3, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    try:
        proc = merge_cli(tiny_qwen25vl, tiny_qwen3, locked / "out", preexec_fn=drop_root_file_override)
        assert_one_line_error(proc, "cannot write to", "Permission denied")
        assert list(locked.iterdir()) == []
    finally:
        os.chmod(locked, 0o755)


def test_disk_full_mid_write_is_one_line_and_leaves_nothing(tiny_qwen25vl, tiny_qwen3, tmp_path):
    """The write fails part-way (RLIMIT_FSIZE: the kernel refuses to grow any file past 8 MB, as a full disk would)."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 2**20, 8 * 2**20))

    proc = merge_cli(tiny_qwen25vl, tiny_qwen3, tmp_path / "out", preexec_fn=limit_file_size)
    assert_one_line_error(proc, "cannot write", "File too large", "choose another --output-path")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_compare_checkpoints_on_a_truncated_file_is_one_line(tiny_merged, tmp_path):
    cut = tmp_path / "cut.safetensors"
    blob = (tiny_merged / "model.safetensors").read_bytes()
    cut.write_bytes(blob[: len(blob) // 2])
    proc = run([REPO / "examples/compare_checkpoints.py", tiny_merged, cut])
    assert_one_line_error(proc, "cut.safetensors")


@pytest.mark.parametrize("flags, expected", [
    (["--init-std", "-1"], "--init-std -1.0: must be a finite number >= 0"),
    (["--image-min-pixels", "1000000", "--image-max-pixels", "200000"], "larger than --image-max-pixels"),
])
def test_bad_flag_values_are_refused_before_any_work(flags, expected, tiny_qwen25vl, tiny_qwen3, tmp_path):
    proc = merge_cli(tiny_qwen25vl, tiny_qwen3, tmp_path / "out", *flags)
    assert_one_line_error(proc, expected)
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_an_existing_file(tiny_qwen25vl, tiny_qwen3, tmp_path):
    out = tmp_path / "out"
    out.write_text("an old file with the output's name")
    proc = merge_cli(tiny_qwen25vl, tiny_qwen3, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_llm_missing_one_layer_tensor_is_named(tiny_qwen25vl, tiny_qwen3, tmp_path):
    llm = tmp_path / "llm"
    shutil.copytree(tiny_qwen3, llm, ignore=shutil.ignore_patterns("model.safetensors"))
    with safe_open(str(tiny_qwen3 / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.down_proj.weight"}
    save_file(tensors, str(llm / "model.safetensors"), metadata={"format": "pt"})
    proc = merge_cli(tiny_qwen25vl, llm, tmp_path / "out")
    assert_one_line_error(proc, "model.layers.1.mlp.down_proj.weight", "missing")
    assert not (tmp_path / "out").exists()


KILLABLE = """
import sys, time
from merge import model_merger
def stall(*args, **kwargs):  # the shards are written; stall so the test can kill the process mid-merge
    print("STAGED", flush=True)
    time.sleep(600)
model_merger.write_materials = stall
model_merger.merge(sys.argv[1], sys.argv[2], sys.argv[3], quiet=True)
"""


def test_kill_9_mid_merge_then_next_run_removes_the_stale_staging_folder(tiny_qwen25vl, tiny_qwen3, tmp_path):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", KILLABLE, str(tiny_qwen25vl), str(tiny_qwen3), str(out)],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "STAGED"
        stale = tmp_path / f".out.partial-{child.pid}"
        assert (stale / "model.safetensors").is_file()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert stale.is_dir()  # kill -9 leaves it behind; the next run must deal with it
    proc = merge_cli(tiny_qwen25vl, tiny_qwen3, out)
    assert proc.returncode == 0, proc.stderr
    assert f"removed .out.partial-{child.pid}" in proc.stderr and f"pid {child.pid}" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_output_moved_aside_by_a_killed_overwrite_is_restored(tiny_qwen25vl, tiny_qwen3, tmp_path):
    """kill -9 between the two renames of --overwrite leaves the previous output as .NAME.old-PID and no NAME: the next
    run puts it back (and, without --overwrite, keeps it)."""
    pid = dead_pid()
    old = tmp_path / f".out.old-{pid}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    proc = merge_cli(tiny_qwen25vl, tiny_qwen3, tmp_path / "out")
    notice, error = proc.stderr.strip().split("\n")  # what was repaired, then why nothing was written
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"restored out from .out.old-{pid}" in notice
    assert "exists and is not empty" in error and "--overwrite" in error  # the restored output is protected
    assert (tmp_path / "out/config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
