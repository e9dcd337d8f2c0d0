"""transformers' own model test suite, fetched at test time, never vendored.

`tests/test_modeling_common.py` ships in the transformers sdist on PyPI. `modeling_common()` downloads the sdist of the
installed version (`pip download --no-binary :all:`), extracts only the files the mixin needs into the git-ignored
`.cache/peer-tests/transformers-<version>/hf_peer_tests/`, and imports them from there. The sdist lacks
`tests/generation/test_utils.py`; its `GenerationTesterMixin` is stood in for by an empty mixin, so the generation tests
do not run (ours cover generate()). This module holds no tests.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "peer-tests"
PACKAGE = "hf_peer_tests"
SDIST_FILES = ("tests/test_modeling_common.py",)
EMPTY_GENERATION_MIXIN = '''"""Stand-in for transformers' tests/generation/test_utils.py, which the sdist does not ship."""


class GenerationTesterMixin:
    """Empty: no generation tests run through this peer suite."""
'''


def _fetch(version: str, dest: Path) -> None:
    """Download the sdist and write the package `PACKAGE` under `dest` (atomically: a half-built one is never seen)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--no-binary", ":all:", f"transformers=={version}", "-d", str(work)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        sdists = list(work.glob("transformers-*.tar.gz"))
        if result.returncode != 0 or len(sdists) != 1:
            raise RuntimeError(f"could not download the transformers {version} sdist: "
                               f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
        package = work / "tree" / PACKAGE
        (package / "generation").mkdir(parents=True)
        with tarfile.open(sdists[0]) as tar:
            for name in SDIST_FILES:
                member = tar.getmember(f"transformers-{version}/{name}")
                (package / Path(name).name).write_bytes(tar.extractfile(member).read())
        (package / "__init__.py").write_text(f'"""tests/ of the transformers {version} sdist (fetched, not vendored)."""\n')
        (package / "generation" / "__init__.py").write_text("")
        (package / "generation" / "test_utils.py").write_text(EMPTY_GENERATION_MIXIN)
        try:
            os.replace(work / "tree", dest)
        except OSError:  # fetched concurrently by another process: keep theirs
            if not (dest / PACKAGE).is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def modeling_common():
    """transformers' `tests/test_modeling_common.py` for the installed transformers, as a module."""
    version = transformers.__version__
    root = CACHE / f"transformers-{version}"
    if not (root / PACKAGE / "test_modeling_common.py").is_file():
        _fetch(version, root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")
