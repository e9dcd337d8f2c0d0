"""Hostile inputs and user mistakes in the stage 1/2 data tools (issue 20): a bad character, a cut image, a
forgotten flag or a wrong path costs one counted reject or one line of error, never the dataset or a traceback."""

from __future__ import annotations

import base64
import io
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_process import common, convert, process_llava, process_synthdog
from data_process import filter as data_filter
from tests import data_fixtures as fx

REPO = Path(__file__).resolve().parents[1]
RECAP = "lmms-lab/LLaVA-ReCap-558K"
QUIET = ["--no_progress"]


def summary(out: Path, name: str) -> dict:
    return json.loads((out / "_stats" / name / "summary.json").read_text())


def rejects(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for path in sorted((out / "_stats" / name).glob("*.rejects.jsonl"))
            for line in path.read_text(encoding="utf-8").splitlines()]


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".partial" in p.name)


def error_lines(text: str) -> list[str]:
    """stderr of a failed command: only 'error:'/'warning:' lines, and no traceback."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and "Traceback" not in text, text
    assert all(line.startswith(("error:", "warning:")) for line in lines), text
    return lines


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i}.jpg").write_bytes(fx.jpeg_bytes(40 + i, 32, seed=i))
    return folder


def llava_record(i: int, answer: str = "A small picture.") -> dict:
    return {"id": f"r{i}", "image": f"{i}.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": answer}]}


def jsonl_with_bad_text(path: Path) -> Path:
    """8 LLaVA JSONL lines: line 2 holds a raw 0xFF byte, line 5 a lone surrogate escape (valid JSON)."""
    lines = [json.dumps(llava_record(i)).encode() for i in range(8)]
    lines[2] = json.dumps(llava_record(2, "caf@")).encode().replace(b"caf@", b"caf\xff")  # a Latin-1 "é" gone wrong
    lines[5] = json.dumps(llava_record(5, "half an emoji \ud83d")).encode()  # json escapes it as \ud83d
    assert b"\\ud83d" in lines[5]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# ----------------------------------------------------------------------------------------------- bad characters

@pytest.mark.parametrize("processes", ["1", "2"])
def test_bad_utf8_and_lone_surrogate_lines_are_counted_rejects(tmp_path, images, processes):
    source = jsonl_with_bad_text(tmp_path / "llava.jsonl")
    out = tmp_path / "out"
    code = convert.main(["llava-to-parquet", str(source), "--image-roots", str(images), "--name", "mine",
                         "--output_dir", str(out), "--rows_per_shard", "3", "--num_processes", processes, *QUIET])
    assert code == 0
    stats = summary(out, "mine")
    assert stats["kept"] == 6 and stats["rejected"] == {"bad_unicode": 1, "bad_utf8": 1}
    by_reason = {r["reason"]: r for r in rejects(out, "mine")}
    assert by_reason["bad_utf8"]["row"] == 2 and by_reason["bad_unicode"]["row"] == 5
    assert by_reason["bad_unicode"]["id"] == "r5"
    answers = [row["messages"][1]["content"] for row in pq.read_table(out / "mine").to_pylist()]
    assert answers == ["A small picture."] * 6
    assert leftovers(out) == []


def test_bad_byte_inside_a_json_array_rejects_only_its_record(tmp_path, images):
    records = [llava_record(i) for i in range(6)]
    records[1]["conversations"][1]["value"] = "na@ve"
    records[4]["conversations"][1]["value"] = "lone \udc00 surrogate"
    text = json.dumps(records, indent=1).encode()
    assert b"\\udc00" in text
    source = tmp_path / "llava.json"
    source.write_bytes(text.replace(b"na@ve", b"na\xefve"))  # cp1252 "ï" in a UTF-8 file
    out = tmp_path / "out"
    assert convert.main(["llava-to-parquet", str(source), "--image-roots", str(images), "--name", "arr",
                         "--output_dir", str(out), "--rows_per_shard", "2", *QUIET]) == 0
    stats = summary(out, "arr")
    assert stats["kept"] == 4 and stats["rejected"] == {"bad_unicode": 1, "bad_utf8": 1}
    assert sorted((r["row"], r["id"], r["reason"]) for r in rejects(out, "arr")) == [
        (1, "r1", "bad_utf8"), (4, "r4", "bad_unicode")]


def test_bad_byte_in_mmbench_tsv_is_a_counted_reject(tmp_path):
    image = base64.b64encode(fx.jpeg_bytes(32, 32, seed=1)).decode()
    header = "index\tquestion\thint\tA\tB\tanswer\timage\n"
    rows = [f"{i}\tWhich colour?\t\tred\tblue\tA\t{image}\n".encode() for i in range(3)]
    rows[1] = rows[1].replace(b"Which colour?", b"Which col\xf6ur?")
    source = tmp_path / "MMBench_DEV_EN.tsv"
    source.write_bytes(header.encode() + b"".join(rows))
    out = tmp_path / "out"
    assert convert.main(["mmbench-to-parquet", str(source), "--name", "mmb", "--output_dir", str(out), *QUIET]) == 0
    assert summary(out, "mmb")["rejected"] == {"bad_utf8": 1} and summary(out, "mmb")["kept"] == 2


def _patch_file(path: Path, marker: bytes, replacement: bytes) -> None:
    """Overwrite ``marker`` (same length) in an uncompressed parquet file: text a broken writer produced."""
    assert len(marker) == len(replacement)
    data = path.read_bytes()
    assert data.count(marker) == 1
    path.write_bytes(data.replace(marker, replacement))


def test_invalid_utf8_in_a_hub_parquet_is_a_counted_reject(tmp_path):
    rows, expected = fx.recap_rows(num_good=6)
    rows[3]["conversations"] = [{"from": "human", "value": "<image>\nWhat is it?"},
                                {"from": "gpt", "value": "MARKER-1234"}]
    path = tmp_path / "recap" / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    table = datasets.Dataset.from_list(rows, features=fx.hub_features("recap")).data.table
    pq.write_table(table, path, compression="none", use_dictionary=False, write_statistics=False)
    _patch_file(path, b"MARKER-1234", b"bad \xc3\x28 text")
    out = tmp_path / "out"
    assert process_llava.main(["--datasets", RECAP, "--source", f"{RECAP}={tmp_path / 'recap'}",
                               "--output_dir", str(out), "--rows_per_shard", "4", "--num_processes", "1",
                               *QUIET]) == 0
    stats = summary(out, "LLaVA_ReCap_558K")
    assert stats["rejected"] == {**expected, "bad_utf8": 1}
    assert stats["rows_in"] == len(rows) == stats["kept"] + sum(stats["rejected"].values())
    bad = [r for r in rejects(out, "LLaVA_ReCap_558K") if r["reason"] == "bad_utf8"]
    assert [(r["row"], r["id"]) for r in bad] == [(3, "good-3")] and "conversations" in bad[0]["detail"]


def test_lone_surrogate_inside_synthdog_ground_truth_is_a_counted_reject(tmp_path):
    """The ground truth is JSON inside a (valid UTF-8) parquet string: its escapes are decoded only there."""
    rows, expected = fx.synthdog_rows(num_good=4)
    rows[1]["ground_truth"] = json.dumps({"gt_parse": {"text_sequence": "OCR \udfff text"}})
    assert "\\udfff" in rows[1]["ground_truth"]
    repo = fx.make_synthdog_repo(tmp_path / "synthdog-en", rows)
    out = tmp_path / "out"
    assert process_synthdog.main(["--languages", "en", "--source", f"naver-clova-ix/synthdog-en={repo}",
                                  "--output_dir", str(out), "--num_processes", "1", *QUIET]) == 0
    assert summary(out, "synthdog_en")["rejected"] == {**expected, "bad_unicode": 1}
    assert summary(out, "synthdog_en")["kept"] == 3


def test_filter_counts_a_row_with_invalid_utf8_and_keeps_the_rest(tmp_path):
    texts = ["A long enough caption number one.", "MARKER-ABCDEFGHIJKLMNOPQRSTUVWXYZ.", "A third fine caption here."]
    table = common.output_table([[{"role": "user", "content": "<image>\nDescribe."},
                                  {"role": "assistant", "content": t}] for t in texts],
                                pa.array([fx.jpeg_bytes(40, 40, seed=i) for i in range(3)]))
    shards = tmp_path / "in"
    shards.mkdir()
    path = shards / "x-00000.parquet"
    pq.write_table(table, path, compression="none", use_dictionary=False, write_statistics=False)
    _patch_file(path, b"MARKER-ABCD", b"MARKER-\xff\xfe\xfd\xfc")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("text_scope: assistant\nprocess:\n  - text_length_filter: {min_len: 5}\n")
    assert data_filter.main(["--input", str(shards), "--recipe", str(recipe), "--output_dir", str(tmp_path / "o"),
                             "--name", "f", "--num_processes", "1", "--no_progress"]) == 0
    stats = json.loads((tmp_path / "o" / "_stats" / "f" / "filter_summary.json").read_text())
    assert stats["rows_in"] == 3 and stats["kept"] == 2 and stats["unreadable"] == {"bad_utf8": 1}
    removed = [json.loads(line) for line in (tmp_path / "o" / "_stats" / "f" / "filter_removed.jsonl").open()]
    assert [(r["row"], r["op"], r["reason"]) for r in removed] == [(1, "input", "bad_utf8")]


# ----------------------------------------------------------------------------------------------- cut images

def _other_formats() -> dict[str, bytes]:
    photo = Image.open(io.BytesIO(fx.jpeg_bytes(96, 64, seed=11)))
    return {"gif": fx.encoded(photo, "GIF"), "bmp": fx.encoded(photo, "BMP"), "tiff": fx.encoded(photo, "TIFF"),
            "tiff_lzw": fx.encoded(photo, "TIFF", compression="tiff_lzw"), "webp": fx.encoded(photo, "WEBP")}


@pytest.mark.parametrize("name", sorted(_other_formats()))
def test_image_cut_in_half_is_rejected_as_truncated_by_the_default_check(name):
    data = _other_formats()[name]
    assert common.ImagePolicy().prepare(data) == (data, False)  # the intact file is kept as it is
    for cut in (data[:len(data) // 2], data[:-8]):
        with pytest.raises(common.Reject) as info:
            common.ImagePolicy().prepare(memoryview(cut))
        assert info.value.reason == "image_truncated"


# ----------------------------------------------------------------------------------------------- empty answers

def test_empty_or_blank_answer_is_a_counted_reject(tmp_path, images):
    blank_second_answer = [*llava_record(3)["conversations"], {"from": "human", "value": "More?"},
                           {"from": "gpt", "value": " "}]
    records = [llava_record(0), llava_record(1, ""), llava_record(2, "  \n\t"),
               {**llava_record(3), "conversations": blank_second_answer}]
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(records))
    out = tmp_path / "out"
    assert convert.main(["llava-to-parquet", str(source), "--image-roots", str(images), "--name", "e",
                         "--output_dir", str(out), *QUIET]) == 0
    assert summary(out, "e")["rejected"] == {"empty_answer": 3} and summary(out, "e")["kept"] == 1
    dj = tmp_path / "dj.jsonl"
    dj.write_text(json.dumps({"id": "c", "images": ["0.jpg"], "text": "<__dj__image>  <|__dj__eoc|>"}) + "\n")
    assert convert.main(["dj-to-parquet", str(dj), "--image-roots", str(images), "--name", "dj",
                         "--output_dir", str(out), *QUIET]) == 1  # nothing kept at all: see the next test
    assert summary(out, "dj")["rejected"] == {"empty_answer": 1}


# ----------------------------------------------------------------------------------------------- nothing kept

def test_forgotten_image_roots_fails_loudly_and_says_what_to_pass(tmp_path, images, monkeypatch, capsys):
    monkeypatch.delenv(common.IMAGE_ROOTS_ENV, raising=False)
    source = tmp_path / "llava.jsonl"
    source.write_text("".join(json.dumps(llava_record(i)) + "\n" for i in range(8)))
    out = tmp_path / "out"
    code = convert.main(["llava-to-parquet", str(source), "--name", "noroots", "--output_dir", str(out), *QUIET])
    err = capsys.readouterr().err
    assert code == 1
    assert any("kept 0 of 8" in line and "image_path_outside_roots" in line for line in error_lines(err))
    assert "--image_roots" in err and common.IMAGE_ROOTS_ENV in err
    assert summary(out, "noroots")["rejected"] == {"image_path_outside_roots": 8}  # still counted and logged
    # with the roots it goes through, on the same output folder
    assert convert.main(["llava-to-parquet", str(source), "--image-roots", str(images), "--name", "noroots",
                         "--output_dir", str(out), "--overwrite", *QUIET]) == 0


def test_empty_input_file_is_an_error(tmp_path, images, capsys):
    source = tmp_path / "empty.jsonl"
    source.write_text("\n")
    assert convert.main(["llava-to-parquet", str(source), "--image_roots", str(images), "--name", "empty",
                         "--output_dir", str(tmp_path / "out"), *QUIET]) == 1
    assert any("no input rows in" in line and "empty.jsonl" in line for line in error_lines(capsys.readouterr().err))


def test_one_reason_rejecting_most_rows_is_a_warning(tmp_path, images, capsys):
    source = tmp_path / "llava.jsonl"
    records = [llava_record(i) for i in range(8)]
    for record in records[1:]:
        record["image"] = "elsewhere/" + record["image"]
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert convert.main(["llava-to-parquet", str(source), "--image-roots", str(images), "--name", "most",
                         "--output_dir", str(tmp_path / "out"), *QUIET]) == 0
    warnings = [line for line in error_lines(capsys.readouterr().err) if line.startswith("warning:")]
    assert len(warnings) == 1 and "7 of 8" in warnings[0] and "image_not_found" in warnings[0]


def test_filter_that_removes_every_row_fails_loudly(tmp_path, capsys):
    shards = tmp_path / "in"
    writer = common.ShardWriter(str(shards / "x-00000.parquet"), str(tmp_path / "tmp"))
    for i in range(3):
        writer.add([{"role": "user", "content": "<image>\nQ"}, {"role": "assistant", "content": "short"}],
                   [fx.jpeg_bytes(40, 40, seed=i)])
    writer.commit()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("process:\n  - text_length_filter: {min_len: 1000}\n")
    code = data_filter.main(["--input", str(shards), "--recipe", str(recipe), "--output_dir", str(tmp_path / "o"),
                             "--name", "none", "--num_processes", "1", "--no_progress"])
    assert code == 1
    assert any("kept 0 of 3" in line and "text_length_filter" in line
               for line in error_lines(capsys.readouterr().err))


# ----------------------------------------------------------------------------------------------- wrong paths

def test_wrong_paths_give_one_line_errors(tmp_path, images, capsys):
    source = tmp_path / "llava.jsonl"
    source.write_text(json.dumps(llava_record(0)) + "\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    not_parquet = tmp_path / "shards.parquet"
    not_parquet.write_text("this is not parquet")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("process:\n  - text_length_filter: {}\n")
    roots = ["--image-roots", str(images)]
    cases = [
        (convert.main, ["llava-to-parquet", str(tmp_path / "missing.jsonl"), "--name", "x", *roots], "missing.jsonl"),
        (convert.main, ["llava-to-parquet", str(source), "--name", "x", "--output_dir", str(a_file / "out"), *roots,
                        "--num_processes", "1", *QUIET], "a_file"),
        (convert.main, ["llava-to-parquet", str(source), "--name", "x", "--output_dir", str(a_file / "out"), *roots,
                        "--num_processes", "2", *QUIET], "a_file"),
        (convert.main, ["llava-to-dj", str(source), "--output", str(a_file / "x.jsonl")], "a_file"),
        (convert.main, ["parquet-to-llava", str(not_parquet), "--output", str(tmp_path / "x.json"),
                        "--image_folder", str(tmp_path / "img")], "shards.parquet"),
        (convert.main, ["llava-to-parquet", str(tmp_path), "--name", "x", *roots, *QUIET], str(tmp_path)),
        (data_filter.main, ["--input", str(tmp_path / "missing"), "--name", "x", "--output_dir", str(tmp_path)],
         "missing"),
        (data_filter.main, ["--input", str(not_parquet), "--name", "x", "--output_dir", str(tmp_path)],
         "shards.parquet"),
        (data_filter.main, ["--input", str(tmp_path / "missing"), "--name", "x", "--output_dir", str(tmp_path),
                            "--recipe", str(tmp_path / "no_recipe.yaml")], "no_recipe.yaml"),
        (process_llava.main, ["--datasets", RECAP, "--source", f"{RECAP}={images}", "--output_dir",
                              str(a_file / "out"), *QUIET], "LLaVA_ReCap_558K"),
    ]
    for main, argv, named in cases:
        assert main(argv) != 0, argv
        lines = error_lines(capsys.readouterr().err)
        assert named in lines[0], (argv, lines)


def test_read_only_output_folder_is_one_line_error(tmp_path, images):
    """A folder the command may not write to. Root may write anywhere: run it without that capability."""
    source = tmp_path / "llava.jsonl"
    source.write_text(json.dumps(llava_record(0)) + "\n")
    read_only = tmp_path / "out"
    read_only.mkdir()
    read_only.chmod(0o555)
    no_override = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv in (["llava-to-parquet", str(source), "--name", "x", "--output_dir", str(read_only),
                  "--image-roots", str(images), "--num_processes", "1", "--no_progress"],
                 ["llava-to-dj", str(source), "--output", str(read_only / "x.jsonl")]):
        result = subprocess.run([*no_override, sys.executable, str(REPO / "data_process" / "convert.py"), *argv],
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr
        assert "Permission denied" in error_lines(result.stderr)[0]
        assert os.listdir(read_only) == []


@pytest.mark.parametrize("processes", ["1", "2"])
def test_disk_full_mid_shard_is_one_line_and_leaves_no_partial_files(tmp_path, processes):
    """The write fails part-way (RLIMIT_FSIZE: the kernel refuses to grow a file past 64 KB, as a full disk would)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        (images / f"{i}.jpg").write_bytes(fx.jpeg_bytes(320, 240, seed=i, quality=95))
    source = tmp_path / "llava.jsonl"
    source.write_text("".join(json.dumps(llava_record(i)) + "\n" for i in range(8)))

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "data_process" / "convert.py"), "llava-to-parquet",
                             str(source), "--image_roots", str(images), "--name", "full", "--output_dir", str(out),
                             "--rows_per_shard", "4", "--num_processes", processes, "--no_progress"],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=120, preexec_fn=limit_file_size)
    assert result.returncode == 1
    assert "File too large" in error_lines(result.stderr)[0]
    assert leftovers(out) == [] and not (out / "full").exists()
