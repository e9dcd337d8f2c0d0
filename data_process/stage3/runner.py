"""Run many requests with bounded concurrency, an append-only checkpoint and resume; and the one driver of
the four request-making stage-3 scripts (:class:`Step`, :func:`run_step`).

Checkpoint: one JSON line per finished task ``{"id", "key", "status", "reason", "result"}``, written with a
single ``write`` as soon as the task ends. A killed run leaves whole lines (a torn last line is detected and
cut off on the next start). ``status`` is ``ok`` or ``rejected`` (a final answer: never sent again) or
``error`` (retries exhausted: sent again by the next run). ``key`` is a hash of what defines the request;
a line whose key no longer matches (changed input, model or parameters) does not count as done.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm import tqdm

from . import cli
from .client import ChatClient, RequestFailed, RetryPolicy, Stats, endpoint_urls
from .records import checkpoint_path, require_paths, stats_path, write_json_atomic

log = logging.getLogger(__name__)

FINAL_STATUSES = ("ok", "rejected")
EXIT_INTERRUPTED = 130


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stable_unit(*parts: Any) -> float:
    """A number in [0, 1) that depends only on ``parts`` (no shared RNG state across tasks)."""
    return int(fingerprint(*parts), 16) / 16 ** 16


def stable_seed(*parts: Any) -> int:
    return int(fingerprint(*parts), 16) % (2 ** 31 - 1)


@dataclass
class Task:
    id: str
    key: str  # fingerprint of the request-defining content
    data: dict = field(default_factory=dict)


@dataclass
class Outcome:
    status: str  # "ok" or "rejected"
    reason: str | None = None
    result: dict = field(default_factory=dict)


class Checkpoint:
    """Append-only JSONL keyed by task id (the last valid line of an id wins)."""

    def __init__(self, path: str):
        self.path = path
        self.records: dict[str, dict] = {}
        self.bad_lines = 0
        self._fd: int | None = None

    def open(self) -> Checkpoint:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        good_end = 0
        if os.path.exists(self.path):
            with open(self.path, "rb") as handle:
                for line in handle:
                    if not line.endswith(b"\n"):
                        break  # torn tail of a killed write
                    try:
                        record = json.loads(line)
                        self.records[record["id"]] = record
                    except (ValueError, KeyError, TypeError):
                        self.bad_lines += 1
                    good_end += len(line)
            if good_end != os.path.getsize(self.path):
                log.warning("%s: dropping a torn last line", self.path)
                os.truncate(self.path, good_end)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self

    def done(self, task: Task) -> dict | None:
        record = self.records.get(task.id)
        if record and record.get("status") in FINAL_STATUSES and record.get("key") == task.key:
            return record
        return None

    def append(self, record: dict) -> None:
        assert self._fd is not None, "checkpoint not open"
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.records[record["id"]] = record

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Checkpoint:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


Handler = Callable[[Task], Awaitable[Outcome]]


async def run_tasks(tasks: Iterable[Task], handler: Handler, checkpoint: Checkpoint, *, max_workers: int,
                    stats: Stats, desc: str = "requests", total: int | None = None,
                    progress: bool = True) -> dict[str, dict]:
    """Run ``handler`` on every task not already done; return ``{id: checkpoint record}`` for all tasks.

    Tasks are pulled lazily, so at most ``max_workers`` are in memory and in flight at once. On
    cancellation (Ctrl-C / SIGTERM via :func:`run_main`) the in-flight tasks are cancelled without writing
    anything, so the checkpoint holds exactly the finished tasks.
    """
    if max_workers < 1:
        raise ValueError("max_workers must be >= 1")
    semaphore = asyncio.Semaphore(max_workers)
    seen: set[str] = set()
    results: dict[str, dict] = {}
    in_flight: set[asyncio.Task] = set()
    bar = tqdm(total=total, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)

    async def one(task: Task) -> None:
        try:
            try:
                outcome = await handler(task)
                record = {"id": task.id, "key": task.key, "status": outcome.status, "reason": outcome.reason,
                          "result": outcome.result}
                if outcome.status == "ok":
                    stats.ok += 1
                else:
                    stats.rejected[outcome.reason or "unspecified"] += 1
            except RequestFailed as err:
                record = {"id": task.id, "key": task.key, "status": "error", "reason": err.reason,
                          "detail": err.detail, "result": {}}
                stats.failed[err.reason] += 1
            # No await between the answer and this line: cancellation cannot split them.
            checkpoint.append(record)
            results[task.id] = record
            bar.update(1)
        finally:
            semaphore.release()

    try:
        for task in tasks:
            if task.id in seen:
                raise ValueError(f"duplicate task id {task.id!r}")
            seen.add(task.id)
            stats.items += 1
            record = checkpoint.done(task)
            if record is not None:
                stats.resumed += 1
                results[task.id] = record
                bar.update(1)
                continue
            await semaphore.acquire()
            job = asyncio.create_task(one(task))
            in_flight.add(job)
            job.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*in_flight)
    except BaseException:
        for job in in_flight:
            job.cancel()
        await asyncio.gather(*in_flight, return_exceptions=True)
        raise
    finally:
        bar.close()
    return results


def run_main(coro_factory: Callable[[], Awaitable[Any]]) -> Any:
    """Run the script's coroutine; SIGINT/SIGTERM cancel it cleanly (exit 130 after a final report)."""
    loop = asyncio.new_event_loop()
    main = loop.create_task(coro_factory())
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    try:
        return loop.run_until_complete(main)
    except asyncio.CancelledError:
        log.warning("interrupted: the checkpoint holds every finished item; run again to resume")
        sys.exit(EXIT_INTERRUPTED)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def report(stats: Stats, path: str | None, **extra: Any) -> dict:
    """Log the final statistics and save them next to the output (``<output>.stats.json``)."""
    data = {**stats.as_dict(), **extra}
    log.info("stats: %s", json.dumps(data, ensure_ascii=False))
    print(json.dumps(data, ensure_ascii=False, indent=1), file=sys.stderr)
    if path:
        write_json_atomic(path, data)
    return data


