"""Text-to-image distillation end to end against a real vLLM OpenAI server (tiny Qwen3 on CPU).

One server for the module; every request goes through a :class:`FaultProxy` that logs it (and, where a test
asks for it, fails it). Guided decoding (passed with ``--extra_body``) makes the random tiny model answer in
the ``<think>…</think>answer`` and ``VERDICT:`` formats; everything else is the real pipeline.
"""
from __future__ import annotations

import io
import json
import random
import shutil
import signal
from pathlib import Path

import pytest
from PIL import Image

from data_process.stage3.render import RenderConfig, render_text
from data_process.stage3.runner import stable_seed
from tests.distill_fixtures import (
    JUDGE_REGEX,
    TEACHER_REGEX,
    FaultProxy,
    alpaca_zh_records,
    guided,
    module_server,
    read_jsonl,
    run_script,
    script,
    session_outputs,
    start_script,
    wait_for_lines,
    write_alpaca_copy,
    write_deepseek_copy,
)

N_PER_SOURCE = 3
CONTEXT = 2048
CLIENT_FLAGS = ["--max_tokens", "48", "--max_retries", "8", "--retry_base_delay", "0.2", "--retry_max_delay", "1",
                "--no_progress"]
RELAXED = ["--request_timeout", "300", "--timeout_per_token", "0"]  # no timeouts on a busy 2-core machine
# The fault run's timeout (8 s + 48 tokens x 0.05 s) is what the proxy's "delay" fault exceeds; a slow
# legitimate answer that also exceeds it is simply retried (same seed, same answer).
SHORT = ["--request_timeout", "8", "--timeout_per_token", "0.05"]
DELAY_FAULT_S = 12


pytestmark = [pytest.mark.vllm, pytest.mark.slow]


server = module_server("tiny_qwen3")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    records = alpaca_zh_records(2 * N_PER_SOURCE)
    assert len(records) >= 2 * N_PER_SOURCE, "tests/data/alpaca_zh_sample.json is part of the repository"
    root = tmp_path_factory.mktemp("text_data")
    write_deepseek_copy(root / "deepseek", records[:N_PER_SOURCE])
    write_alpaca_copy(root / "alpaca", records[N_PER_SOURCE:])
    (root / "teacher.json").write_text(guided(TEACHER_REGEX))
    (root / "judge.json").write_text(guided(JUDGE_REGEX))
    return root


def endpoints(*proxies: FaultProxy) -> list[str]:
    return ["--api_ips", *(p.url + "/v1" for p in proxies)]


def process_args(model, api: list[str], data: Path, out: Path, workers: int = 3, timeouts=RELAXED) -> list[str]:
    return [script("text2image", "process.py"), "--model", str(model), *api,
            "--deepseek_dataset", str(data / "deepseek"), "--alpaca_dataset", str(data / "alpaca"),
            "--num_samples", str(N_PER_SOURCE), "--output_file", str(out), "--extra_body",
            f"@{data / 'teacher.json'}", "--max_workers", str(workers), "--min_tokens", "16", *CLIENT_FLAGS, *timeouts]


