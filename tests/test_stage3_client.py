"""The stage-3 HTTP client (``data_process/stage3/client.py``): retries, endpoint choice, context overflow
answers as vLLM words them, the start-up probe, and the test helper that runs ``vllm serve``.

Retry logic runs against a local scripted stub; the answers a real vLLM server gives are exercised by the e2e
modules (``test_distill_e2e_*``), which provoke them on a real server."""
from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from data_process.stage3.client import (
    ChatClient,
    EndpointPool,
    RequestFailed,
    RetryPolicy,
    Stats,
    context_overflow,
    message_text,
)

REPO = Path(__file__).resolve().parent.parent


def _run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


# vLLM 0.9.1's answers to requests that do not fit (serving_engine._validate_input, llm_engine/processor).
OVERFLOW_WITH_COMPLETION = ("This model's maximum context length is 100 tokens. However, you requested 140 tokens "
                            "(60 in the messages, 80 in the completion). Please reduce the length of the messages "
                            "or completion.")
OVERFLOW_MESSAGES_ONLY = ("This model's maximum context length is 100 tokens. However, you requested 120 tokens in "
                          "the messages, Please reduce the length of the messages.")
OVERFLOW_ENGINE = ("The decoder prompt (length 130) is longer than the maximum model length of 100. Make sure that "
                   "`max_model_len` is no smaller than the number of text tokens plus multimodal tokens. For image "
                   "inputs, the number of image tokens depends on the number of images, and possibly their aspect "
                   "ratios as well.")


def _error_body(message: str) -> dict:
    """vLLM's ErrorResponse JSON."""
    return {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400}


OVERFLOWS = {"overflow": OVERFLOW_WITH_COMPLETION, "overflow_messages": OVERFLOW_MESSAGES_ONLY,
             "overflow_engine": OVERFLOW_ENGINE}


class _Stub:
    """Local aiohttp server: scripted answers for the retry logic (the real-server tests cover the rest)."""

    def __init__(self, script):
        self.script = list(script)
        self.seen = []

    async def handle(self, request):
        self.seen.append(await request.json())
        action = self.script.pop(0) if self.script else "ok"
        if action == "ok":
            return web.json_response({"choices": [{"message": {"content": "hi", "reasoning_content": "r"},
                                                   "finish_reason": "stop"}], "usage": {}})
        if action == "sleep":
            await asyncio.sleep(2)
        if action in OVERFLOWS:
            return web.json_response(_error_body(OVERFLOWS[action]), status=400)
        return web.Response(status=int(action), text="no")


async def _with_stub(script, fn):
    stub = _Stub(script)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", stub.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with ChatClient([f"http://127.0.0.1:{port}/v1"], model="m", request_timeout=0.5, timeout_per_token=0,
                              retry=RetryPolicy(3, 0.01, 0.05), extra_body={"x": 1}) as client:
            return stub, await fn(client)
    finally:
        await runner.cleanup()


def test_retries_on_5xx_and_timeouts_then_succeeds():
    stub, res = _run(_with_stub(["503", "sleep", "500"], lambda c: c.chat({"messages": []}, sample_id="s")))
    assert res.text == "<think>\nr\n</think>\n\nhi"  # separately returned reasoning is put back
    assert len(stub.seen) == 4 and all(body["x"] == 1 and body["model"] == "m" for body in stub.seen)


def test_client_errors_are_final_and_retries_are_bounded():
    with pytest.raises(RequestFailed) as err:
        _run(_with_stub(["404"], lambda c: c.chat({"messages": []}, sample_id="s")))
    assert err.value.reason == "http_404"
    with pytest.raises(RequestFailed) as err:
        _run(_with_stub(["502"] * 10, lambda c: c.chat({"messages": []}, sample_id="s")))
    assert err.value.reason == "http_502" and "4 attempts" in err.value.detail


def test_context_overflow_lowers_max_tokens():
    stub, _ = _run(_with_stub(["overflow"], lambda c: c.chat({"messages": [], "max_tokens": 80}, sample_id="s")))
    assert [b["max_tokens"] for b in stub.seen] == [80, 100 - 60 - 16]


