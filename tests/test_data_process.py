"""process_llava / process_synthdog / process_onevision on local hub-layout fixtures."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_process import common, naming, process_llava, process_onevision, process_synthdog, sources
from data_process.rules import FIRST_TURN_REQUIRE, conversations_to_messages
from tests import data_fixtures as fx

REPO = Path(__file__).resolve().parents[1]
RECAP = "lmms-lab/LLaVA-ReCap-558K"
QUIET = ["--no_progress", "--num_processes", "1"]


@pytest.fixture(scope="module")
def recap(tmp_path_factory):
    rows, expected = fx.recap_rows()
    return fx.make_recap_repo(tmp_path_factory.mktemp("recap"), rows), rows, expected


def run_llava(repo: Path, out: Path, *extra: str) -> int:
    return process_llava.main(["--datasets", RECAP, "--source", f"{RECAP}={repo}", "--output_dir", str(out),
                               "--rows_per_shard", "7", *QUIET, *extra])


def shard_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


def stats_of(out: Path, name: str) -> dict:
    return json.loads((out / "_stats" / name / "summary.json").read_text())


def rejects_of(out: Path, name: str) -> list[dict]:
    lines = []
    for path in sorted((out / "_stats" / name).glob("*.rejects.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


# ----------------------------------------------------------------------------------------------- rules

@pytest.mark.parametrize("reason,conversations", fx.CONVERSATION_CASES)
def test_conversation_rules(reason, conversations):
    if reason is None:
        messages = conversations_to_messages(conversations)
        assert messages[0]["content"].startswith("<image>\n")
        assert sum(m["content"].count("<image>") for m in messages) == 1
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    else:
        with pytest.raises(common.Reject) as info:
            conversations_to_messages(conversations)
        assert info.value.reason == reason


def test_end_of_turn_image_moves_to_front_and_require_policy():
    messages = conversations_to_messages(fx.CONVERSATION_CASES[2][1])
    assert messages[0]["content"] == "<image>\nRender a clear and concise summary of the photo."
    with pytest.raises(common.Reject, match="missing_image_tag"):
        conversations_to_messages(fx.CONVERSATION_CASES[1][1], FIRST_TURN_REQUIRE)


@pytest.mark.parametrize("reason", sorted(fx.BAD_IMAGES))
def test_image_policy_rejects(reason):
    for check in common.IMAGE_CHECKS:
        with pytest.raises(common.Reject) as info:
            common.ImagePolicy(check=check).prepare(fx.BAD_IMAGES[reason]())
        assert info.value.reason == reason


@pytest.mark.parametrize("name", sorted(fx.image_variants()))
def test_structure_check_accepts_what_pil_decodes(name):
    view = memoryview(fx.image_variants()[name])  # parquet inputs hand over zero-copy views
    for check in common.IMAGE_CHECKS:
        stored, reencoded = common.ImagePolicy(check=check).prepare(view)
        assert stored is view and not reencoded


def _patched(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


def _damaged_images() -> dict[str, tuple[bytes, str]]:
    jpeg, png = fx.jpeg_bytes(64, 48, seed=2), fx.png_bytes()
    sof, dht = jpeg.index(b"\xff\xc0"), jpeg.index(b"\xff\xc4")
    idat = png.index(b"IDAT")
    return {
        "jpeg_cut_in_scan": (jpeg[:-300], "image_truncated"),
        "jpeg_no_end_marker": (jpeg[:-2], "image_truncated"),
        "jpeg_bad_huffman_table": (_patched(jpeg, dht + 5, b"\x07" * 16), "image_unreadable"),
        "jpeg_12_bit": (_patched(jpeg, sof + 4, b"\x0c"), "image_unreadable"),
        "jpeg_bad_sampling": (_patched(jpeg, sof + 11, b"\x09"), "image_unreadable"),
        "jpeg_zero_width": (_patched(jpeg, sof + 7, b"\x00\x00"), "image_bad_size"),
        "jpeg_bomb": (_patched(jpeg, sof + 5, b"\xea\x60\xea\x60"), "image_too_large"),  # 60000 x 60000
        "png_bad_checksum": (_patched(png, idat + 6, bytes([png[idat + 6] ^ 1])), "image_unreadable"),
        "png_no_iend": (png[:-12], "image_truncated"),
        "png_cut": (png[:len(png) // 2], "image_truncated"),
    }


@pytest.mark.parametrize("name", sorted(_damaged_images()))
def test_structure_check_rejects_damage_that_decoding_rejects(name):
    data, reason = _damaged_images()[name]
    for check in common.IMAGE_CHECKS:
        with pytest.raises(common.Reject) as info:
            common.ImagePolicy(check=check).prepare(memoryview(data))
        assert info.value.reason == reason
    if reason in ("image_truncated", "image_unreadable"):  # PIL fails on these too (load, or verify for CRCs)
        with pytest.raises((OSError, SyntaxError, ValueError)):
            Image.open(io.BytesIO(data)).verify()
            Image.open(io.BytesIO(data)).load()


def test_image_bytes_kept_or_reencoded():
    jpeg = fx.jpeg_bytes()
    assert common.ImagePolicy().prepare(jpeg) == (jpeg, False)
    data, reencoded = common.ImagePolicy().prepare(fx.ppm_bytes())
    assert reencoded and Image.open(io.BytesIO(data)).format == "PNG"


def test_image_paths_confined_to_roots(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(fx.png_bytes())
    (tmp_path / "secret.png").write_bytes(fx.png_bytes())
    roots = common.image_roots([str(root)])
    assert common.resolve_image_path("sub/a.png", roots) == str((root / "sub" / "a.png").resolve())
    for bad in ("../secret.png", str(tmp_path / "secret.png"), "sub/../../secret.png"):
        with pytest.raises(common.Reject, match="image_path_outside_roots"):
            common.resolve_image_path(bad, roots)
    with pytest.raises(common.Reject, match="image_not_found"):
        common.resolve_image_path("sub/missing.png", roots)


def test_local_hub_layout_resolved_like_datasets(recap, tmp_path):
    synthdog = fx.make_synthdog_repo(tmp_path / "synthdog", fx.synthdog_rows()[0])
    for folder in (recap[0], synthdog):
        for split, files in datasets.load_dataset_builder(str(folder)).config.data_files.items():
            assert sources._sharded_layout_files(str(folder), split) == sorted(str(f) for f in files)
    # README configs override the layout: left to `datasets`
    (synthdog / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: data/validation-*\n---\n")
    assert sources._sharded_layout_files(str(synthdog), "train") == []
    assert [Path(f).name for f in sources.resolve_hub_files(str(synthdog))] == ["validation-00000-of-00001-def.parquet"]


def test_columnwise_pylist_matches_arrow():
    type_ = pa.list_(pa.struct([("from", pa.string()), ("value", pa.large_string()), ("n", pa.int64())]))
    array = pa.array([[{"from": "human", "value": None, "n": 1}, None, {"from": None, "value": "é", "n": None}],
                      None, [], [{"from": "", "value": "", "n": 3}]], type_)
    for part in (array, array.slice(1), array.slice(2, 2), pa.array([None, "a"]), pa.array([b"x", None])):
        assert sources._pylist(part) == part.to_pylist()


def test_onevision_configs_and_hub_ids_map_to_output_names():
    assert len(naming.ONEVISION_CONFIGS) == 89 == len(set(naming.ONEVISION_CONFIGS))
    assert naming.onevision_name("CLEVR-Math(MathV360K)") == "CLEVR_Math_MathV360K"
    assert naming.onevision_name("ai2d(cauldron,llava_format)") == "ai2d_cauldron_llava_format"
    assert naming.onevision_name("GeoQA+(MathV360K)") == "GeoQA+_MathV360K"
    assert naming.hub_output_name(RECAP) == "LLaVA_ReCap_558K"
    assert naming.hub_output_name("naver-clova-ix/synthdog-zh") == "synthdog_zh"
    produced = [c for c in naming.ONEVISION_CONFIGS if c not in naming.ONEVISION_TEXT_ONLY_CONFIGS]
    assert len(produced) == 84


def test_output_schema_matches_datasets_features():
    features = datasets.Features({"messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
                                  "images": datasets.Sequence(datasets.Image())})
    assert common.OUTPUT_SCHEMA.equals(features.arrow_schema, check_metadata=True)


# ----------------------------------------------------------------------------------------------- llava

def test_llava_output_counts_and_loading(recap, tmp_path):
    repo, rows, expected = recap
    out = tmp_path / "out"
    assert run_llava(repo, out) == 0
    name = "LLaVA_ReCap_558K"
    summary = stats_of(out, name)
    assert summary["rows_in"] == len(rows) == summary["kept"] + sum(summary["rejected"].values())
    assert summary["rejected"] == expected
    assert summary["reencoded_images"] == 1
    rejects = rejects_of(out, name)
    assert len(rejects) == sum(expected.values())
    assert {r["reason"] for r in rejects} == set(expected) and all(r["source"] == name for r in rejects)
    assert {r["id"] for r in rejects if r["reason"] == "image_truncated"} == {"bad-image_truncated"}

    # the shard folder holds only finished parquet shards (LLaMA-Factory lists every file in it)
    assert all(f.endswith(".parquet") for f in os.listdir(out / name))
    info = json.loads((out / "dataset_info.json").read_text())
    assert info == {name: naming.dataset_info_entry(name)}

    loaded = datasets.load_dataset("parquet", data_dir=str(out / name), split="train")
    assert len(loaded) == summary["kept"]
    first = loaded[0]
    assert isinstance(first["images"][0], Image.Image)
    assert first["messages"][0] == {"role": "user", "content": "<image>\nDescribe the image."}
    # image bytes are stored as they came (no re-encode), path is None
    table = pq.read_table(out / name)
    stored = [img["bytes"] for cell in table.column("images").to_pylist() for img in cell]
    good_inputs = [r["image"]["bytes"] for r in rows if r["id"].startswith("good-")]
    assert stored[:len(good_inputs)] == good_inputs
    assert all(img["path"] is None for cell in table.column("images").to_pylist() for img in cell)


def test_parallel_output_identical_and_max_samples_seeded(recap, tmp_path):
    repo, rows, _ = recap
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_llava(repo, one, "--max_samples", "15", "--seed", "3") == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "data_process" / "process_llava.py"), "--datasets", RECAP,
           "--source", f"{RECAP}={repo}", "--output_dir", str(two), "--rows_per_shard", "7",
           "--max_samples", "15", "--seed", "3", "--num_processes", "2", "--no_progress"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    name = "LLaVA_ReCap_558K"
    assert shard_digests(one / name) == shard_digests(two / name)
    summary = stats_of(two, name)
    assert summary["rows_in"] == len(rows)
    assert summary["rejected"]["not_sampled"] == len(rows) - 15
    # another seed picks other rows
    other = tmp_path / "other"
    assert run_llava(repo, other, "--max_samples", "15", "--seed", "4") == 0
    assert shard_digests(other / name) != shard_digests(one / name)


def test_test_mode_reads_only_first_rows(recap, tmp_path, monkeypatch):
    repo, _, _ = recap
    out = tmp_path / "out"
    monkeypatch.setattr(process_llava, "TEST_ROWS", 10)  # the fixture is smaller than the real 1000
    assert run_llava(repo, out, "--test_mode") == 0
    assert stats_of(out, "LLaVA_ReCap_558K")["rows_in"] == 10
    assert stats_of(out, "LLaVA_ReCap_558K")["shards"] == 2
    assert stats_of(out, "LLaVA_ReCap_558K")["kept"] == 10  # the first 12 fixture rows are the good ones


def test_changed_shard_plan_refused_until_overwrite(recap, tmp_path):
    repo, _, _ = recap
    out = tmp_path / "out"
    assert run_llava(repo, out) == 0
    before = shard_digests(out / "LLaVA_ReCap_558K")
    assert run_llava(repo, out, "--rows_per_shard", "5") == 1  # different plan: refused, nothing touched
    assert shard_digests(out / "LLaVA_ReCap_558K") == before
    assert run_llava(repo, out, "--rows_per_shard", "5", "--overwrite") == 0
    assert stats_of(out, "LLaVA_ReCap_558K")["shards"] == 6


_KILL_SCRIPT = """
import os, signal, sys
from data_process import common, process_llava
original = common.ShardWriter.add_table
state = {"rows": 0}
def add_table(self, table):
    original(self, table)
    state["rows"] += table.num_rows
    if state["rows"] >= int(os.environ["KILL_AT"]):
        self._flush()
        os.kill(os.getpid(), signal.SIGKILL)
