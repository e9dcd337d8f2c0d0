"""Stage-3 distillation pieces that need no model server: verdict and format parsing, the checkpoint and
runner (resume, out-of-order completion, cancellation), retry logic against a local stub, rendering and the
dataset schemas."""
from __future__ import annotations

import asyncio
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from PIL import Image, ImageDraw

from data_process.stage3 import render
from data_process.stage3.client import ChatClient, RequestFailed, RetryPolicy, Stats
from data_process.stage3.judge import FormatError, parse_verdict, teacher_answer
from data_process.stage3.runner import Checkpoint, Outcome, Task, run_tasks
from tests.distill_fixtures import alpaca_zh_records, write_alpaca_copy, write_deepseek_copy

# ----------------------------------------------------------------------------------------------- judge


@pytest.mark.parametrize("text, expected", [
    ("The answer matches.\nVERDICT: PASS", ("PASS", None)),
    ("Wrong result.\nVERDICT: FAIL", ("FAIL", None)),
    ("**Verdict:** `pass`", ("PASS", None)),
    ("verdict：FAIL", ("FAIL", None)),  # full-width colon
    ("<think>\nVERDICT: FAIL? no...\n</think>\n\nFine.\nVERDICT: PASS", ("PASS", None)),  # thoughts ignored
    ("<think>\n\n</think>\n\nVERDICT: PASS", ("PASS", None)),  # Qwen3 no-think output
    ("<|begin_of_box|>VERDICT: PASS<|end_of_box|>", ("PASS", None)),
    ("VERDICT: PASS\nVERDICT: PASS", ("PASS", None)),  # repeated but consistent
    ("VERDICT: PASS\nVERDICT: FAIL", (None, "ambiguous_verdict")),
    ("VERDICT: PASS or FAIL", (None, "malformed_verdict")),
    ("VERDICT: PASS or VERDICT: FAIL", (None, "malformed_verdict")),
    ("VERDICT: mostly fine", (None, "malformed_verdict")),
    ("I think it passes.", (None, "no_verdict")),
    ("The answer is excellent, PASS", (None, "no_verdict")),  # the keyword alone is not a verdict line
    ("<think>\nVERDICT: PASS\n", (None, "judge_unclosed_think")),  # thoughts never ended
    ("<think>a</think><think>b</think>VERDICT: PASS", (None, "judge_bad_think_tags")),
    ("", (None, "no_verdict")),
])
def test_parse_verdict(text, expected):
    verdict = parse_verdict(text)
    assert (verdict.value, verdict.reason) == expected


@pytest.mark.parametrize("text, thought_required, expected", [
    ("<think>\nstep\n</think>\n\nanswer", True, ("<think>\nstep\n</think>\n\nanswer", "answer")),
    ("<think>\n\n</think>\n\nanswer", False, ("<think>\n\n</think>\n\nanswer", "answer")),
    ("<think>t</think><answer>A is <|begin_of_box|>4<|end_of_box|></answer>", True,
     ("<think>\nt\n</think>\n\nA is 4", "A is 4")),
    ("<think>\n\n</think>\n\nanswer", True, "empty_thought"),
    ("answer only", False, "no_think_block"),
    ("<think>never closed", False, "unclosed_think"),
    ("<think>a</think>b<think>c</think>d", False, "repeated_think_tags"),
    ("<think>a</think>\n  ", False, "empty_answer"),
    ("<think>a</think><answer>x", False, "bad_answer_tags"),
    ("<think>a</think>see <answer>x</answer>", False, "text_outside_answer"),
    ("<think>a</think><|begin_of_box|>x", False, "unbalanced_box"),
])
def test_teacher_answer(text, thought_required, expected):
    if isinstance(expected, str):
        with pytest.raises(FormatError) as err:
            teacher_answer(text, require_thought=thought_required)
        assert err.value.reason == expected
    else:
        training, answer, _ = teacher_answer(text, require_thought=thought_required)
        assert (training, answer) == expected


# ----------------------------------------------------------------------------------------------- runner

def _run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_verdicts_follow_ids_under_out_of_order_completion(tmp_path):
    """Later tasks finish first; every verdict must still belong to its own item (the original zipped
    completion order with submission order)."""
    items = [{"id": f"item-{i}", "value": i} for i in range(12)]
    completion_order = []

    async def judge(task):
        await asyncio.sleep(0.002 * (12 - task.data["value"]))  # reverse completion order
        completion_order.append(task.id)
        ok = task.data["value"] % 3 == 0
        return Outcome("ok" if ok else "rejected", None if ok else "judged_fail", {"echo": task.data["value"]})

    tasks = [Task(it["id"], "k", it) for it in items]
    with Checkpoint(str(tmp_path / "ck.jsonl")) as ckpt:
        done = _run(run_tasks(tasks, judge, ckpt, max_workers=12, stats=Stats(), progress=False))
    assert completion_order != [t.id for t in tasks]
    for it in items:
        assert done[it["id"]]["result"]["echo"] == it["value"]
        assert (done[it["id"]]["status"] == "ok") == (it["value"] % 3 == 0)