def test_least_busy_prefers_idle_and_retry_avoids_failed_endpoint():
    pool = EndpointPool(["http://a/v1", "http://b/v1", "http://c/v1"], "least_busy")
    first = pool.acquire()
    second = pool.acquire()
    assert first is not second  # the idle endpoints are preferred
    pool.release(first, ok=True)
    third = pool.acquire(avoid=first)
    assert third is not first and third is not second  # a retry avoids the endpoint that just failed
    assert first.root_url == "http://a"
    rr = EndpointPool(["http://a", "http://b"], "round_robin")
    assert [rr.acquire().base_url for _ in range(4)] == ["http://a", "http://b", "http://a", "http://b"]


def test_backoff_grows_with_jitter():
    policy, rng = RetryPolicy(10, 1.0, 8.0), random.Random(0)
    delays = [policy.delay(a, rng) for a in range(6)]
    for attempt, d in enumerate(delays):
        cap = min(8.0, 2 ** attempt)
        assert cap / 2 <= d <= cap


@pytest.mark.parametrize("message, expected", [
    (OVERFLOW_WITH_COMPLETION, (100, 60)),
    (OVERFLOW_MESSAGES_ONLY, (100, 120)),
    (OVERFLOW_ENGINE, (100, 130)),
    ("This model's maximum context length is 4096 tokens. However, your request has 5000 input tokens.", (4096, 5000)),
    ("Prompt length of 9000 is longer than the maximum model length of 8192.", (8192, 9000)),
    ("The model `m` does not exist.", None),
])
def test_context_overflow_answers_give_context_and_prompt_length(message, expected):
    assert context_overflow(message) == expected


@pytest.mark.parametrize("action", ["overflow_engine", "overflow_messages"])
def test_prompt_longer_than_the_server_context_is_a_final_none_after_one_request(action):
    """The server's own count (image tokens included) says the prompt cannot fit: no retries, no error."""
    async def ask(client):
        return await client.ask([{"role": "user", "content": "q"}], sample_id="s", max_tokens=80, context_len=None,
                                seed=1, min_tokens=8)

    stub, res = _run(_with_stub([action], ask))
    assert res is None and len(stub.seen) == 1


def test_overflow_that_leaves_less_than_min_tokens_is_final():
    async def ask(client):
        return await client.ask([{"role": "user", "content": "q"}], sample_id="s", max_tokens=80, context_len=None,
                                seed=1, min_tokens=30)  # 100 - 60 - 16 = 24 < 30

    stub, res = _run(_with_stub(["overflow"], ask))
    assert res is None and len(stub.seen) == 1


def test_prompt_refused_as_too_long_is_a_final_reject_that_reruns_do_not_resend(tmp_path):
    """Issue 20: such items were "errors": every rerun sent them again and exited 2."""
    from data_process.stage3.runner import Checkpoint, Outcome, Task, exit_code, run_tasks

    async def one_run(client):
        stats = Stats()

        async def handle(task):
            res = await client.ask([{"role": "user", "content": task.id}], sample_id=task.id, max_tokens=80,
                                   context_len=None, seed=1, min_tokens=8)
            return Outcome("rejected", "prompt_too_long") if res is None else Outcome("ok", None, {"text": res.text})

        with Checkpoint(str(tmp_path / "out.ckpt.jsonl")) as ckpt:
            done = await run_tasks([Task("long", "k"), Task("short", "k")], handle, ckpt, max_workers=1, stats=stats,
                                   progress=False)
        return done, stats

    async def twice(client):
        return await one_run(client), await one_run(client)

    stub, ((first, stats1), (second, stats2)) = _run(_with_stub(["overflow_engine", "ok"], twice))
    assert first["long"]["status"] == "rejected" and first["long"]["reason"] == "prompt_too_long"
    assert first["short"]["status"] == "ok" and len(stub.seen) == 2  # nothing sent by the second run
    assert stats1.rejected == {"prompt_too_long": 1} and exit_code(stats1) == exit_code(stats2) == 0
    assert stats2.resumed == 2 and second == first


