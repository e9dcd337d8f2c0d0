"""Session fixtures: tiny real-format checkpoints, built once per content of examples/tiny/tiny_models.py and cached."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from examples.tiny import tiny_models  # noqa: E402

CACHE = Path(os.environ.get("QWEN_MERGE_TEST_CACHE", REPO / ".cache" / "test-fixtures"))


def _digest(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:12]


def _fixture_root() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE / f"models-{_digest(Path(tiny_models.__file__))}"


def _merged(vlm: Path, llm: Path, name: str) -> Path:
    """A tiny Qwen-Merge checkpoint built by merge/model_merger.py, cached by the merger's own sources."""
    from merge import model_merger
    out = _fixture_root() / f"{name}-{_digest(Path(model_merger.__file__), model_merger.CHAT_TEMPLATE_FILE)}"
    if not (out / "config.json").exists():
        model_merger.merge(str(vlm), str(llm), str(out), overwrite=True, quiet=True,
                           image_min_pixels=tiny_models.MIN_PIXELS, image_max_pixels=tiny_models.MAX_PIXELS)
    return out


@pytest.fixture(scope="session")
def fixture_paths() -> dict[str, Path]:
    return tiny_models.build_all(_fixture_root())


@pytest.fixture(scope="session")
def tiny_qwen3(fixture_paths) -> Path:
    """Tiny Qwen3 with tied embeddings (like Qwen3-4B)."""
    return fixture_paths["qwen3"]


@pytest.fixture(scope="session")
def tiny_qwen3_untied(fixture_paths) -> Path:
    """Tiny Qwen3 with a separate lm_head (like Qwen3-8B)."""
    return fixture_paths["qwen3_untied"]


@pytest.fixture(scope="session")
def tiny_qwen25vl(fixture_paths) -> Path:
    """Tiny stock Qwen2.5-VL (flat hub-style config)."""
    return fixture_paths["qwen25vl"]


@pytest.fixture(scope="session")
def tiny_merged(tiny_qwen25vl, tiny_qwen3) -> Path:
    """Tiny Qwen-Merge (tied embeddings, float32, flat key layout as the merger writes it)."""
    return _merged(tiny_qwen25vl, tiny_qwen3, "tiny-merged")


@pytest.fixture(scope="session")
def tiny_merged_untied(tiny_qwen25vl, tiny_qwen3_untied) -> Path:
    """Tiny Qwen-Merge with a separate lm_head."""
    return _merged(tiny_qwen25vl, tiny_qwen3_untied, "tiny-merged-untied")


@pytest.fixture(scope="session")
def tiny_qwen3_moe(fixture_paths) -> Path:
    """Tiny Qwen3-MoE (untied, 6 experts / 2 per token, one dense mlp_only layer)."""
    return fixture_paths["qwen3_moe"]


@pytest.fixture(scope="session")
def tiny_merged_moe(tiny_qwen25vl, tiny_qwen3_moe) -> Path:
    """Tiny Qwen-Merge on the Qwen3-MoE (Qwen-Merge-VL-30B-A3B in miniature)."""
    return _merged(tiny_qwen25vl, tiny_qwen3_moe, "tiny-merged-moe")


@pytest.fixture(scope="session")
def sample_images(fixture_paths) -> list[Path]:
    """Real photos (scikit-image / matplotlib sample data)."""
    return sorted(fixture_paths["images"].iterdir())


@pytest.fixture(scope="session")
def venv_env() -> dict[str, str]:
    """Environment for subprocesses of the stack's CLIs (llamafactory-cli, vllm, torchrun need the venv's bin)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)}


def pytest_configure(config):
    """Markers used by transformers' own test suite, which tests/test_modeling_common_peer.py runs (--strict-markers)."""
    for name in ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "torch_compile_test", "torch_export_test"):
        config.addinivalue_line("markers", f"{name}: marker of transformers' test suite")


@pytest.fixture(autouse=True)
def grad_mode_on():
    """Every test starts with autograd on: a test (or a library it calls) that turns it off must not leak into the
    next one (transformers' own training tests then fail with 'does not require grad')."""
    import torch

    torch.set_grad_enabled(True)
    yield
