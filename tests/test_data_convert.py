"""Converters: LLaVA JSON(L) / Data-Juicer JSONL / MMBench TSV <-> our parquet, with round trips."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import datasets
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_process import convert
from data_process.formats import dj_to_llava, llava_to_dj
from data_process.sources import iter_json_records
from tests import data_fixtures as fx

QUIET = ["--no_progress", "--num_processes", "1"]
DJ_DEMO = fx.SHARED_FIXTURES / "data-juicer-demo"


def table_rows(folder: Path) -> list[dict]:
    return pq.read_table(folder).to_pylist()


def summary(out: Path, name: str) -> dict:
    return json.loads((out / "_stats" / name / "summary.json").read_text())


@pytest.fixture()
def llava_json(tmp_path):
    """A LLaVA JSON file + image folder with every path case."""
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True)
    (images / "coco" / "a.jpg").write_bytes(fx.jpeg_bytes(64, 48, seed=1))
    (images / "b.png").write_bytes(fx.png_bytes())
    (tmp_path / "outside.png").write_bytes(fx.png_bytes())
    ok = [{"from": "human", "value": "<image>\nWhat is it? 中文"}, {"from": "gpt", "value": "A picture."}]
    records = [
        {"id": 1, "image": "coco/a.jpg", "conversations": ok},
        {"id": "2", "image": "b.png", "conversations": [{"from": "human", "value": "Summarise.\n<image>"},
                                                       {"from": "gpt", "value": "Red."}]},
        {"id": "3", "image": "b.png", "conversations": ok[:1]},
        {"id": "4", "image": "../outside.png", "conversations": ok},
        {"id": "5", "image": str(tmp_path / "outside.png"), "conversations": ok},
        {"id": "6", "image": "coco/missing.jpg", "conversations": ok},
        {"id": "7", "conversations": ok},
        {"id": "8", "image": "coco/a.jpg", "conversations": [{"from": "human", "value": 5}, ok[1]]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path, images, records


def test_json_array_reader_offsets(llava_json):
    path, _, records = llava_json
    parsed = list(iter_json_records(str(path), "json"))
    assert [r for _, r in parsed] == records
    for offset, record in parsed[3:]:  # restart from any record's byte offset
        assert next(iter_json_records(str(path), "json", offset))[1] == record


@pytest.mark.parametrize("rows_per_shard", ["2", "100"])
def test_llava_json_to_parquet(llava_json, tmp_path, rows_per_shard):
    path, images, _ = llava_json
    out = tmp_path / "out"
    code = convert.main(["llava-to-parquet", str(path), "--image-roots", str(images), "--name", "mine",
                         "--output_dir", str(out), "--rows_per_shard", rows_per_shard, *QUIET])
    assert code == 0
    stats = summary(out, "mine")
    assert stats["kept"] == 2
    assert stats["rejected"] == {"odd_turn_count": 1, "image_path_outside_roots": 2, "image_not_found": 1,
                                 "image_missing": 1, "malformed_turn": 1}
    rows = table_rows(out / "mine")
    assert rows[0]["images"][0]["bytes"] == (images / "coco" / "a.jpg").read_bytes()
    assert rows[1]["messages"][0]["content"] == "<image>\nSummarise."
    loaded = datasets.load_dataset("parquet", data_dir=str(out / "mine"), split="train")
    assert loaded[0]["images"][0].size == (64, 48)


def test_image_roots_from_environment(llava_json, tmp_path, monkeypatch):
    path, images, _ = llava_json
    monkeypatch.setenv("QWEN_MERGE_IMAGE_ROOTS", str(images))
    out = tmp_path / "out"
    assert convert.main(["llava-to-parquet", str(path), "--name", "env", "--output_dir", str(out), *QUIET]) == 0
    assert summary(out, "env")["kept"] == 2


def test_parquet_llava_dj_round_trips(llava_json, tmp_path):
    path, images, _ = llava_json
    out = tmp_path / "out"
    assert convert.main(["llava-to-parquet", str(path), "--image-roots", str(images), "--name", "first",
                         "--output_dir", str(out), *QUIET]) == 0
    exported, folder = tmp_path / "export.json", tmp_path / "exported_images"
    assert convert.main(["parquet-to-llava", str(out / "first"), "--output", str(exported),
                         "--image_folder", str(folder)]) == 0
    dj_file, back = tmp_path / "export.jsonl", tmp_path / "back.json"
    assert convert.main(["llava-to-dj", str(exported), "--output", str(dj_file)]) == 0
    assert "<__dj__image>" in dj_file.read_text() and "<|__dj__eoc|>" in dj_file.read_text()
    assert convert.main(["dj-to-llava", str(dj_file), "--output", str(back)]) == 0
    assert json.loads(back.read_text()) == json.loads(exported.read_text())
    # DJ -> parquet again: same messages and the very same image bytes
    assert convert.main(["dj-to-parquet", str(dj_file), "--image-roots", str(folder), "--name", "again",
                         "--output_dir", str(out), *QUIET]) == 0
    assert table_rows(out / "again") == table_rows(out / "first")
    dj_direct = tmp_path / "direct.jsonl"
    assert convert.main(["parquet-to-dj", str(out / "first"), "--output", str(dj_direct),
                         "--image_folder", str(folder)]) == 0
    assert dj_direct.read_text() == dj_file.read_text()


def test_dj_record_forms():
    record = {"id": "9", "images": ["x.jpg"], "text": "[[human]]: <__dj__image>\nQ1\n[[gpt]]: A1\n[[human]]: Q2\n"
                                                         "[[gpt]]: A2 <|__dj__eoc|>"}
    llava = dj_to_llava(record)
    assert llava["conversations"][0]["value"] == "<image>\nQ1" and llava["conversations"][3]["value"] == "A2"
    assert llava_to_dj(llava) == record
    caption = dj_to_llava({"id": "c", "images": ["x.jpg"], "text": "<__dj__image> A bus. <|__dj__eoc|>"},
                          questions={"c": "<image>\nOriginal question?"})
    assert caption["conversations"] == [{"from": "human", "value": "<image>\nOriginal question?"},
                                        {"from": "gpt", "value": "A bus."}]
    custom = llava_to_dj(llava, convert.DjTokens(image="<image>", eoc="<eoc>"))
    assert custom["text"].startswith("[[human]]: <image>\n") and custom["text"].endswith(" <eoc>")


@pytest.mark.skipif(not DJ_DEMO.is_dir(), reason="shared Data-Juicer demo fixtures are absent")
def test_data_juicer_demo_to_parquet(tmp_path):
    demo = tmp_path / "dj"
    shutil.copytree(DJ_DEMO, demo)
    source = demo / "demos" / "data" / "demo-dataset-images.jsonl"
    out = tmp_path / "out"
    assert convert.main(["dj-to-parquet", str(source), "--image-roots", str(demo / "tests"), "--name", "dj",
                         "--output_dir", str(out), *QUIET]) == 0
    rows = table_rows(out / "dj")
    assert len(rows) == sum(1 for line in source.read_text().splitlines() if line.strip())
    assert rows[1]["messages"][1]["content"] == "A bus."
    assert rows[1]["images"][0]["bytes"] == (demo / "tests" / "ops" / "data" / "img2.jpg").read_bytes()
    # the same file with only demos/ declared: the ../../tests paths escape the root, nothing is kept
    assert convert.main(["dj-to-parquet", str(source), "--image-roots", str(demo / "demos"), "--name", "esc",
                         "--output_dir", str(out), *QUIET]) == 1
    assert summary(out, "esc")["rejected"] == {"image_path_outside_roots": len(rows)}


def test_mmbench_tsv_to_parquet(tmp_path):
    image = base64.b64encode(fx.jpeg_bytes(48, 48, seed=5)).decode()
    rows = [
        {"index": 0, "question": "What colour?", "hint": float("nan"), "A": "red", "B": "blue", "C": float("nan"),
         "D": float("nan"), "answer": "A", "category": "c", "image": image, "l2-category": "x", "split": "dev"},
        {"index": 1000000, "question": "What colour?", "hint": "Look closely.", "A": "blue", "B": "red",
         "C": float("nan"), "D": float("nan"), "answer": "B", "category": "c", "image": "0", "l2-category": "x",
         "split": "dev"},
        {"index": 2, "question": "这是什么颜色？", "hint": float("nan"), "A": "红", "B": "蓝", "C": "绿", "D": "黄",
         "answer": "A", "category": "c", "image": image, "l2-category": "x", "split": "dev"},
        {"index": 3, "question": "Q?", "hint": float("nan"), "A": "a", "B": "b", "C": float("nan"),
         "D": float("nan"), "answer": float("nan"), "category": "c", "image": image, "l2-category": "x",
         "split": "dev"},
        {"index": 4, "question": "Q?", "hint": float("nan"), "A": "a", "B": "b", "C": float("nan"),
         "D": float("nan"), "answer": "A", "category": "c", "image": "77", "l2-category": "x", "split": "dev"},
    ]
    tsv = tmp_path / "MMBench_DEV_EN.tsv"
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    out = tmp_path / "out"
    assert convert.main(["mmbench-to-parquet", str(tsv), "--name", "mmb", "--output_dir", str(out), *QUIET]) == 0
    assert summary(out, "mmb")["rejected"] == {"answer_missing": 1, "image_missing": 1}
    kept = table_rows(out / "mmb")
    assert kept[1]["messages"] == [
        {"role": "user", "content": "<image>\nLook closely.\nWhat colour?\nA. blue\nB. red\n"
                                    "Answer with the option's letter from the given choices directly."},
        {"role": "assistant", "content": "B"}]
    assert kept[1]["images"] == kept[0]["images"]
    assert kept[2]["messages"][0]["content"].endswith("请直接回答选项字母。")
