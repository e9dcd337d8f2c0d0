"""The YAML-driven filter/dedup step over our parquet shards."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from data_process import common
from data_process import filter as data_filter
from data_process.filter_ops import CharacterRepetitionFilter, Sample, WordsNumFilter, parse_binary_size
from tests import data_fixtures as fx

DJ_DEMO = fx.SHARED_FIXTURES / "data-juicer-demo"
LONG = ("The quick brown fox jumps over the lazy dog near the river bank while the children watch from "
        "the old wooden bridge and the sun sets slowly behind the distant hills")


def write_shards(folder: Path, rows: list[tuple[str, bytes]], per_shard: int = 4) -> Path:
    """Our parquet shards from (answer text, image bytes) rows."""
    for start in range(0, len(rows), per_shard):
        index = start // per_shard
        writer = common.ShardWriter(str(folder / f"x-{index:05d}.parquet"), str(folder.parent / f"tmp{index}"),
                                    rows_per_row_group=2)
        for text, image in rows[start:start + per_shard]:
            writer.add([{"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": text}],
                       [image])
        writer.commit()
    return folder


def write_recipe(path: Path, ops: list[dict], text_scope: str = "assistant") -> Path:
    path.write_text(yaml.safe_dump({"text_scope": text_scope, "process": ops}))
    return path


def rescaled_jpeg(data: bytes, scale: float) -> bytes:
    image = Image.open(io.BytesIO(data))
    buffer = io.BytesIO()
    image.resize((int(image.width * scale), int(image.height * scale))).save(buffer, "JPEG", quality=70)
    return buffer.getvalue()


def run(tmp_path: Path, shards: Path, recipe: Path, processes: int = 1, name: str = "out") -> dict:
    code = data_filter.main(["--input", str(shards), "--recipe", str(recipe), "--output_dir", str(tmp_path / "o"),
                             "--name", name, "--num_processes", str(processes), "--no_progress"])
    assert code == 0
    return json.loads((tmp_path / "o" / "_stats" / name / "filter_summary.json").read_text())


def removed_by_op(summary: dict) -> dict:
    return {op["op"]: op["removed"] for op in summary["ops"]}


def test_every_op_counts(tmp_path):
    photo = fx.jpeg_bytes(256, 192, seed=3)
    other = fx.jpeg_bytes(256, 192, seed=4)
    rows = [
        (LONG, photo),                                   # kept
        ("short", fx.jpeg_bytes(200, 200, seed=5)),      # text_length_filter
        ("buy now " * 12, fx.jpeg_bytes(200, 200, seed=6)),  # character repetition
        ("$$$ ### %%% !!! 123 456 ??? *** &&& ((( )))", fx.jpeg_bytes(200, 200, seed=7)),  # special characters
        ("A perfectly fine caption about a picture with words.", fx.jpeg_bytes(20, 20, seed=8)),  # image shape
        ("Another perfectly fine caption about a very wide picture.", fx.jpeg_bytes(400, 50, seed=9)),  # aspect
        (LONG, other),                                   # exact text duplicate
        (LONG.replace("lazy", "sleepy"), fx.jpeg_bytes(210, 200, seed=10)),  # near-duplicate text
        ("A different caption that shares the first photo's bytes exactly here.", photo),  # image duplicate
        ("Yet another caption for a re-encoded smaller copy of the photo here.", rescaled_jpeg(photo, 0.5)),  # phash
        ("A final fine caption describing something else entirely new.", other),  # kept: its twin went earlier
    ]
    shards = write_shards(tmp_path / "in", rows)
    recipe = write_recipe(tmp_path / "r.yaml", [
        {"text_length_filter": {"min_len": 10}},
        {"character_repetition_filter": {"rep_len": 10, "max_ratio": 0.2}},
        {"special_characters_filter": {"max_ratio": 0.5}},
        {"image_shape_filter": {"min_width": 28, "min_height": 28}},
        {"image_aspect_ratio_filter": {}},
        {"document_deduplicator": {}},
        {"document_minhash_deduplicator": {"jaccard_threshold": 0.7}},
        {"image_deduplicator": {"method": "md5"}},
        {"image_deduplicator": {"method": "phash", "hamming_distance": 4}},
    ])
    summary = run(tmp_path, shards, recipe)
    assert [op["removed"] for op in summary["ops"]] == [1] * len(summary["ops"])
    assert summary["kept"] == 2 and summary["rows_in"] == len(rows)
    assert all(op["rows_in"] == op["removed"] + op["kept"] for op in summary["ops"])
    kept = pq.read_table(tmp_path / "o" / "out").to_pylist()
    assert kept[0]["messages"][1]["content"] == LONG and kept[0]["images"][0]["bytes"] == photo
    removed = [json.loads(line) for line in (tmp_path / "o" / "_stats" / "out" / "filter_removed.jsonl").open()]
    assert {"file": "x-00001.parquet", "row": 2, "op": "document_deduplicator",
            "detail": "duplicate of x-00000.parquet:0"} in removed
    # shards keep their names; the dataset_info entry points at the folder
    assert sorted(p.name for p in (tmp_path / "o" / "out").iterdir()) == ["x-00000.parquet", "x-00002.parquet"]
    assert "out" in json.loads((tmp_path / "o" / "dataset_info.json").read_text())
    # the same decisions with worker processes
    parallel = run(tmp_path, shards, recipe, processes=2, name="out2")
    assert parallel["ops"] == summary["ops"]


def test_recipe_errors(tmp_path):
    shards = write_shards(tmp_path / "in", [(LONG, fx.jpeg_bytes())])
    for ops, message in [([{"no_such_filter": {}}], "unknown op"),
                         ([{"text_length_filter": {"min_length": 3}}], "min_length"),
                         ([{"image_size_filter": {"max_size": "3 parsecs"}}], "bad size")]:
        recipe = write_recipe(tmp_path / "bad.yaml", ops)
        with pytest.raises(data_filter.SourceError, match=message):
            data_filter.run_filter(str(shards), str(recipe), str(tmp_path / "o"), "x", progress=False)


def test_default_recipe_loads():
    text_scope, ops = data_filter.load_recipe(data_filter.DEFAULT_RECIPE)
    assert text_scope == "all" and len(ops) == 10


def test_parse_size_uses_binary_units():
    assert parse_binary_size("1KB") == 1024 and parse_binary_size("2MB") == 2 << 20 and parse_binary_size(0) == 0
    assert parse_binary_size("1.5 GiB") == 3 << 29 and parse_binary_size("1TB") == 1 << 40
    with pytest.raises(ValueError, match="bad size"):
        parse_binary_size("3 parsecs")


def test_word_and_repetition_stats_match_data_juicer():
    sample = Sample([{"role": "assistant", "content": "这是 一个 test 句子"}], [])
    assert WordsNumFilter(lang="zh").stat(sample) == 7
    assert WordsNumFilter(lang="en").stat(sample) == 4
    assert CharacterRepetitionFilter(rep_len=2).stat(Sample([{"role": "user", "content": "abababab"}], [])) == 4 / 7


@pytest.mark.skipif(not DJ_DEMO.is_dir(), reason="shared Data-Juicer demo fixtures are absent")
def test_data_juicer_demo_duplicates(tmp_path):
    images = sorted((DJ_DEMO / "tests" / "ops" / "data").glob("img*"))
    digests = [hashlib.md5(p.read_bytes()).hexdigest() for p in images]
    texts = [json.loads(line)["text"] for line in
             (DJ_DEMO / "demos" / "data" / "demo-dataset-deduplication.jsonl").read_text().splitlines()]
    rows = [(texts[i], images[i % len(images)].read_bytes()) for i in range(len(texts))]
    shards = write_shards(tmp_path / "in", rows, per_shard=5)
    recipe = write_recipe(tmp_path / "r.yaml", [{"document_deduplicator": {}},
                                                {"document_minhash_deduplicator": {}}])
    summary = run(tmp_path, shards, recipe)
    assert removed_by_op(summary)["document_deduplicator"] == len(texts) - len(set(texts))
    assert removed_by_op(summary)["document_minhash_deduplicator"] >= 1  # "plants ... pig" variant
    only_images = write_shards(tmp_path / "img", [(f"caption {i}", p.read_bytes()) for i, p in enumerate(images)])
    summary = run(tmp_path, only_images, write_recipe(tmp_path / "i.yaml", [{"image_deduplicator": {}}]),
                  name="imgs")
    assert summary["kept"] == len(set(digests)) == len(images) - 4  # img4..img7 repeat img1..img3
