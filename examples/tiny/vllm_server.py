"""Start a real ``vllm serve`` subprocess for tests and always stop it.

Usage::

    with vllm_server(model_dir, extra_args=["--max-model-len", "2048"]) as srv:
        requests.get(srv.base_url + "/models")

The executable is looked up next to the running interpreter (the venv's ``bin``), then on PATH.
The server runs in its own process group; on exit the whole group gets SIGTERM, then SIGKILL.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Defaults that keep a CPU server small; callers may override any of them.
CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
DEFAULT_ARGS = ("--max-model-len", "2048", "--enforce-eager", "--dtype", "bfloat16")


class VllmUnavailable(RuntimeError):
    """No ``vllm`` executable could be found (callers usually turn this into a skip)."""


class VllmStartError(RuntimeError):
    """The server exited or did not become healthy in time."""


@dataclass
class VllmServer:
    process: subprocess.Popen
    host: str
    port: int
    model: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-compatible base URL (``.../v1``)."""
        return self.url + "/v1"

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def find_vllm() -> str:
    local = Path(sys.executable).parent / "vllm"
    if local.exists():
        return str(local)
    found = shutil.which("vllm")
    if not found:
        raise VllmUnavailable("no `vllm` executable next to the interpreter or on PATH")
    return found


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def vllm_server(
    model: str | os.PathLike,
    *,
    extra_args: Sequence[str] = (),
    default_args: Sequence[str] = DEFAULT_ARGS,
    env: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    served_model_name: str | None = None,
    log_file: str | os.PathLike | None = None,
    timeout_s: float = 300.0,
    stop_grace_s: float = 20.0,
    executable: str | None = None,
) -> Iterator[VllmServer]:
    """Run ``vllm serve MODEL`` until the block exits; yields a :class:`VllmServer`.

    ``extra_args`` are appended after ``default_args`` (later flags win in argparse), ``env`` is laid over
    the current environment plus :data:`CPU_ENV_DEFAULTS`. The log goes to ``log_file`` (or a temp file).
    ``executable`` replaces the ``vllm`` found next to the interpreter (e.g. a wrapper script).
    """
    exe = executable or find_vllm()
    port = port or free_port(host)
    cmd = [exe, "serve", str(model), "--host", host, "--port", str(port), *default_args, *extra_args]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    full_env = {**os.environ, **CPU_ENV_DEFAULTS, **(env or {})}
    # The venv's bin must be on PATH for anything vLLM spawns.
    full_env["PATH"] = f"{Path(exe).parent}{os.pathsep}{full_env.get('PATH', '')}"
    if log_file is None:
        fd, log_name = tempfile.mkstemp(prefix="vllm_server_", suffix=".log")
        os.close(fd)
        log_path = Path(log_name)
    else:
        log_path = Path(log_file)
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = VllmServer(proc, host, port, served_model_name or str(model), log_path)
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(server.url):
            if proc.poll() is not None:
                raise VllmStartError(f"vllm exited with {proc.returncode}; log {log_path}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise VllmStartError(f"vllm not healthy after {timeout_s:.0f}s; log {log_path}:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(proc, stop_grace_s)


def get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


if __name__ == "__main__":  # manual check: python -m examples.tiny.vllm_server MODEL_DIR
    with vllm_server(sys.argv[1], extra_args=sys.argv[2:]) as srv:
        print(json.dumps(get_json(srv.base_url + "/models"), indent=1))