@pytest.mark.parametrize("message, text", [
    ({"content": "\n\nanswer", "reasoning_content": "\n\n"}, "<think>\n\n</think>\n\nanswer"),
    ({"content": "\n\nanswer", "reasoning_content": ""}, "<think>\n\n</think>\n\nanswer"),  # empty thought
    ({"content": "answer", "reasoning_content": None}, "answer"),  # no parser: the field is null
    ({"content": "\n\nanswer", "reasoning": "t"}, "<think>\nt\n</think>\n\nanswer"),  # newer field name
    ({"content": "<think>t</think>a", "reasoning_content": None}, "<think>t</think>a"),
])
def test_reasoning_returned_separately_is_put_back_as_a_think_block(message, text):
    assert message_text(message) == text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_drops_silent_endpoints_and_fails_at_once_when_none_answers():
    async def probe(urls):
        async with ChatClient(urls, model="m") as client:
            return await client.probe(), [e.base_url for e in client.pool.endpoints]

    async def with_models_stub(fn):
        app = web.Application()
        app.router.add_get("/v1/models", lambda r: web.json_response(
            {"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 2048}]}))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            return await fn(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1")
        finally:
            await runner.cleanup()

    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    length, alive = _run(with_models_stub(lambda live: probe([dead, live])))
    assert length == 2048 and alive == [u for u in alive if u != dead] and len(alive) == 1
    started = time.monotonic()
    with pytest.raises(SystemExit, match=r"^error: no server answers at http://127\.0\.0\.1"):
        _run(probe([dead]))
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("script", ["text2image/process.py", "text2image/evaluate.py", "image/process.py",
                                    "image/evaluate.py"])
def test_script_without_a_listening_server_fails_fast_with_one_line(script, tmp_path):
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    inputs = {
        "text2image/process.py": ["--model", "m", "--deepseek_dataset", str(_deepseek_file(tmp_path)),
                                  "--alpaca_dataset", "none", "--output_file", str(tmp_path / "gen.json")],
        "text2image/evaluate.py": ["--model", "m", "--input_file", str(_generated_file(tmp_path)),
                                   "--output_file", str(tmp_path / "judged.json")],
        "image/process.py": ["--data_dir", str(_onevision_file(tmp_path)), "--output_file",
                             str(tmp_path / "glm.parquet")],
        "image/evaluate.py": ["--input_file", str(_answered_file(tmp_path)), "--output_file",
                              str(tmp_path / "final.parquet")],
    }[script]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "data_process" / "stage3" / script), *inputs, "--api_ips", dead,
                           "--no_progress", "--log_level", "ERROR"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and time.monotonic() - started < 60
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no server answers at {dead} ("), proc.stderr


def _deepseek_file(tmp_path: Path) -> Path:
    path = tmp_path / "ds.jsonl"
    path.write_text(json.dumps({"input": "1+1=?", "content": "2", "reasoning_content": "r"}) + "\n")
    return path


def _generated_file(tmp_path: Path) -> Path:
    path = tmp_path / "gen.json"
    path.write_text(json.dumps([{"id": "deepseek-000000/thinking", "query": "1+1=?", "original_output": "2",
                                 "response": "<think>\nadd\n</think>\n\n2", "mode": "thinking"}]))
    return path


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _onevision_file(tmp_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_process.common import OUTPUT_SCHEMA

    path = tmp_path / "vqa.parquet"
    rows = [{"messages": [{"role": "user", "content": "<image>\nWhat colour?"},
                          {"role": "assistant", "content": "Red."}],
             "images": [{"bytes": _png(), "path": None}]}]
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), path)
    return path


def _answered_file(tmp_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_process.stage3.image.process import OUTPUT_SCHEMA

    path = tmp_path / "answered.parquet"
    rows = [{"messages": [{"role": "user", "content": "<image>\nWhat colour?"},
                          {"role": "assistant", "content": "Red."}],
             "images": [{"bytes": _png(), "path": None}], "id": "vqa/vqa.parquet:0", "source": "vqa",
             "source_file": "vqa.parquet", "row": 0, "question": "What colour?", "reference": "Red.",
             "teacher_response": "<think>look</think><answer>Red.</answer>", "teacher_model": "m",
             "finish_reason": "stop", "token_usage": "{}", "seed": 1}]
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), path)
    return path


