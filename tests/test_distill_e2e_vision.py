"""Multimodal distillation end to end against a real vLLM OpenAI server (tiny stock Qwen2.5-VL on CPU, context
of 1024 tokens), then a 2-step LLaMA-Factory run on the stage-3 outputs.

Input is OneVision-converted parquet in the stage-2 layout (a shard folder), a single parquet file, and a file
whose one question fits the context as text but not with its image tokens. Requests go through a
:class:`FaultProxy` with random latency (out-of-order completion). Guided decoding (``--extra_body``) makes the
teacher answer in GLM's ``<think>…</think><answer>…</answer>`` format. The proxy then rewrites chosen real
answers into recorded formats keyed by the sample (``tests/data/replies``): one teacher answer as a reasoning
parser splits it, one cut by ``finish_reason: length``, and every judge answer as GLM-4.1V-Thinking words a
PASS, a FAIL or a cut-off verdict. So which rows are kept depends on the sample: a join of verdicts to the
wrong samples fails. Context overflow is provoked on the real server: the long question (the engine's
"decoder prompt is longer" answer) and a judge run with a stale ``--max_model_len`` (the "maximum context
length" answer).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_process.common import OUTPUT_SCHEMA
from data_process.stage3.client import message_text
from data_process.stage3.judge import teacher_answer
from tests.distill_fixtures import (
    GLM_REGEX,
    PASS_JUDGE_REGEX,
    FaultProxy,
    as_recorded,
    guided,
    llamafactory_train,
    module_server,
    read_jsonl,
    run_script,
    script,
    session_outputs,
    with_message,
    write_onevision_copy,
)

QUESTIONS = [("What is shown in the picture?", "A person in a space suit."), ("Which colour dominates?", "Red."),
             ("How many objects are there?", "3"), ("Is this indoors?", "No."),
             ("Describe the scene briefly.", "A cup of coffee on a table."), ("What animal is this?", "A cat.")]
PER_SOURCE = 3
CONTEXT = 1024
# 980 prompt tokens as /tokenize counts them (one token for the image): 28 left for the answer, so it is sent;
# with the image's 64 tokens (224 x 224 px at the tiny model's max_pixels) the engine counts 1043 > 1024.
LONG_QUESTION = ("Look closely at the astronaut in the photo. "
                 + "Is the flag on the left shoulder or on the right shoulder? " * 73).strip()
LONG_ID = "long_question/long_question.parquet:0"
AS_PARSED_ID = "single_file/single_file.parquet:0"  # teacher answer as a reasoning parser returns it
CUT_ID = "single_file/single_file.parquet:1"  # teacher answer cut by max_tokens
JUDGE_REPLIES = ["glm41v_judge_pass", "glm41v_judge_fail_parser", "glm41v_judge_pass_answer_only",
                 "glm41v_judge_length"]
PASSING = {"glm41v_judge_pass", "glm41v_judge_pass_answer_only"}
STALE_CONTEXT, JUDGE_MAX_TOKENS = 4096, 900
FLAGS = ["--max_tokens", "64", "--request_timeout", "300", "--timeout_per_token", "0", "--max_retries", "6",
         "--retry_base_delay", "0.2", "--retry_max_delay", "1", "--max_workers", "3", "--no_progress"]


pytestmark = [pytest.mark.vllm, pytest.mark.slow]


server = module_server("tiny_qwen25vl", extra_args=("--max-model-len", str(CONTEXT)))


@pytest.fixture(scope="module")
def data(sample_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_data")
    converted = root / "converted"
    write_onevision_copy(converted, sample_images, QUESTIONS)  # shard folder: 6 valid rows + 1 invalid
    rows = [{"messages": [{"role": "user", "content": f"<image>Question {i}: what do you see?"},
                          {"role": "assistant", "content": f"Answer {i}."}],
             "images": [{"bytes": Path(sample_images[-1 - i]).read_bytes(), "path": None}]} for i in range(2)]
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), converted / "single_file.parquet")
    astronaut = next(p for p in sample_images if p.name.startswith("astronaut"))  # 512 x 512: 64 image tokens
    long_row = [{"messages": [{"role": "user", "content": "<image>\n" + LONG_QUESTION},
                              {"role": "assistant", "content": "On the left shoulder."}],
                 "images": [{"bytes": astronaut.read_bytes(), "path": None}]}]
    pq.write_table(pa.Table.from_pylist(long_row, schema=OUTPUT_SCHEMA), converted / "long_question.parquet")
    (converted / "_stats").mkdir()  # stage-2 bookkeeping folders are skipped
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


def rewrite_teacher(sample_id: str, body: dict) -> dict | None:
    if sample_id == AS_PARSED_ID:  # what vLLM's reasoning parser makes of the same answer
        thought, answer = body["choices"][0]["message"]["content"].removeprefix("<think>").split("</think>", 1)
        return with_message(body, {"role": "assistant", "reasoning_content": thought, "content": answer,
                                   "tool_calls": []}, "stop")
    if sample_id == CUT_ID:
        return as_recorded(body, "glm41v_teacher_length")
    return None


def judge_reply_names(ids: list[str]) -> dict[str, str]:
    """A recorded judge reply per sample, in an order unrelated to the input order."""
    shuffled = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    return {sid: JUDGE_REPLIES[k % len(JUDGE_REPLIES)] for k, sid in enumerate(shuffled)}


@pytest.fixture(scope="module")
def run(server, tiny_qwen25vl, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vision_run")
    answered_path, final_path = out / "glm_response.parquet", out / "image_thinking.parquet"
    process = [script("image", "process.py"), "--data_dir", str(data / "converted"), "--model_name",
               str(tiny_qwen25vl), "--samples_per_file", str(PER_SOURCE), "--min_tokens", "16", "--output_file",
               str(answered_path), "--extra_body", f"@{data / 'teacher.json'}"]
    with FaultProxy(server.url, latency_s=(0.0, 0.5), seed=5, rewrite=rewrite_teacher) as proxy:
        api = ["--api_ips", proxy.url + "/v1"]
        run_script([*process, *api, *FLAGS])
        teacher_events = list(proxy.chat_events())
        first_stats = json.loads(Path(str(answered_path) + ".stats.json").read_text())
        run_script([*process, *api, *FLAGS])  # a rerun: everything is final, nothing is sent again
        rerun_events = proxy.chat_events()[len(teacher_events):]
    answered = pq.read_table(answered_path).to_pylist()
    replies = judge_reply_names([r["id"] for r in answered])
    with FaultProxy(server.url, latency_s=(0.0, 0.5), seed=6,
                    rewrite=lambda sid, body: as_recorded(body, replies[sid])) as proxy:
        run_script([script("image", "evaluate.py"), "--input_file", str(answered_path), "--output_file",
                    str(final_path), "--judge_model", str(tiny_qwen25vl), "--judge_extra_body",
                    f"@{data / 'judge.json'}", "--api_ips", proxy.url + "/v1", *FLAGS,
                    "--max_model_len", str(STALE_CONTEXT), "--max_tokens", str(JUDGE_MAX_TOKENS)])
        judge_events = proxy.chat_events()
    return {"dir": out, "teacher": teacher_events, "rerun": rerun_events, "judge": judge_events,
            "first_stats": first_stats, "replies": replies, "answered": answered,
            "final": pq.read_table(final_path).to_pylist()}


def test_seeded_sample_and_image_sent_to_the_teacher(run, data):
    images = source_images(data)
    answered = run["answered"]
    ids = [r["id"] for r in answered]
    selection = pq.read_table(str(run["dir"] / "glm_response.parquet") + ".selection.parquet").to_pylist()
    selected = [r["id"] for r in selection]
    # 3 of 6 from the shard folder, 2 of 2 from the file, the long question; all selected rows were sent once.
    assert len(selected) == len(set(selected)) == PER_SOURCE + 2 + 1
    assert {i for i in selected if not i.startswith("fixture_vqa/")} == {AS_PARSED_ID, CUT_ID, LONG_ID}
    stats = run["first_stats"]
    assert stats["selection invalid_no_image"] == 1 and stats["selection valid rows seen"] == len(QUESTIONS) + 3
    assert ids == [i for i in selected if i not in (CUT_ID, LONG_ID)]  # the answered rows, in input order
    by_id = {e.sample_id: e for e in run["teacher"]}
    assert len(by_id) == len(run["teacher"]) == len(selected)
    for row in answered:
        sent_image, question = image_of(by_id[row["id"]].request)
        assert sent_image == images[row["id"]] == row["images"][0]["bytes"]  # same bytes, never re-encoded
        assert question == row["question"] and "<image>" not in question
        assert row["messages"][0]["content"] == "<image>\n" + row["question"]
        assert row["teacher_response"] == message_text(by_id[row["id"]].response["choices"][0]["message"])
    parsed = by_id[AS_PARSED_ID]  # split by a "reasoning parser": put back together as the raw answer was
    assert parsed.response["choices"][0]["message"]["content"].startswith("<answer>")
    assert next(r for r in answered if r["id"] == AS_PARSED_ID)["teacher_response"] == \
        parsed.upstream["choices"][0]["message"]["content"].replace("<think>", "<think>\n").replace("</think>",
                                                                                                 "\n</think>\n\n")


def test_prompt_over_the_real_server_context_is_a_final_reject_and_reruns_send_nothing(run):
    long_event = next(e for e in run["teacher"] if e.sample_id == LONG_ID)
    message = long_event.response["message"]
    assert long_event.status == 400 and f"longer than the maximum model length of {CONTEXT}" in message
    stats = run["first_stats"]
    assert stats["rejected by reason"] == {"prompt_too_long": 1, "finish_length": 1} and stats["failed"] == 0
    records = {r["id"]: r for r in read_jsonl(Path(str(run["dir"] / "glm_response.parquet") + ".ckpt.jsonl"))}
    assert records[LONG_ID]["status"] == "rejected" and records[LONG_ID]["reason"] == "prompt_too_long"
    assert records[CUT_ID]["status"] == "rejected" and records[CUT_ID]["reason"] == "finish_length"
    assert run["rerun"] == []  # exit code 0 checked by run_script; nothing sent again
    rerun = json.loads((run["dir"] / "glm_response.parquet.stats.json").read_text())
    assert rerun["resumed (already done)"] == len(records) and rerun["requests sent"] == 0


def test_judge_budget_is_corrected_from_the_real_servers_overflow_answer(run):
    by_sample: dict[str, list] = {}
    for event in run["judge"]:
        by_sample.setdefault(event.sample_id, []).append(event)
    assert set(by_sample) == {r["id"] for r in run["answered"]}
    for events in by_sample.values():
        refused, accepted = events
        text = refused.response["message"]
        assert refused.status == 400 and refused.request["max_tokens"] == JUDGE_MAX_TOKENS
        match = re.search(rf"maximum context length is {CONTEXT} tokens.*\((\d+) in the messages, "
                          rf"{JUDGE_MAX_TOKENS} in the completion\)", text)
        assert match, text
        assert accepted.status == 200 and accepted.request["max_tokens"] == CONTEXT - int(match.group(1)) - 16


def test_judge_sees_the_image_and_only_pass_rows_are_kept_with_their_own_images(run):
    answered = {r["id"]: r for r in run["answered"]}
    replies = run["replies"]
    events = {e.sample_id: e for e in run["judge"] if e.status == 200}
    assert set(events) == set(answered)  # every well-formed answer judged once
    for sid, event in events.items():
        sent_image, prompt = image_of(event.request)
        row = answered[sid]
        _, answer, _ = teacher_answer(row["teacher_response"], require_thought=True)
        assert sent_image == row["images"][0]["bytes"]  # the judge gets the image
        assert row["question"] in prompt and row["reference"] in prompt and answer in prompt
    assert {replies[s] for s in answered} == set(JUDGE_REPLIES)  # PASS, FAIL and a cut-off verdict all seen
    passed = [sid for sid in answered if replies[sid] in PASSING]
    final = run["final"]
    assert len(final) == len(passed) == 2
    for row, sid in zip(final, passed):  # kept rows are exactly the PASS items, with their own image
        training, _, _ = teacher_answer(answered[sid]["teacher_response"], require_thought=True)
        assert row["messages"] == [{"role": "user", "content": "<image>\n" + answered[sid]["question"]},
                                   {"role": "assistant", "content": training}]
        assert row["images"] == answered[sid]["images"]
        assert "<answer>" not in training and "<|begin_of_box|>" not in training
    stats = json.loads((run["dir"] / "image_thinking.parquet.stats.json").read_text())
    assert stats["rejected by reason"] == {"judged_fail": 1, "judge_finish_length": 1}
    assert stats["retried by reason"] == {"context_overflow": len(answered)}


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


def test_reselection_is_seeded(run, data, tmp_path):
    from data_process.stage3.client import Stats
    from data_process.stage3.image import process

    def selected(seed: int) -> list[str]:
        args = process.parse_args(["--data_dir", str(data / "converted"), "--samples_per_file", str(PER_SOURCE),
                                   "--seed", str(seed), "--output_file", str(tmp_path / f"s{seed}.parquet")])
        return [r["id"] for r in pq.read_table(process.build_selection(args, args.output_file, Stats())).to_pylist()]

    first = pq.read_table(str(run["dir"] / "glm_response.parquet") + ".selection.parquet").to_pylist()
    assert selected(42) == [r["id"] for r in first]
    assert any(selected(s) != selected(42) for s in (1, 2, 3))