# ----------------------------------------------------------------------------------------------- the driver

class Step(Protocol):
    """What one request-making script owns; :func:`run_step` does the rest (flags checked, logging, client,
    server probe, checkpoint and resume, signals, statistics, exit code)."""

    name: str  # logger name, e.g. "image.evaluate"
    desc: str  # progress-bar label

    def parse_args(self, argv: list[str] | None) -> argparse.Namespace: ...

    def inputs(self, args: argparse.Namespace) -> list[str]:
        """Input paths that must exist (checked before anything else)."""

    def output(self, args: argparse.Namespace) -> str: ...

    def tasks(self, args: argparse.Namespace, stats: Stats) -> tuple[Iterable[Task], int]:
        """The tasks (may be a lazy iterable) and how many there are; local rejects go to ``stats``."""

    async def handle(self, client: ChatClient, task: Task, context_len: int | None,
                     args: argparse.Namespace) -> Outcome: ...

    def write(self, tasks: Iterable[Task], done: dict[str, dict], args: argparse.Namespace, stats: Stats,
              log: logging.Logger) -> None:
        """Write the output from the checkpoint records ``done`` (joined by task id)."""


def run_step(step: Step, argv: list[str] | None = None) -> int:
    """Run a :class:`Step` as a script; return its exit code (0, 2 when items failed after all retries)."""
    args = step.parse_args(argv)
    require_paths(*step.inputs(args))
    log = cli.setup(args, step.name)

    async def main() -> int:
        stats = Stats()
        output = step.output(args)
        with final_report(stats, output):
            tasks, total = step.tasks(args, stats)
            done = await run_requests(args, stats, tasks, step, output, total)
            step.write(tasks, done, args, stats, log)
        return exit_code(stats)

    with one_line_os_errors():
        return run_main(main)


@contextlib.contextmanager
def one_line_os_errors():
    """A file-system mistake (missing input, output folder that is a file, no permission, disk full) ends the
    script with one line naming the path, not a traceback."""
    try:
        yield
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        what = err.strerror or str(err)
        if isinstance(err, FileExistsError) and err.filename and os.path.isfile(err.filename):
            what = "is a file, not a folder"
        raise SystemExit(f"error: {where}{what}") from None


def make_client(args: argparse.Namespace, stats: Stats) -> ChatClient:
    return ChatClient(
        endpoint_urls(args.api_ips, args.api_base_template), model=args.model, api_key=cli.api_key(args),
        endpoint_policy=args.endpoint_policy,
        retry=RetryPolicy(args.max_retries, args.retry_base_delay, args.retry_max_delay),
        request_timeout=args.request_timeout, timeout_per_token=args.timeout_per_token,
        extra_body=args.extra_body, stats=stats, seed=args.seed, context_margin=args.context_margin)


async def run_requests(args: argparse.Namespace, stats: Stats, tasks: Iterable[Task], step: Step, output: str,
                       total: int) -> dict[str, dict]:
    """Open the client, probe the servers (their context length), run ``tasks`` against ``<output>.ckpt.jsonl``."""
    async with make_client(args, stats) as client:
        server_len = await client.probe()  # fails at once, with one line, when no endpoint answers
        context_len = args.max_model_len or server_len
        log.info("%d tasks, server context length %s", total, context_len)

        async def handle(task: Task) -> Outcome:
            return await step.handle(client, task, context_len, args)

        with Checkpoint(checkpoint_path(output)) as ckpt:
            return await run_tasks(tasks, handle, ckpt, max_workers=args.max_workers, stats=stats, desc=step.desc,
                                   total=total, progress=not args.no_progress)


@contextlib.contextmanager
def final_report(stats: Stats, output: str):
    """Print and save the statistics when the block ends, however it ends (except a one-line usage error
    before any request: ``SystemExit`` passes through alone)."""
    try:
        yield
    except SystemExit:
        if stats.items:  # work had started: say what was done
            report(stats, stats_path(output), interrupted=True)
        raise
    except BaseException:
        report(stats, stats_path(output), interrupted=True)
        raise
    report(stats, stats_path(output), interrupted=False)


def exit_code(stats: Stats) -> int:
    """0, or 2 when some items failed after all retries (a rerun sends them again)."""
    return 2 if stats.failed else 0