common.ShardWriter.add_table = add_table
sys.exit(process_llava.main(sys.argv[1:]))
"""


def test_resume_after_kill_gives_identical_output(recap, tmp_path):
    repo, _, _ = recap
    name = "LLaVA_ReCap_558K"
    reference = tmp_path / "reference"
    assert run_llava(repo, reference) == 0
    out = tmp_path / "killed"
    args = ["--datasets", RECAP, "--source", f"{RECAP}={repo}", "--output_dir", str(out), "--rows_per_shard", "7",
            *QUIET]
    env = {**os.environ, "PYTHONPATH": str(REPO), "KILL_AT": "8"}
    killed = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, *args], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9
    assert 0 < len(shard_digests(out / name)) < len(shard_digests(reference / name))
    assert list((out / ".tmp").glob("*.partial"))  # the shard being written was left half-done
    assert run_llava(repo, out) == 0
    assert shard_digests(out / name) == shard_digests(reference / name)
    assert stats_of(out, name) == stats_of(reference, name) | {"source": str(repo)}
    assert rejects_of(out, name) == rejects_of(reference, name)
    assert not list((out / ".tmp").glob("*.partial"))


def test_cli_errors_are_one_line(recap, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = str(REPO / "data_process" / "process_llava.py")
    bad_source = subprocess.run([sys.executable, script, "--source", "x"], env=env, capture_output=True, text=True)
    assert bad_source.returncode == 2 and "NAME=LOCAL_DIR" in bad_source.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = subprocess.run([sys.executable, script, "--datasets", RECAP, "--source", f"{RECAP}={empty}",
                              "--output_dir", str(tmp_path / "o"), "--no_progress"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr and "error: LLaVA_ReCap_558K:" in missing.stderr
    helped = subprocess.run([sys.executable, script, "--help"], env=env, capture_output=True, text=True)
    assert "--max_samples" in helped.stdout and "--source" in helped.stdout


# ----------------------------------------------------------------------------------------------- synthdog

def test_synthdog_ground_truth_becomes_the_ocr_answer(tmp_path):
    rows, expected = fx.synthdog_rows()
    repo = fx.make_synthdog_repo(tmp_path / "synthdog-en", rows)
    out = tmp_path / "out"
    code = process_synthdog.main(["--languages", "en", "--source", f"naver-clova-ix/synthdog-en={repo}",
                                  "--output_dir", str(out), *QUIET])
    assert code == 0
    summary = stats_of(out, "synthdog_en")
    assert summary["rows_in"] == len(rows)  # the validation split is not read
    assert summary["rejected"] == expected
    loaded = datasets.load_dataset("parquet", data_dir=str(out / "synthdog_en"), split="train")
    assert loaded[0]["messages"] == [
        {"role": "user", "content": "<image>\nPlease recognize all text in the image and output the text."},
        {"role": "assistant", "content": "line 0 文本"},
    ]


# ----------------------------------------------------------------------------------------------- onevision

def test_onevision_configs(tmp_path):
    configs = {
        "ai2d(cauldron,llava_format)": fx.onevision_rows(with_tag=False),  # <image> prepended
        "geo3k": fx.onevision_rows(with_tag=True, count=3) + fx.onevision_rows(with_tag=False, count=2),
        "mathqa": fx.onevision_rows(with_image=False, count=2),  # text-only: no output
    }
    repo = fx.make_onevision_repo(tmp_path / "ov", configs)
    out = tmp_path / "out"
    code = process_onevision.main(["--local_dir", str(repo), "--configs", "ai2d(cauldron,llava_format)", "geo3k",
                                   "mathqa", "--output_dir", str(out), *QUIET])
    assert code == 0
    assert stats_of(out, "ai2d_cauldron_llava_format")["kept"] == 4
    assert stats_of(out, "geo3k")["rejected"] == {"missing_image_tag": 2}
    assert stats_of(out, "mathqa") | {"rejected": None} == stats_of(out, "mathqa") | {"kept": 0, "rejected": None}
    assert not (out / "mathqa").exists()
    info = json.loads((out / "dataset_info.json").read_text())
    assert sorted(info) == ["ai2d_cauldron_llava_format", "geo3k"]
    with pytest.raises(SystemExit):
        process_onevision.main(["--local_dir", str(repo), "--configs", "nope", "--output_dir", str(out)])
