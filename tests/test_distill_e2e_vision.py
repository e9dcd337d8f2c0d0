"""Multimodal distillation end to end against a real vLLM OpenAI server (tiny stock Qwen2.5-VL on CPU),
then a 2-step LLaMA-Factory run on the stage-3 outputs.

Input is OneVision-converted parquet in the stage-2 layout (a shard folder) plus a single parquet file;
requests go through a logging :class:`FaultProxy` with random latency (out-of-order completion). Guided
decoding (``--extra_body``) gives GLM-style ``<think>…</think><answer>…</answer>`` answers and a judge that
passes every answer (so there is always data to train on; rejection by the judge is covered by the text
module and the unit tests), each verdict with its own random reason.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_process.common import OUTPUT_SCHEMA
from data_process.stage3.judge import teacher_answer
from tests.distill_fixtures import (
    GLM_REGEX,
    PASS_JUDGE_REGEX,
    FaultProxy,
    guided,
    llamafactory_train,
    module_server,
    run_script,
    script,
    session_outputs,
    write_onevision_copy,
)

QUESTIONS = [("What is shown in the picture?", "A person in a space suit."), ("Which colour dominates?", "Red."),
             ("How many objects are there?", "3"), ("Is this indoors?", "No."),
             ("Describe the scene briefly.", "A cup of coffee on a table."), ("What animal is this?", "A cat.")]
PER_SOURCE = 2
FLAGS = ["--max_tokens", "64", "--request_timeout", "300", "--timeout_per_token", "0", "--max_retries", "6",
         "--retry_base_delay", "0.2", "--retry_max_delay", "1", "--max_workers", "3", "--no_progress"]


pytestmark = [pytest.mark.vllm, pytest.mark.slow]


server = module_server("tiny_qwen25vl")


@pytest.fixture(scope="module")
def data(sample_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_data")
    write_onevision_copy(root / "converted", sample_images, QUESTIONS)  # shard folder: 6 valid rows + 1 invalid
    single = root / "converted" / "single_file.parquet"
    rows = [{"messages": [{"role": "user", "content": f"<image>Question {i}: what do you see?"},
                          {"role": "assistant", "content": f"Answer {i}."}],
             "images": [{"bytes": Path(sample_images[-1 - i]).read_bytes(), "path": None}]} for i in range(2)]
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), single)
    (root / "converted" / "_stats").mkdir()  # stage-2 bookkeeping folders are skipped
    (root / "teacher.json").write_text(guided(GLM_REGEX))
    (root / "judge.json").write_text(guided(PASS_JUDGE_REGEX))
    return root


def source_images(data: Path) -> dict[str, bytes]:
    """Image bytes of every input row by the id the pipeline gives it (``source/file:row``)."""
    out = {}
    for path in sorted((data / "converted").rglob("*.parquet")):
        source = path.parent.name if path.parent.name != "converted" else path.stem
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            if row["images"]:
                out[f"{source}/{path.name}:{i}"] = row["images"][0]["bytes"]
    return out


def image_of(request: dict) -> tuple[bytes, str]:
    """The image bytes and the text of a chat request with one image part."""
    parts = request["messages"][0]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    text = next(p["text"] for p in parts if p["type"] == "text")
    return base64.b64decode(url.split(",", 1)[1]), text


@pytest.fixture(scope="module")
def run(server, tiny_qwen25vl, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vision_run")
    with FaultProxy(server.url, latency_s=(0.0, 0.5), seed=5) as proxy:
        common = ["--api_ips", proxy.url + "/v1", *FLAGS]
        run_script([script("image", "process.py"), "--data_dir", str(data / "converted"), "--model_name",
                    str(tiny_qwen25vl), "--samples_per_file", str(PER_SOURCE), "--min_tokens", "16", "--output_file",
                    str(out / "glm_response.parquet"), "--extra_body", f"@{data / 'teacher.json'}", *common])
        teacher_events = list(proxy.chat_events())
        run_script([script("image", "evaluate.py"), "--input_file", str(out / "glm_response.parquet"),
                    "--output_file", str(out / "image_thinking.parquet"), "--judge_model", str(tiny_qwen25vl),
                    "--judge_extra_body", f"@{data / 'judge.json'}", *common])
        judge_events = proxy.chat_events()[len(teacher_events):]
    return {"dir": out, "teacher": teacher_events, "judge": judge_events,
            "answered": pq.read_table(out / "glm_response.parquet").to_pylist(),
            "final": pq.read_table(out / "image_thinking.parquet").to_pylist()}


def test_seeded_sample_and_image_sent_to_the_teacher(run, data):
    images = source_images(data)
    answered = run["answered"]
    ids = [r["id"] for r in answered]
    assert len(ids) == len(set(ids)) == 2 * PER_SOURCE  # 2 of 6 from the shard folder, 2 of 2 from the file
    assert sum(i.startswith("single_file/") for i in ids) == 2
    stats = json.loads((run["dir"] / "glm_response.parquet.stats.json").read_text())
    assert stats["selection invalid_no_image"] == 1 and stats["selection valid rows seen"] == len(QUESTIONS) + 2
    selection = pq.read_table(str(run["dir"] / "glm_response.parquet") + ".selection.parquet").to_pylist()
    assert [r["id"] for r in selection] == ids  # every selected row answered, in input order
    by_id = {e.sample_id: e for e in run["teacher"]}
    assert len(by_id) == len(run["teacher"]) == len(ids)
    for row in answered:
        sent_image, question = image_of(by_id[row["id"]].request)
        assert sent_image == images[row["id"]] == row["images"][0]["bytes"]  # same bytes, never re-encoded
        assert question == row["question"] and "<image>" not in question
        assert row["messages"][0]["content"] == "<image>\n" + row["question"]
        assert row["teacher_response"] == by_id[row["id"]].response["choices"][0]["message"]["content"]


def test_reselection_is_seeded(run, data, tiny_qwen25vl, tmp_path):
    from data_process.stage3.client import Stats
    from data_process.stage3.image import process

    def selected(seed: int) -> list[str]:
        args = process.parse_args(["--data_dir", str(data / "converted"), "--samples_per_file", str(PER_SOURCE),
                                   "--seed", str(seed), "--output_file", str(tmp_path / f"s{seed}.parquet")])
        return [r["id"] for r in pq.read_table(process.build_selection(args, args.output_file, Stats())).to_pylist()]

    assert selected(42) == [r["id"] for r in run["answered"]]
    assert any(selected(s) != selected(42) for s in (1, 2, 3))


def test_judge_sees_the_image_and_verdicts_follow_ids(run):
    answered = {r["id"]: r for r in run["answered"]}
    events = {e.sample_id: e for e in run["judge"]}
    assert set(events) == set(answered)  # every well-formed answer judged once
    verdict_text = {}
    for sid, event in events.items():
        sent_image, prompt = image_of(event.request)
        row = answered[sid]
        _, answer, _ = teacher_answer(row["teacher_response"], require_thought=True)
        assert sent_image == row["images"][0]["bytes"]  # the judge gets the image
        assert row["question"] in prompt and row["reference"] in prompt and answer in prompt
        verdict_text[sid] = event.response["choices"][0]["message"]["content"]
    assert len(set(verdict_text.values())) > 1
    passed = [sid for sid in answered if verdict_text[sid].endswith("VERDICT: PASS")]
    final = run["final"]
    assert len(final) == len(passed) > 0
    for row, sid in zip(final, passed):  # kept rows are exactly the PASS items, with their own image
        training, _, _ = teacher_answer(answered[sid]["teacher_response"], require_thought=True)
        assert row["messages"] == [{"role": "user", "content": "<image>\n" + answered[sid]["question"]},
                                   {"role": "assistant", "content": training}]
        assert row["images"] == answered[sid]["images"]
        assert "<answer>" not in training and "<|begin_of_box|>" not in training


def test_outputs_load_and_train(run, tiny_qwen25vl, venv_env, tmp_path, tmp_path_factory):
    import datasets

    final = run["dir"] / "image_thinking.parquet"
    ds = datasets.load_dataset("parquet", data_files=str(final), split="train")
    for row in ds:
        assert row["messages"][0]["content"].count("<image>") == len(row["images"]) == 1
        assert row["images"][0].size[0] > 0  # decoded to PIL by the embedded features
    stats = json.loads((Path(str(final) + ".stats.json")).read_text())
    assert stats["kept by the judge"] == len(ds) and stats["failed"] == 0
    datasets_to_train = {"image_thinking": final}
    text2image = session_outputs(tmp_path_factory) / "text2image.parquet"
    if text2image.exists():  # written by test_distill_e2e_text.py earlier in this session
        datasets_to_train["text2image"] = text2image
    proc = llamafactory_train(tiny_qwen25vl, datasets_to_train, tmp_path, venv_env)
    log = proc.stdout + proc.stderr
    for name in datasets_to_train:
        assert f"Loading dataset {name}.parquet" in log
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in datasets_to_train.values())
    assert f"Num examples = {rows}" in log  # every row accepted (an <image>/image mismatch would fail)
    assert "train_loss" in log
