"""Helpers of the stage-3 distillation tests: tiny datasets in the real schemas, a fault-injecting proxy in
front of a real server, script runners and a 2-step LLaMA-Factory training run."""
from __future__ import annotations

import asyncio
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from examples.tiny.vllm_server import VllmUnavailable, vllm_server

REPO = Path(__file__).resolve().parent.parent
REPLIES = REPO / "tests" / "data" / "replies"
ALPACA_ZH = Path("/work/shared/fixtures/llamafactory-mllm-demo/alpaca_zh_demo.json")
LOCAL_ALPACA_ZH = REPO / "tests" / "data" / "alpaca_zh_sample.json"
SAMPLE_HEADER = "X-Sample-Id"

# Guided decoding keeps a random tiny model's output in the formats the pipeline expects.
TEACHER_REGEX = r"<think>\n[a-z]{1,6}( [a-z]{1,6}){0,2}\n</think>\n\n[a-z]{1,6}( [a-z]{1,6}){0,2}"
JUDGE_REGEX = r"[a-z]{1,6}( [a-z]{1,6})?\.\nVERDICT: (PASS|FAIL)"
PASS_JUDGE_REGEX = r"[a-z]{1,6}( [a-z]{1,6})?\.\nVERDICT: PASS"  # a judge that accepts everything
GLM_REGEX = (r"<think>[a-z]{1,6}( [a-z]{1,6})?</think><answer>[a-z]{1,6}"
             r"( <\|begin_of_box\|>[a-z]{1,3}<\|end_of_box\|>)?</answer>")


# float32: guided decoding needs vLLM's V0 engine on CPU (V1's bf16 logits crash xgrammar's CPU kernel);
# the engine runs in the API server's process (one process less to start).
SERVER_ARGS = ("--dtype", "float32", "--disable-frontend-multiprocessing")


def module_server(model_fixture: str, extra_args: tuple[str, ...] = ()):
    """A module-scoped fixture running ``vllm serve`` on the model given by the fixture ``model_fixture``
    (fails where vLLM is not installed: the stack is part of the install); use as
    ``server = module_server("tiny_qwen3")``."""

    @pytest.fixture(scope="module")
    def server(request, tmp_path_factory):
        model = request.getfixturevalue(model_fixture)
        try:
            with vllm_server(model, extra_args=(*SERVER_ARGS, *extra_args),
                             log_file=tmp_path_factory.mktemp("vllm") / "server.log") as srv:
                yield srv
        except VllmUnavailable as err:
            pytest.fail(f"vLLM is part of the stack (install.sh): {err}")

    return server


def guided(regex: str) -> str:
    return json.dumps({"guided_regex": regex})


def alpaca_zh_records(n: int) -> list[dict]:
    """Real Chinese alpaca records: the shared fixture, else the small copy kept in tests/data."""
    for path in (ALPACA_ZH, LOCAL_ALPACA_ZH):
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))[:n]
    return []


def write_deepseek_copy(root: Path, records: list[dict]) -> Path:
    """A local copy in the layout of Congliu/Chinese-DeepSeek-R1-Distill-data-110k (JSONL, answer in `content`)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "distill_r1_110k.jsonl", "w", encoding="utf-8") as handle:
        for i, rec in enumerate(records):
            row = {"input": rec["instruction"] + (("\n" + rec["input"]) if rec["input"] else ""),
                   "content": rec["output"], "reasoning_content": f"思考过程 {i}", "repo_name": "fixture",
                   "score": 10}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return root


def write_alpaca_copy(root: Path, records: list[dict]) -> Path:
    """A local copy in the hub layout of tatsu-lab/alpaca (``data/train-*.parquet``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True, exist_ok=True)
    rows = [{**r, "text": f"{r['instruction']}\n{r['input']}\n{r['output']}"} for r in records]
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "train-00000-of-00001.parquet")
    return root


