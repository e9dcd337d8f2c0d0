"""`llamafactory-cli train` on the tiny stage-2.1 recipe with a Qwen3-MoE merge: the projector and the whole LLM,
routers and experts included, train while the vision tower stays as it was, and `moe_aux_loss_coef` puts the
router loss into the logged loss (same seed and data: the first step's loss rises by coef x aux loss, aux in
[2, 6] for top-2 of 6 experts)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from examples.compare_checkpoints import compare_checkpoints
from examples.tiny.make_tiny_data import make_tiny_data

pytestmark = pytest.mark.timeout(900)
REPO = Path(__file__).resolve().parents[1]
COEF = 10.0


def train(tiny_merged_moe: Path, data: Path, out: Path, env: dict, **overrides) -> list[dict]:
    settings = {"model_name_or_path": tiny_merged_moe, "dataset_dir": data, "output_dir": out, "max_steps": 2,
                **overrides}
    cli = str(Path(sys.executable).parent / "llamafactory-cli")
    proc = subprocess.run([cli, "train", "examples/tiny/stage2.1.yaml", *(f"{k}={v}" for k, v in settings.items())],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_merged_moe, sample_images, venv_env):
    work = tmp_path_factory.mktemp("moe-cli")
    data = make_tiny_data(work / "data", images=sample_images[0].parent)
    env = {**venv_env, "HF_DATASETS_CACHE": str(work / "hf")}
    return {"plain": (train(tiny_merged_moe, data, work / "plain", env, max_steps=1), None),
            "aux": (train(tiny_merged_moe, data, work / "aux", env, moe_aux_loss_coef=COEF), work / "aux")}


def test_stage2_trains_projector_llm_routers_and_experts_but_not_the_vision_tower(runs, tiny_merged_moe):
    """Every router and every non-expert LLM tensor changes; experts change unless no token was routed to them in
    the two steps (no gradient, no weight decay: they stay bit-identical, as in any MoE); the vision tower never."""
    log, out = runs["aux"]
    assert len(log) >= 2 and all(0 < row["loss"] < 1e4 for row in log if "loss" in row)
    comparison = compare_checkpoints(tiny_merged_moe, out)
    is_expert = lambda name: ".mlp.experts." in name  # noqa: E731
    experts_changed = {n for n in comparison.changed if is_expert(n)}
    experts_unchanged = {n for n in comparison.unchanged if is_expert(n)}
    comparison.unchanged -= experts_unchanged
    assert comparison.check({"projector", "language_model", "lm_head"}) == []
    assert len({n for n in comparison.changed if n.endswith(".mlp.gate.weight")}) == 2
    assert len(experts_changed) >= 2 * len(experts_unchanged) and len(experts_changed) % 3 == 0  # whole experts


def test_moe_aux_loss_coef_adds_the_router_loss_to_the_logged_loss(runs):
    plain, aux = runs["plain"][0][0]["loss"], runs["aux"][0][0]["loss"]
    assert 2 * COEF <= aux - plain <= 6 * COEF, (plain, aux)