def test_checkpoint_resume_skips_done_and_resends_errors(tmp_path):
    path = tmp_path / "ck.jsonl"
    calls, failures_left = [], {"b": 1}

    async def flaky(task):
        calls.append(task.id)
        if failures_left.get(task.id):
            failures_left[task.id] -= 1
            raise RequestFailed("timeout", "gave up")
        return Outcome("ok", None, {"n": len(calls)})

    tasks = [Task(i, "key1") for i in "abc"]
    stats = Stats()
    with Checkpoint(str(path)) as ckpt:
        first = _run(run_tasks(tasks, flaky, ckpt, max_workers=2, stats=stats, progress=False))
    assert first["b"]["status"] == "error" and stats.failed == {"timeout": 1}
    path.write_bytes(path.read_bytes() + b'{"id": "c", "status": "ok", "ke')  # torn tail of a killed write
    calls.clear()
    stats = Stats()
    with Checkpoint(str(path)) as ckpt:
        second = _run(run_tasks(tasks, flaky, ckpt, max_workers=2, stats=stats, progress=False))
    assert calls == ["b"] and stats.resumed == 2  # only the failed item is sent again
    assert second["a"] == first["a"] and second["b"]["status"] == "ok"
    assert all(json.loads(line) for line in path.read_text().splitlines())  # torn line was cut off
    # A changed request (new key) is not "done".
    calls.clear()
    with Checkpoint(str(path)) as ckpt:
        _run(run_tasks([Task("a", "key2")], flaky, ckpt, max_workers=1, stats=Stats(), progress=False))
    assert calls == ["a"]


def test_cancel_leaves_only_finished_items(tmp_path):
    path = tmp_path / "ck.jsonl"

    async def slow(task):
        await asyncio.sleep(0.01 if int(task.id) < 3 else 30)
        return Outcome("ok", None, {})

    async def main():
        with Checkpoint(str(path)) as ckpt:
            job = asyncio.ensure_future(run_tasks([Task(str(i), "k") for i in range(6)], slow, ckpt,
                                                  max_workers=6, stats=Stats(), progress=False))
            await asyncio.sleep(0.5)
            job.cancel()
            with pytest.raises(asyncio.CancelledError):
                await job

    _run(main())
    assert sorted(json.loads(line)["id"] for line in path.read_text().splitlines()) == ["0", "1", "2"]


def test_duplicate_task_ids_are_refused(tmp_path):
    async def ok(task):
        return Outcome("ok")

    with Checkpoint(str(tmp_path / "ck.jsonl")) as ckpt, pytest.raises(ValueError, match="duplicate"):
        _run(run_tasks([Task("x", "k"), Task("x", "k")], ok, ckpt, max_workers=1, stats=Stats(), progress=False))


# ----------------------------------------------------------------------------------------------- client

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
        if action == "overflow":
            return web.json_response({"message": "This model's maximum context length is 100 tokens. However, you "
                                                 "requested 140 tokens (60 in the messages, 80 in the completion)."},
                                     status=400)
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


def test_endpoint_choice():
    from data_process.stage3.client import EndpointPool

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


# ----------------------------------------------------------------------------------------------- render

QUESTION = ("计算定积分 ∫₀¹ x² dx，并说明每一步。\nThen explain, in English, why the result is 1/3 — "
            "and check it with code:\n```python\nprint(sum((i / 1000) ** 2 for i in range(1000)) / 1000)\n```")


def _ink_rows(png: bytes) -> np.ndarray:
    image = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.int16)
    return np.abs(image - np.median(image)).max(axis=1) > 60


def test_render_draws_the_question_itself():
    config = render.RenderConfig()
    out = render.render_text(QUESTION, config, random.Random(1))
    fonts, mono = render.font_sets(config)
    # Every character of the question has a real glyph in the font that draws it.
    assert not fonts.missing(QUESTION) and not mono.missing(QUESTION)
    # The laid-out lines cover the whole text: only whitespace is dropped at soft line breaks.
    covered = list(out.text)
    for line in out.lines:
        covered[line.start:line.end] = [None] * (line.end - line.start)
    assert all(c is None or c.isspace() for c in covered)
    assert out.text.split("\n")[0] in "".join(out.line_texts())  # CJK + formula line kept whole
    assert any(t.strip().startswith("print(sum(") for t in out.line_texts())  # code kept
    # Pixel check: redraw each line's text with PIL directly and compare it with the page.
    page = np.asarray(Image.open(io.BytesIO(out.pages[0])).convert("RGB"))
    background, ink = out.colors
    ref = Image.new("RGB", (config.width, page.shape[0]), background)
    draw = ImageDraw.Draw(ref)
    for row, line in enumerate(out.lines):
        fs = mono if line.mono else fonts
        x, y = float(config.margin), config.margin + row * config.line_height + round(
            (config.line_height - config.font_size) / 2 + config.font_size * 0.8)
        for i, piece in fs.runs(out.text[line.start:line.end]):
            draw.text((x, y), piece, font=fs.font(i), fill=ink, anchor="ls")
            x += fs.font(i).getlength(piece)
    assert np.array_equal(np.asarray(ref), page)
    # ... and a different text gives a different image.
    other = render.render_text(QUESTION.replace("1/3", "2/3"), config, random.Random(1))
    assert other.pages[0] != out.pages[0]
    assert render.contrast_ratio(*out.colors) >= config.min_contrast