def evaluate_args(model, api: list[str], data: Path, inp: Path, out: Path, timeouts=RELAXED) -> list[str]:
    return [script("text2image", "evaluate.py"), "--input_file", str(inp), "--output_file", str(out), "--model",
            str(model), *api, "--judge_extra_body",
            f"@{data / 'judge.json'}", "--max_workers", "3", *CLIENT_FLAGS, *timeouts]


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def clean_run(server, tiny_qwen3, data, tmp_path_factory):
    """process -> evaluate -> convert through two endpoints (proxies that only log and reorder)."""
    out = tmp_path_factory.mktemp("clean")
    with FaultProxy(server.url, latency_s=(0.0, 0.4), seed=1) as one, \
            FaultProxy(server.url, latency_s=(0.0, 0.4), seed=2) as two:
        api = endpoints(one, two)
        run_script(process_args(tiny_qwen3, api, data, out / "gen.json"))
        gen_events = one.chat_events() + two.chat_events()
        assert one.chat_events() and two.chat_events(), "requests are spread over both endpoints"
        n_one, n_two = len(one.chat_events()), len(two.chat_events())
        run_script(evaluate_args(tiny_qwen3, api, data, out / "gen.json", out / "judged.json"))
        judge_events = one.chat_events()[n_one:] + two.chat_events()[n_two:]
    run_script([script("text2image", "convert.py"), "--input_files", str(out / "judged.json"),
                "--output_file", str(out / "text2image"), "--max_workers", "2"])
    return {"dir": out, "gen": load(out / "gen.json"), "judged": load(out / "judged.json"),
            "gen_events": gen_events, "judge_events": judge_events}


def test_teacher_requests_and_outputs(clean_run, data):
    gen, events = clean_run["gen"], clean_run["gen_events"]
    sources = {json.loads(line)["input"]: json.loads(line)["content"]
               for line in (data / "deepseek" / "distill_r1_110k.jsonl").read_text().splitlines()}
    queries = {r["id"].split("/")[0] for r in gen}
    assert len(queries) == 2 * N_PER_SOURCE
    assert {r["mode"] for r in gen} == {"thinking", "no_thinking"}  # both modes present (seeded split)
    by_id = {e.sample_id: e.request for e in events}
    stats = json.loads((clean_run["dir"] / "gen.json.stats.json").read_text())
    assert len(by_id) == len(gen) and len(events) == stats["requests sent"] == len(gen) + stats["retries"]
    for rec in gen:
        body = by_id[rec["id"]]
        content = body["messages"][0]["content"]
        assert content.endswith(" /no_think") == (rec["mode"] == "no_thinking")
        assert body["seed"] == rec["seed"] == stable_seed(42, rec["id"])
        assert body["guided_regex"] == TEACHER_REGEX  # --extra_body passed through
        assert rec["token_usage"]["prompt_tokens"] + body["max_tokens"] <= CONTEXT
        assert rec["response"].startswith("<think>\n") and rec["finish_reason"] == "stop"
        if rec["source"] == "deepseek":  # the reference is the dataset's `content`, not an empty `output`
            assert rec["original_output"] == sources[rec["query"]] != ""


def test_judge_gets_no_think_and_verdicts_follow_their_items(clean_run):
    judged, events = clean_run["judged"], clean_run["judge_events"]
    assert events and all(e.request["messages"][0]["content"].endswith("VERDICT: FAIL`, and nothing after it."
                                                                       " /no_think") for e in events)
    answer_of = {e.sample_id: e.response["choices"][0]["message"]["content"] for e in events}
    prompt_of = {e.sample_id: e.request["messages"][0]["content"] for e in events}
    verdicts = {sid: text.rsplit("VERDICT: ", 1)[1] for sid, text in answer_of.items()}
    assert len(set(answer_of.values())) > 1, "identical judge answers would not show which item got which"
    assert [r["id"] for r in judged] == [sid for sid in (r["id"] for r in clean_run["gen"])
                                         if verdicts.get(sid) == "PASS"]
    for rec in judged:  # the stored judgement is the one the server gave for this very item
        assert rec["evaluation_content"] == answer_of[rec["id"]] and rec["assessment"] == "PASS"
        assert rec["query"] in prompt_of[rec["id"]] and rec["extracted_response"] in prompt_of[rec["id"]]
    stats = json.loads((clean_run["dir"] / "judged.json.stats.json").read_text())
    assert stats["kept by the judge"] == len(judged) and stats["interrupted"] is False


