"""Stage 1 (frozen vision tower and LLM, only the projector trains) trains the projector under 2-process CPU
DeepSpeed ZeRO-2 and ZeRO-3 with gradient checkpointing on (the recipes' default), and a run whose trainable
parameters get no gradient stops at once with one clear line (the zero-gradient guard of the LLaMA-Factory overlay).

Each run is the real `llamafactory-cli train` of the tiny stage-1 recipe, 2 steps (torchrun, 2 ranks, gloo).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from examples.compare_checkpoints import compare_checkpoints
from examples.tiny.make_tiny_data import make_tiny_data
from tests.test_train_stages import cli_args, losses

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = REPO / "examples" / "deepspeed"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def run_cli(args: list[str], env: dict, log: Path):
    import subprocess

    cli = str(Path(sys.executable).parent / "llamafactory-cli")
    with open(log, "w") as out:
        proc = subprocess.run([cli, *args], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=800,
                              check=False)
    return proc.returncode, log.read_text()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zero_grad")


@pytest.fixture(scope="module")
def env(venv_env, work) -> dict:
    return {**venv_env, "HF_DATASETS_CACHE": str(work / "hf_datasets"), "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def tiny_data(work, sample_images) -> Path:
    return make_tiny_data(work / "data", images=sample_images[0].parent)


@pytest.mark.parametrize("zero", [2, 3])
def test_stage1_with_gradient_checkpointing_trains_the_projector_on_two_ranks(zero, work, env, tiny_data,
                                                                                tiny_merged):
    out = work / f"stage1-zero{zero}"
    code, log = run_cli(cli_args("train", "stage1.yaml", model_name_or_path=tiny_merged, output_dir=out,
                                 dataset_dir=tiny_data, deepspeed=DEEPSPEED / f"ds_z{zero}_config.json",
                                 max_steps=3, per_device_train_batch_size=2),
                        {**env, "FORCE_TORCHRUN": "1", "NNODES": "1", "NPROC_PER_NODE": "2"}, work / f"z{zero}.log")
    assert code == 0, log[-4000:]
    assert f"ZeRO stage {zero}" in log and "world size: 2" in log
    assert "Gradient checkpointing enabled." in log
    assert "zero-gradient guard: gradient norms of the first" in log  # the guard watched, and let it through
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert all(row["loss"] > 0 for row in rows if "loss" in row), rows  # a finite, real loss at every step
    assert len(losses(out)) == 3
    problems = compare_checkpoints(tiny_merged, out).check({"projector"})
    assert not problems, "\n".join(problems)


def test_guard_stops_a_run_whose_trainable_parameters_get_no_gradient(work, env, tiny_data, tiny_merged):
    """A LoRA run with `lora_dropout: 1.0` (meant: 0.1): every LoRA input is dropped, so the adapters, the only
    trainable parameters, get a gradient of exactly 0 at every step while the loss looks normal. The run must stop
    after the guard's steps with one line, not train on for the whole stage and save an unchanged adapter."""
    out = work / "broken"
    code, log = run_cli(cli_args("train", "stage3_lora.yaml", model_name_or_path=tiny_merged, output_dir=out,
                                 dataset_dir=tiny_data, lora_dropout=1.0, max_steps=20, per_device_train_batch_size=2,
                                 zero_grad_guard_steps=2), env, work / "broken.log")
    assert code != 0
    errors = [line for line in log.splitlines() if "zero-gradient guard:" in line]
    assert len(errors) == 1 and "gradient norm of exactly 0 in each of the first 2 steps" in errors[0], log[-3000:]
    assert "Traceback" not in log
    assert len(losses(out)) == 2  # stopped after the guard's 2 steps, not after 20
    assert not (out / "adapter_model.safetensors").exists()  # nothing saved as if it had trained