def test_render_never_cuts_long_text():
    config = render.RenderConfig(max_pages=50)
    text = "\n".join(f"第{i}行：这是一段很长的题目文字，用来检查换行和分页。line {i} with latin words" for i in range(60))
    out = render.render_text(text, config, random.Random(0))
    assert len(out.pages) > 1
    for png in out.pages:
        with Image.open(io.BytesIO(png)) as image:
            assert image.width * image.height <= config.max_pixels
            assert image.width == config.width
    assert out.text.endswith("line 59 with latin words") and out.lines[-1].end == len(out.text)
    assert sum(_ink_rows(p).any() for p in out.pages) == len(out.pages)  # every page has ink
    with pytest.raises(render.RenderError, match="too_long"):
        render.render_text(text, render.RenderConfig(max_pages=2), random.Random(0))


def test_render_refuses_characters_without_glyph_and_seeds_colours():
    with pytest.raises(render.RenderError) as err:
        render.render_text("question \U000f0000", render.RenderConfig(), random.Random(0))  # private-use plane
    assert err.value.reason == "missing_glyphs"
    a = render.render_text("same", render.RenderConfig(), random.Random(7))
    b = render.render_text("same", render.RenderConfig(), random.Random(7))
    assert a.pages == b.pages


def test_font_discovery_honours_explicit_font(monkeypatch):
    dejavu = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    if not os.path.exists(dejavu):
        pytest.skip("DejaVu Sans not installed")
    monkeypatch.setenv(render.FONT_ENV, dejavu)
    faces = render.font_candidates()
    assert faces[0] == render.FontFace(dejavu)
    assert any("wqy" in f.path or "Noto" in f.path or "CJK" in f.path for f in faces), "no CJK font found"
    with pytest.raises(render.RenderError, match="font_not_found"):
        render.font_candidates(("/no/such/font.ttf",))


def test_language_detection():
    assert render.language_of("识别并解释细胞理论和日心说。") == "zh"
    assert render.language_of("Explain the theory of cells.") == "en"
    assert render.language_of("翻译成中文：The fox jumps") == "zh"  # a Chinese request about English text
    assert render.language_of("Translate this word: 猫") == "en"
    assert render.language_of("用Python写一个排序函数") == "zh"


# ----------------------------------------------------------------------------------------------- data

def test_text_sources_use_the_real_answer_fields(tmp_path):
    records = alpaca_zh_records(6)
    if not records:
        pytest.skip("no alpaca_zh sample data")
    from data_process.stage3.text2image import process

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


def test_wrong_schema_is_an_error_not_an_empty_reference(tmp_path):
    from data_process.stage3.text2image import process

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "q", "output": "a"}) + "\n")  # `output` instead of `content`
    args = process.parse_args(["--model", "m", "--deepseek_dataset", str(bad), "--alpaca_dataset", "none"])
    with pytest.raises(SystemExit, match="content"):
        process.load_queries(args)


def test_scripts_show_help_without_a_server():
    for rel in ("text2image/process.py", "text2image/evaluate.py", "text2image/convert.py", "image/process.py",
                "image/evaluate.py"):
        path = Path(__file__).resolve().parent.parent / "data_process" / "stage3" / rel
        proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        assert ("--input_pattern" if rel.endswith("convert.py") else "--api_ips") in proc.stdout


# ----------------------------------------------------------------------------------------------- vllm_server

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
    from tests.vllm_server import VllmStartError, vllm_server

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
    from data_process.stage3 import cli
    from data_process.stage3.image import evaluate

    monkeypatch.setenv(cli.API_KEY_ENV, "sk-from-env")
    args = evaluate.parse_args(["--api_key", "sk-secret-123", "--api_ips", "h1", "h2"])
    with caplog.at_level("INFO"):
        cli.setup(args, "test")
    assert "sk-secret-123" not in caplog.text and '"api_key": "***"' in caplog.text
    assert cli.api_key(args) == "sk-secret-123"
    assert cli.api_key(evaluate.parse_args([])) == "sk-from-env"
    client = cli.make_client(args, Stats())
    assert [e.base_url for e in client.pool.endpoints] == ["http://h1:8000/v1", "http://h2:8000/v1"]
    assert "sk-secret-123" not in repr(vars(client.pool))