def test_converted_parquet_shows_the_question(clean_run, tmp_path_factory):
    import datasets

    path = clean_run["dir"] / "text2image.parquet"
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    judged = clean_run["judged"]
    assert len(ds) == len(judged) > 0
    for row, rec in zip(ds, judged):
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"].count("<image>") == len(row["images"]) >= 1
        assert user["content"].endswith(" /no_think") == (rec["mode"] == "no_thinking")
        assert assistant["content"] == rec["response"]
        # The image is the rendering of this record's question (same seed -> identical pixels).
        expected = render_text(rec["query"], RenderConfig(), random.Random(stable_seed(42, rec["id"], "render")))
        assert [im.tobytes() for im in row["images"]] == [Image.open(io.BytesIO(p)).tobytes() for p in expected.pages]
    # Trained on (with the multimodal output) by test_distill_e2e_vision.py.
    shutil.copy(path, session_outputs(tmp_path_factory) / "text2image.parquet")


def test_faults_retried_all_complete_none_duplicated(server, tiny_qwen3, data, clean_run, tmp_path):
    """Every third request fails (resets, 5xx, lost answers, cut bodies, timeouts): 33 %, above the ~20 % asked."""
    out = tmp_path / "gen.json"
    with FaultProxy(server.url, fail_every=3, delay_s=DELAY_FAULT_S) as proxy:
        run_script(process_args(tiny_qwen3, endpoints(proxy), data, out, timeouts=SHORT))
        process_faults = proxy.faults_seen()
        run_script(evaluate_args(tiny_qwen3, endpoints(proxy), data, out, tmp_path / "judged.json", timeouts=SHORT))
        all_faults = proxy.faults_seen()
    assert len(process_faults) >= 3 and len(set(all_faults)) >= 5, all_faults
    gen = load(out)
    assert [r["id"] for r in gen] == [r["id"] for r in clean_run["gen"]]  # all complete, in order, once
    assert gen == clean_run["gen"]  # seeded requests: the same answers as the fault-free run
    lines = read_jsonl(Path(str(out) + ".ckpt.jsonl"))
    assert len(lines) == len({line["id"] for line in lines}) == len(gen)
    stats = json.loads(Path(str(out) + ".stats.json").read_text())
    assert stats["retries"] >= len(process_faults) and stats["failed"] == 0
    assert load(tmp_path / "judged.json") == clean_run["judged"]


def test_interrupted_runs_resume_without_resending(server, tiny_qwen3, data, clean_run, tmp_path):
    """Ctrl-C, then kill -9, then a full run: each rerun sends only unfinished items; same final output."""
    out = tmp_path / "gen.json"
    ckpt = Path(str(out) + ".ckpt.jsonl")
    total = len(clean_run["gen"])
    finished: set[str] = set()
    with FaultProxy(server.url, latency_s=(0.5, 1.0), seed=3) as proxy:
        for attempt, sig in enumerate((signal.SIGINT, signal.SIGKILL, None)):
            seen = len(proxy.chat_events())
            args = process_args(tiny_qwen3, endpoints(proxy), data, out, workers=2)
            if sig is None:
                run_script(args)
            else:
                proc = start_script(args, tmp_path / f"run{attempt}.log")
                wait_for_lines(ckpt, len(finished) + 2, proc)
                proc.send_signal(sig)
                code = proc.wait(60)
                assert not out.exists(), "the final output is only written by a complete run"
                if sig == signal.SIGINT:
                    assert code == 130 and '"interrupted": true' in (tmp_path / f"run{attempt}.log").read_text()
            resent = [e.sample_id for e in proxy.chat_events()[seen:] if e.sample_id in finished]
            assert resent == []  # no finished item is ever sent again
            now = {line["id"] for line in read_jsonl(ckpt)}  # whole lines only: parseable after a kill
            assert finished < now and (sig is None or len(now) < total)
            resumed = len(finished)
            finished = now
    assert load(out) == clean_run["gen"]  # identical final output
    stats = json.loads(Path(str(out) + ".stats.json").read_text())
    assert stats["resumed (already done)"] == resumed and stats["interrupted"] is False
