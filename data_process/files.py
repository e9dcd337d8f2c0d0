"""Atomic file output, JSON state files, locks and the merged ``dataset_info.json``."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from typing import IO, Any

__all__ = ["atomic_output", "file_lock", "read_json", "update_dataset_info", "write_json_atomic"]


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "w", tmp_path: str | None = None) -> Iterator[IO]:
    """An open temp file that becomes ``path`` (atomic rename) when the block ends without error.

    Readers see the old file or the whole new one. On error the temp file (default ``<path>.partial-<pid>``,
    in the same folder) is removed. Text is UTF-8; a lone surrogate is written as its ``\\udXXX`` escape,
    which inside a JSON string means the same thing, instead of failing the whole file.
    """
    tmp_path = tmp_path or f"{path}.partial-{os.getpid()}"
    for folder in {os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.abspath(tmp_path))}:
        os.makedirs(folder, exist_ok=True)
    text = {} if "b" in mode else {"encoding": "utf-8", "errors": "backslashreplace"}
    try:
        with open(tmp_path, mode, **text) as handle:
            yield handle
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_output(path) as handle:
        json.dump(obj, handle, ensure_ascii=False, indent=2)
        handle.write("\n")


def read_json(path: str, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when there is no such file."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return default


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive ``flock`` on ``path`` (created if needed) for the duration of the block."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_dataset_info(output_dir: str, entries: dict[str, dict], remove: Iterable[str] = ()) -> str:
    """Merge ``entries`` into ``<output_dir>/dataset_info.json`` (and drop ``remove``), under a lock."""
    path = os.path.join(output_dir, "dataset_info.json")
    with file_lock(os.path.join(output_dir, ".tmp", "dataset_info.lock")):
        info = read_json(path, default={})
        for name in remove:
            info.pop(name, None)
        info.update(entries)
        write_json_atomic(path, dict(sorted(info.items())))
    return path