# ----------------------------------------------------------------------------------------------- vllm_server helper

FAKE_VLLM = '''#!{python}
"""Stands in for `vllm serve MODEL --host H --port P ...`: records its argv/env, answers /health, and
starts a child that must die with it."""
import http.server, json, os, subprocess, sys, time
args = sys.argv[1:]
host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.environ["FAKE_RECORD"], "w") as f:
    json.dump({{"argv": args, "kv": os.environ.get("VLLM_CPU_KVCACHE_SPACE"), "extra": os.environ.get("EXTRA"),
               "child": child.pid}}, f)
if "--die" in args:
    sys.exit(3)
time.sleep(float(os.environ.get("FAKE_DELAY", "0")))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a):
        print("request", self.path, flush=True)
http.server.HTTPServer((host, port), H).serve_forever()
'''


def _alive(pid: int, settle_s: float = 0.0) -> bool:
    import time

    deadline = time.monotonic() + settle_s
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _running(pid)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as handle:  # a zombie is dead too
        return handle.read().split(")")[-1].split()[0] != "Z"


def test_vllm_server_helper_starts_waits_and_stops_the_whole_group(tmp_path, monkeypatch):
    from examples.tiny.vllm_server import VllmStartError, vllm_server

    fake = tmp_path / "vllm"
    fake.write_text(FAKE_VLLM.format(python=sys.executable))
    fake.chmod(0o755)
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_RECORD", str(record))
    log = tmp_path / "logs" / "server.log"
    with vllm_server("some/model", executable=str(fake), extra_args=["--max-num-seqs", "2"], env={"EXTRA": "1"},
                     log_file=log, timeout_s=60) as srv:
        import urllib.request

        assert urllib.request.urlopen(srv.url + "/health").status == 200
        seen = json.loads(record.read_text())
        assert seen["argv"][:2] == ["serve", "some/model"] and seen["argv"][-2:] == ["--max-num-seqs", "2"]
        assert seen["kv"] == "1" and seen["extra"] == "1" and srv.base_url.endswith("/v1")
        assert _alive(seen["child"])
    assert srv.process.poll() is not None and not _alive(seen["child"], settle_s=5)  # the server's children are gone too
    assert "request /health" in log.read_text()
    with pytest.raises(VllmStartError, match="exited with 3"), \
            vllm_server("m", executable=str(fake), extra_args=["--die"], log_file=log, timeout_s=60):
        pass
    monkeypatch.setenv("FAKE_DELAY", "30")
    with pytest.raises(VllmStartError, match="not healthy"), \
            vllm_server("m", executable=str(fake), log_file=log, timeout_s=2, stop_grace_s=2):
        pass


def test_api_key_is_never_logged(caplog, monkeypatch):
    from data_process.stage3 import cli, runner
    from data_process.stage3.image import evaluate

    monkeypatch.setenv(cli.API_KEY_ENV, "sk-from-env")
    args = evaluate.parse_args(["--api_key", "sk-secret-123", "--api_ips", "h1", "h2"])
    with caplog.at_level("INFO"):
        cli.setup(args, "test")
    assert "sk-secret-123" not in caplog.text and '"api_key": "***"' in caplog.text
    assert cli.api_key(args) == "sk-secret-123"
    assert cli.api_key(evaluate.parse_args([])) == "sk-from-env"
    client = runner.make_client(args, Stats())
    assert [e.base_url for e in client.pool.endpoints] == ["http://h1:8000/v1", "http://h2:8000/v1"]
    assert "sk-secret-123" not in repr(vars(client.pool))
