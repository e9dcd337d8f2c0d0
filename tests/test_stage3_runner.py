"""The stage-3 runner (``data_process/stage3/runner.py``): append-only checkpoint, resume, out-of-order
completion and cancellation."""
from __future__ import annotations

import asyncio
import json

import pytest

from data_process.stage3.client import RequestFailed, Stats
from data_process.stage3.runner import Checkpoint, Outcome, Task, run_tasks


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