def write_onevision_copy(root: Path, image_paths: list[Path], questions: list[tuple[str, str]],
                         shards: int = 2) -> Path:
    """OneVision-converted output: ``<root>/<name>/<name>-0000i-of-0000n.parquet`` in the sharegpt schema."""
    sys.path.insert(0, str(REPO))
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_process.common import OUTPUT_SCHEMA

    name = "fixture_vqa"
    (root / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (question, answer) in enumerate(questions):
        image = Path(image_paths[i % len(image_paths)]).read_bytes()
        rows.append({"messages": [{"role": "user", "content": f"<image>\n{question}"},
                                  {"role": "assistant", "content": answer}],
                     "images": [{"bytes": image, "path": None}]})
    rows.append({"messages": [{"role": "user", "content": "text only, no image"},
                              {"role": "assistant", "content": "x"}], "images": []})  # invalid: no image
    per = -(-len(rows) // shards)
    for s in range(shards):
        part = rows[s * per:(s + 1) * per]
        pq.write_table(pa.Table.from_pylist(part, schema=OUTPUT_SCHEMA),
                       root / name / f"{name}-{s:05d}-of-{shards:05d}.parquet")
    return root


# ----------------------------------------------------------------------------------------------- recorded replies

def recorded_reply(name: str) -> dict:
    """A recorded chat completion (``tests/data/replies/<name>.json``, the body a real server returned)."""
    return json.loads((REPLIES / f"{name}.json").read_text(encoding="utf-8"))["response"]


def with_message(real: dict, message: dict, finish_reason: str) -> dict:
    """The real server's answer with its message and finish reason replaced (id, model and usage kept)."""
    out = json.loads(json.dumps(real))
    out["choices"][0]["message"] = message
    out["choices"][0]["finish_reason"] = finish_reason
    return out


def as_recorded(real: dict, name: str) -> dict:
    """The real answer rewritten into the recorded reply ``name`` (what that model/server would have said)."""
    choice = recorded_reply(name)["choices"][0]
    return with_message(real, choice["message"], choice["finish_reason"])


# ----------------------------------------------------------------------------------------------- proxy

@dataclass
class ProxyEvent:
    sample_id: str
    path: str
    fault: str | None
    status: int | None
    request: dict | None = None
    response: dict | None = None
    upstream: dict | None = None  # the server's own answer where ``rewrite`` replaced it


@dataclass
class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of ``upstream`` that fails every ``fail_every``-th POST.

    Faults, taken in turn from ``faults``: ``reset`` (connection dropped before forwarding); ``http_5xx``
    answers without forwarding; ``lost`` (forwarded and computed, then the connection is dropped);
    ``truncated`` (a cut-off 200 body); ``delay`` (held ``delay_s``, past the client timeout, then
    forwarded). ``latency_s`` delays every request (reorders completions, keeps work in flight).
    ``rewrite(sample_id, body)`` may replace a real 200 chat answer by another body (recorded formats keyed by
    the sample); the event keeps both (``upstream`` is what the server said).
    """

    upstream: str
    fail_every: int = 0  # 0: never fail; 5: every fifth POST (20 %)
    faults: tuple[str, ...] = ("reset", "http_503", "lost", "truncated", "http_500", "delay", "http_502")
    delay_s: float = 6.0
    latency_s: tuple[float, float] = (0.0, 0.0)
    seed: int = 0
    rewrite: object = None  # callable(sample_id, body) -> body | None
    events: list[ProxyEvent] = field(default_factory=list)

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._lock = threading.Lock()
        self._posts = 0
        self.port = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        app = web.Application(client_max_size=64 * 2 ** 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    def _choose(self) -> str | None:
        with self._lock:
            self._posts += 1
            if not self.fail_every or self._posts % self.fail_every:
                return None
            return self.faults[(self._posts // self.fail_every - 1) % len(self.faults)]

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, bytes, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        async with self._session.request(request.method, self.upstream + request.path_qs, data=body,
                                         headers=headers) as resp:
            return resp.status, await resp.read(), resp.content_type

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = self._choose() if request.method == "POST" else None
        event = ProxyEvent(request.headers.get(SAMPLE_HEADER, ""), request.path, fault, None,
                           _json_or_none(body))
        self.events.append(event)
        lo, hi = self.latency_s
        if hi > 0:
            await asyncio.sleep(self._rng.uniform(lo, hi))
        if fault in ("http_500", "http_502", "http_503"):
            event.status = int(fault[-3:])
            return web.Response(status=event.status, text="injected fault")
        if fault == "reset":
            request.transport.abort()
            return web.Response(status=500)
        if fault == "delay":
            await asyncio.sleep(self.delay_s)
        status, payload, ctype = await self._forward(request, body)
        event.status = status
        event.response = _json_or_none(payload)
        if self.rewrite is not None and status == 200 and request.path.endswith("/chat/completions"):
            new = self.rewrite(event.sample_id, event.response)
            if new is not None:
                event.upstream, event.response = event.response, new
                payload = json.dumps(new).encode()
        if fault == "lost":
            request.transport.abort()
            return web.Response(status=500)
        if fault == "truncated":
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            resp.content_length = len(payload)
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
            request.transport.abort()
            return resp
        return web.Response(status=status, body=payload, content_type=ctype or "application/json")

    def faults_seen(self) -> list[str]:
        return [e.fault for e in self.events if e.fault]

    def chat_events(self) -> list[ProxyEvent]:
        return [e for e in self.events if e.path.endswith("/chat/completions")]


def _json_or_none(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------- runs

def script(*parts: str) -> str:
    return str(REPO / "data_process" / "stage3" / Path(*parts))


def run_script(args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a stage-3 script with the venv's interpreter; fail with its output on a non-zero exit."""
    cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def start_script(args: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until ``path`` has at least ``n`` complete lines (or the process ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = path.read_bytes().count(b"\n") if path.exists() else 0
        if count >= n or proc.poll() is not None:
            return count
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout}s")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- training

def session_outputs(tmp_path_factory) -> Path:
    """Where the e2e modules leave their final parquet files, so that a single 2-step LLaMA-Factory run
    (in the vision module, which runs after the text module) can train on the outputs of both pipelines."""
    path = tmp_path_factory.getbasetemp() / "distill_outputs"
    path.mkdir(exist_ok=True)
    return path


LF_TRAIN_YAML = """\
model_name_or_path: {model}
image_max_pixels: 50176
trust_remote_code: true
stage: sft
do_train: true
finetuning_type: full
freeze_vision_tower: true
dataset: {datasets}
dataset_dir: {dataset_dir}
template: qwen2_vl
cutoff_len: 1024
overwrite_cache: true
preprocessing_num_workers: 1
dataloader_num_workers: 0
output_dir: {output_dir}
logging_steps: 1
save_steps: 1000
overwrite_output_dir: true
save_only_model: true
report_to: none
per_device_train_batch_size: 1
gradient_accumulation_steps: 1
learning_rate: 1.0e-4
max_steps: 2
bf16: false
fp16: false
"""


def llamafactory_train(model: Path, parquet_files: dict[str, Path], work: Path, env: dict,
                       timeout: float = 300) -> subprocess.CompletedProcess:
    """2 training steps of ``llamafactory-cli train`` on the given sharegpt parquet files."""
    data_dir = work / "lf_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, path in parquet_files.items():
        target = data_dir / f"{name}.parquet"
        target.write_bytes(Path(path).read_bytes())
        info[name] = {"file_name": target.name, "formatting": "sharegpt",
                      "columns": {"messages": "messages", "images": "images"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant"}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=1))
    config = work / "train.yaml"
    config.write_text(LF_TRAIN_YAML.format(model=model, datasets=",".join(parquet_files), dataset_dir=data_dir,
                                           output_dir=work / "lf_out"))
    exe = str(Path(sys.executable).parent / "llamafactory-cli")
    proc = subprocess.run([exe, "train", str(config)], capture_output=True, text=True, timeout=timeout, check=False,
                          env={**env, "DISABLE_VERSION_CHECK": "1"}, cwd=work)
    if proc.returncode != 0:
        raise AssertionError(f"llamafactory-cli failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc
