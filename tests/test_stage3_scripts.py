"""The stage-3 scripts as a user meets them, without a model server: inputs in the real layouts, user mistakes
(wrong paths, bad bytes), the names ``--exclude`` matches, what reaches the training targets, and the length
policy (rows longer than the stage-3 ``cutoff_len`` are dropped at conversion and counted as ``too_long``)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from data_process.common import OUTPUT_SCHEMA
from tests.distill_fixtures import alpaca_zh_records, write_alpaca_copy, write_deepseek_copy

REPO = Path(__file__).resolve().parent.parent
STAGE3 = REPO / "data_process" / "stage3"
SCRIPTS = ("text2image/process.py", "text2image/evaluate.py", "text2image/convert.py", "image/process.py",
           "image/evaluate.py")


def run(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STAGE3 / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})


def png(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def onevision_file(path: Path, question: str = "What colour is it?") -> Path:
    rows = [{"messages": [{"role": "user", "content": f"<image>\n{question}"},
                          {"role": "assistant", "content": "Red."}],
             "images": [{"bytes": png(64, 48), "path": None}]}]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), path)
    return path


# ----------------------------------------------------------------------------------------------- help, paths

def test_scripts_show_help_without_a_server():
    for rel in SCRIPTS:
        proc = run(rel, "--help", timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert ("--input_pattern" if rel.endswith("convert.py") else "--api_ips") in proc.stdout


@pytest.mark.parametrize("script, args, named", [
    ("text2image/process.py", ["--model", "m", "--deepseek_dataset", "/no/such/distill_r1_110k.jsonl",
                               "--alpaca_dataset", "none"], "/no/such/distill_r1_110k.jsonl"),
    ("text2image/process.py", ["--model", "m", "--deepseek_dataset", "./no_such_folder", "--alpaca_dataset", "none"],
     "./no_such_folder"),
    ("text2image/evaluate.py", ["--model", "m", "--input_file", "/no/such/generated.json"], "/no/such/generated.json"),
    ("text2image/convert.py", ["--input_files", "/no/such/judged.json", "--output_file", "{tmp}/t2i"],
     "/no/such/judged.json"),
    ("text2image/convert.py", ["--input_pattern", "/no/such/*.json", "--output_file", "{tmp}/t2i"], "/no/such/*.json"),
    ("image/process.py", ["--data_dir", "/no/such/llavaonevision_converted"], "/no/such/llavaonevision_converted"),
    ("image/evaluate.py", ["--input_file", "/no/such/glm_response.parquet"], "/no/such/glm_response.parquet"),
    ("text2image/convert.py", ["--input_files", "{judged}", "--output_file", "{file}/t2i.parquet"], "{file}"),
])
def test_wrong_paths_are_one_line_errors_naming_the_path(script, args, named, tmp_path):
    judged = tmp_path / "judged.json"
    judged.write_text("[]")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    fill = {"{tmp}": str(tmp_path), "{judged}": str(judged), "{file}": str(a_file)}
    for key, value in fill.items():
        args = [arg.replace(key, value) for arg in args]
        named = named.replace(key, value)
    server = [] if "convert" in script else ["--api_ips", "http://127.0.0.1:9/v1"]
    proc = run(script, *args, *server, "--log_level", "ERROR")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode not in (0, None) and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], proc.stderr


# ----------------------------------------------------------------------------------------------- inputs

def test_exclude_matches_source_names_case_insensitively(tmp_path):
    from data_process.stage3.image.process import discover_sources

    root = tmp_path / "llavaonevision_converted"
    onevision_file(root / "LLaVA_ReCap_CC3M.parquet")
    for shard in range(2):
        onevision_file(root / "LLaVA_ReCap_558K" / f"LLaVA_ReCap_558K-{shard:05d}-of-00002.parquet")
    onevision_file(root / "CLEVR-Math(MathV360K)" / "CLEVR-Math(MathV360K)-00000-of-00001.parquet")
    names = [s.name for s in discover_sources([str(root)], ["cc3m", "558k"])]
    assert names == ["CLEVR-Math(MathV360K)"]
    assert [s.name for s in discover_sources([str(root)], ["CLEVR"])] == ["LLaVA_ReCap_558K", "LLaVA_ReCap_CC3M"]


GOOD = {"id": "deepseek-000000/thinking", "query": "1+1=?", "original_output": "2", "mode": "thinking",
        "response": "<think>\nadd one\n</think>\n\n2"}


def test_bad_bytes_and_lone_surrogates_are_counted_rejects_in_json_and_jsonl(tmp_path):
    from data_process.stage3.records import read_records

    good = json.dumps(GOOD, ensure_ascii=False).encode()
    bad_byte = json.dumps({**GOOD, "id": "b"}).encode().replace(b"add one", b"add \xff one")
    surrogate = json.dumps({**GOOD, "id": "s"}).encode().replace(b"add one", b"add \\ud800 one")  # valid JSON
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes(b"\n".join([good, bad_byte, surrogate, b"{not json", good.replace(b"000000", b"000001")]) + b"\n")
    rejects = Counter()
    assert [r["id"] for r in read_records([str(jsonl)], rejects)] == [GOOD["id"], "deepseek-000001/thinking"]
    assert rejects == {"bad_utf8": 1, "bad_unicode": 1, "bad_json": 1}
    as_list = tmp_path / "in.json"
    as_list.write_bytes(b"[" + b",\n".join([good, bad_byte, surrogate]) + b"]")
    rejects = Counter()
    assert [r["id"] for r in read_records([str(as_list)], rejects)] == [GOOD["id"]]
    assert rejects == {"bad_utf8": 1, "bad_unicode": 1}


def test_convert_counts_bad_characters_and_keeps_the_other_rows(tmp_path):
    good = json.dumps(GOOD, ensure_ascii=False).encode()
    bad_byte = json.dumps({**GOOD, "id": "b"}).encode().replace(b"add one", b"add \xff one")
    surrogate = json.dumps({**GOOD, "id": "s"}).encode().replace(b"add one", b"add \\ud800 one")
    judged = tmp_path / "judged.json"
    judged.write_bytes(b"[" + b",\n".join([good, bad_byte, surrogate]) + b"]")
    proc = run("text2image/convert.py", "--input_files", judged, "--output_file", tmp_path / "t2i")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "t2i.parquet.stats.json").read_text())
    assert stats["written"] == 1 and stats["dropped by reason"] == {"bad_utf8": 1, "bad_unicode": 1}
    assert pq.read_metadata(tmp_path / "t2i.parquet").num_rows == 1


def test_text_sources_use_the_real_answer_fields(tmp_path):
    from data_process.stage3.text2image import process

    records = alpaca_zh_records(6)
    assert len(records) == 6, "tests/data/alpaca_zh_sample.json is part of the repository"
    with_input = next(r for r in records if r["input"])
    write_deepseek_copy(tmp_path / "ds", records[:3])
    write_alpaca_copy(tmp_path / "alpaca", [with_input, records[0]])
    args = process.parse_args(["--model", "m", "--deepseek_dataset", str(tmp_path / "ds"),
                               "--alpaca_dataset", str(tmp_path / "alpaca"), "--num_samples", "2"])
    queries = process.load_queries(args)
    assert [q["id"] for q in queries] == ["deepseek-000000", "deepseek-000001", "alpaca-000000", "alpaca-000001"]
    assert queries[0]["original_output"] == records[0]["output"]  # DeepSeek reference = `content`, never empty
    assert queries[2]["query"] == f"{with_input['instruction']}\n{with_input['input']}"
    assert queries[2]["original_output"] == with_input["output"] and queries[3]["query"] == records[0]["instruction"]
    tasks = process.build_tasks(queries, args)
    assert {t.data["mode"] for t in tasks} <= {"thinking", "no_thinking"}
    assert all(t.data["content"].endswith(" /no_think") == (t.data["mode"] == "no_thinking") for t in tasks)
    assert tasks == process.build_tasks(queries, args)  # seeded: same split and seeds every time
    many = process.build_tasks([{**queries[0], "id": f"q{i}"} for i in range(400)], args)
    share = sum(t.data["mode"] == "no_thinking" for t in many) / 400
    assert 0.4 < share < 0.6


def test_bad_lines_of_a_local_text_source_are_counted_not_fatal(tmp_path):
    from data_process.stage3.text2image import process

    path = tmp_path / "distill_r1_110k.jsonl"
    rows = [json.dumps({"input": f"q{i}", "content": f"a{i}", "reasoning_content": "r"}).encode() for i in range(3)]
    rows[1] = rows[1].replace(b"q1", b"q\xfe1")
    path.write_bytes(b"\n".join(rows) + b"\n")
    args = process.parse_args(["--model", "m", "--deepseek_dataset", str(path), "--alpaca_dataset", "none"])
    rejects = Counter()
    queries = process.load_queries(args, rejects)
    assert [q["query"] for q in queries] == ["q0", "q2"] and rejects == {"deepseek bad_utf8": 1}


def test_wrong_schema_is_an_error_not_an_empty_reference(tmp_path):
    from data_process.stage3.text2image import process

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "q", "output": "a"}) + "\n")  # `output` instead of `content`
    args = process.parse_args(["--model", "m", "--deepseek_dataset", str(bad), "--alpaca_dataset", "none"])
    with pytest.raises(SystemExit, match="content"):
        process.load_queries(args)


# ----------------------------------------------------------------------------------------------- training targets

def test_convert_strips_glm_answer_and_box_markers_from_training_targets():
    from data_process.stage3.render import RenderConfig
    from data_process.stage3.text2image.convert import convert_record

    record = {**GOOD, "response": "<think>t</think><answer>It is <|begin_of_box|>4<|end_of_box|>.</answer>"}
    row, reason = convert_record(record, RenderConfig(), 42)
    assert reason is None and row["messages"][1]["content"] == "<think>\nt\n</think>\n\nIt is 4."
    row, reason = convert_record({**GOOD, "response": "<think>t</think><answer>cut"}, RenderConfig(), 42)
    assert row is None and reason == "format_bad_answer_tags"


# ----------------------------------------------------------------------------------------------- length policy

def test_length_flag_defaults_match_the_stage3_recipes():
    from data_process.stage3.text2image.convert import parse_args

    args = parse_args(["--input_files", "x.json", "--output_file", "y"])
    for recipe in ("qwen_merge_4b", "qwen_merge_8b"):
        config = yaml.safe_load((REPO / "examples" / recipe / "stage3.yaml").read_text())
        assert args.cutoff_len == config["cutoff_len"] == 8192
        assert (args.train_image_min_pixels, args.train_image_max_pixels) == (config["image_min_pixels"],
                                                                              config["image_max_pixels"])


@pytest.mark.parametrize("image_processor", ["slow", "fast"])
def test_training_length_counts_template_text_and_image_tokens(image_processor, tiny_merged, tmp_path):
    """Also with the fast image processor a LLaMA-Factory output folder saves (the student after stage 2.2)."""
    from transformers import AutoProcessor, AutoTokenizer

    from data_process.stage3.length import TrainingLength

    student = tiny_merged
    if image_processor == "fast":
        student = tmp_path / "student"
        AutoProcessor.from_pretrained(str(tiny_merged), use_fast=True).save_pretrained(student)
        assert "Fast" in json.loads((student / "preprocessor_config.json").read_text())["image_processor_type"]
    measure = TrainingLength(str(student), min_pixels=56 * 56, max_pixels=280 * 280)
    messages = [{"role": "user", "content": "<image>\nWhat is shown?"},
                {"role": "assistant", "content": "<think>\nlook\n</think>\n\nA red square."}]
    # Independent count: the Qwen chat layout written out by hand, 280x280 px = 10x10 merged patches = 100 pads.
    text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 100 + "<|vision_end|>\nWhat is shown?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nlook\n</think>\n\nA red square.<|im_end|>\n")
    expected = len(AutoTokenizer.from_pretrained(str(tiny_merged))(text, add_special_tokens=False)["input_ids"])
    assert measure.count(messages, [png(280, 280)]) == expected
    assert measure.count(messages, [png(560, 560)]) == expected  # capped at max_pixels: still 100 pads


def test_convert_drops_rows_longer_than_cutoff_as_too_long(tiny_merged, tmp_path):
    long_answer = "<think>\n" + "step " * 600 + "\n</think>\n\ndone"
    records = [GOOD, {**GOOD, "id": "long/thinking", "response": long_answer}]
    judged = tmp_path / "judged.json"
    judged.write_text(json.dumps(records))
    proc = run("text2image/convert.py", "--input_files", judged, "--output_file", tmp_path / "t2i", "--processor",
               tiny_merged, "--cutoff_len", "512", "--train_image_min_pixels", str(56 * 56),
               "--train_image_max_pixels", str(224 * 224))
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "t2i.parquet.stats.json").read_text())
    assert stats["written"] == 1 and stats["dropped by reason"] == {"too_long": 1}
    kept = pq.read_table(tmp_path / "t2i.parquet").to_pylist()
    assert kept[0]["messages"][1]["content"] == GOOD["response"]


def test_image_pipeline_drops_too_long_rows_before_judging(tiny_merged, tmp_path):
    from data_process.stage3.client import Stats
    from data_process.stage3.image import evaluate
    from data_process.stage3.image.process import OUTPUT_SCHEMA as ANSWERED_SCHEMA

    def answered(i: int, response: str) -> dict:
        return {"messages": [{"role": "user", "content": "<image>\nWhat colour?"},
                             {"role": "assistant", "content": "Red."}],
                "images": [{"bytes": png(112, 112), "path": None}], "id": f"vqa/vqa.parquet:{i}", "source": "vqa",
                "source_file": "vqa.parquet", "row": i, "question": "What colour?", "reference": "Red.",
                "teacher_response": response, "teacher_model": "THUDM/GLM-4.1V-9B-Thinking", "finish_reason": "stop",
                "token_usage": "{}", "seed": i}

    path = tmp_path / "glm_response.parquet"
    rows = [answered(0, "<think>look</think><answer>It is <|begin_of_box|>red<|end_of_box|>.</answer>"),
            answered(1, "<think>" + "look again " * 300 + "</think><answer>Red.</answer>")]
    pq.write_table(pa.Table.from_pylist(rows, schema=ANSWERED_SCHEMA), path)
    args = evaluate.parse_args(["--input_file", str(path), "--processor", str(tiny_merged), "--cutoff_len", "400",
                                "--train_image_min_pixels", str(56 * 56), "--train_image_max_pixels", str(224 * 224)])
    stats = Stats()
    tasks = list(evaluate.make_tasks(args, stats))
    assert [t.id for t in tasks] == ["vqa/vqa.parquet:0"] and stats.rejected == {"too_long": 1}
    stats = Stats()
    args.processor = None
    assert len(list(evaluate.make_tasks(args, stats))) == 2 and not stats.rejected  # no processor: not measured


def test_both_judges_take_the_same_think_switches_with_their_own_default():
    from data_process.stage3.image import evaluate as image_judge
    from data_process.stage3.text2image import evaluate as text_judge

    assert text_judge.parse_args(["--input_file", "x", "--model", "m"]).judge_no_think is True
    assert text_judge.parse_args(["--input_file", "x", "--model", "m", "--judge_thinking"]).judge_no_think is False
    assert image_judge.parse_args([]).judge_no_think is False
    assert image_judge.parse_args(["--judge_no_think"]).judge_no_think is True
    assert image_judge.parse_args(["--judge_thinking"]).judge_no_think is False


def test_invalid_utf8_in_a_parquet_source_is_one_counted_reject(tmp_path):
    """Files written by other tools can hold invalid UTF-8 in a string column; pyarrow raises on reading it."""
    from data_process.stage3.client import Stats
    from data_process.stage3.image import process

    good = [[{"role": "user", "content": f"<image>\nQuestion {i}?"}, {"role": "assistant", "content": "Red."}]
            for i in range(3)]
    table = pa.Table.from_pylist([{"messages": m, "images": [{"bytes": png(64, 48), "path": None}]} for m in good],
                                 schema=OUTPUT_SCHEMA)
    content = table.column("messages").combine_chunks()
    # Row 1's question gets a 0xff byte: rebuild the nested string column from raw bytes, without validation.
    strings = content.values.field("content")
    raw = [s.as_py().encode() for s in strings]
    raw[2] = raw[2].replace(b"Question 1", b"Question \xff1")
    bad_strings = pa.array(raw, pa.binary()).view(pa.string())
    values = pa.StructArray.from_arrays([content.values.field("role"), bad_strings],
                                        fields=list(content.type.value_type))
    table = table.set_column(0, "messages", pa.ListArray.from_arrays(content.offsets, values))
    root = tmp_path / "converted"
    root.mkdir()
    pq.write_table(table, root / "vqa.parquet")
    args = process.parse_args(["--data_dir", str(root), "--samples_per_file", "5", "--output_file",
                               str(tmp_path / "glm.parquet")])
    stats = Stats()
    selection = process.build_selection(args, args.output_file, stats)
    rows = pq.read_table(selection).to_pylist()
    assert [r["id"] for r in rows] == ["vqa/vqa.parquet:0", "vqa/vqa.parquet:2"]  # row numbers of the file
    assert stats.extra["selection invalid_bad_utf8"] == 1 and stats.extra["selection valid rows seen"] == 2
