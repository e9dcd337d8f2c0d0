"""Image paths of JSON inputs: only files below declared image roots are read (symlinks and ``..`` resolved
first), so a dataset cannot make the tools read anything else on the machine."""

from __future__ import annotations

import os
from collections.abc import Iterable

from .errors import Reject

__all__ = ["IMAGE_ROOTS_ENV", "image_roots", "read_image_file", "resolve_image_path"]

IMAGE_ROOTS_ENV = "QWEN_MERGE_IMAGE_ROOTS"


def image_roots(paths: Iterable[str] | None) -> tuple[str, ...]:
    """Resolved image roots: ``paths`` if given, else ``$QWEN_MERGE_IMAGE_ROOTS`` (``os.pathsep``-joined)."""
    paths = list(paths or [])
    if not paths and os.environ.get(IMAGE_ROOTS_ENV):
        paths = [p for p in os.environ[IMAGE_ROOTS_ENV].split(os.pathsep) if p]
    return tuple(os.path.realpath(p) for p in paths)


def _is_below(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def resolve_image_path(path: str, roots: tuple[str, ...], bases: tuple[str, ...] = ()) -> str:
    """The real path of image ``path`` if it lies below one of ``roots``.

    A relative ``path`` is tried below each of ``bases`` (default: the roots). Symlinks and ``..`` are
    resolved before the check, so nothing outside the roots can be read.
    """
    if not roots:
        raise Reject("image_path_outside_roots", f"{path}: no image roots declared")
    candidates = [path] if os.path.isabs(path) else [os.path.join(base, path) for base in bases or roots]
    inside = False
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if not any(_is_below(real, root) for root in roots):
            continue
        inside = True
        if os.path.isfile(real):
            return real
    raise Reject("image_not_found" if inside else "image_path_outside_roots", path)


def read_image_file(path: str, roots: tuple[str, ...], bases: tuple[str, ...] = ()) -> bytes:
    """The bytes of image ``path`` (see ``resolve_image_path``)."""
    with open(resolve_image_path(path, roots, bases), "rb") as handle:
        return handle.read()