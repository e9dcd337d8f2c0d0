"""Stage 1 (frozen vision tower and LLM, only the projector trains) trains the projector under 2-process CPU
DeepSpeed ZeRO-2 and ZeRO-3 with gradient checkpointing on (the recipes' default), and a run whose trainable
parameters get no gradient stops at once with one clear line (the zero-gradient guard of the LLaMA-Factory overlay).

Each run is the real `llamafactory-cli train` of the tiny stage-1 recipe, 3 steps (torchrun, 2 ranks, gloo).

The root cause of the ZeRO-3 failures (random NaN loss, frozen weights like 1e35, `grad_norm` useless) was the load,
not checkpointing: DeepSpeed's blocking gather of several parameters waited for its last all-gather only, and on
gloo an earlier one could still overwrite what rank 0 had just loaded (overlays/deepspeed). The load test below runs
this file itself on 2 gloo ranks (`__main__`) and checks every parameter after a ZeRO-3 `from_pretrained`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from examples.compare_checkpoints import compare_checkpoints
from examples.tiny.make_tiny_data import make_tiny_data
from tests.test_train_stages import cli_args, losses

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = REPO / "examples" / "deepspeed"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TRIALS = 8  # blocking gathers of a 2048 x 2048 weight + bias; before the fix most of them lost rank 0's write


def zero3_config() -> dict:
    """The recipe's ZeRO-3 config with the values the HF Trainer fills in for "auto" (2 ranks, fp32, tiny model)."""
    config = json.loads((DEEPSPEED / "ds_z3_config.json").read_text())
    config.update(train_batch_size=4, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
                  gradient_clipping=1.0, bf16={"enabled": False})
    config["fp16"]["enabled"] = False
    config["zero_optimization"].update(reduce_bucket_size=36864, stage3_prefetch_bucket_size=33177,
                                       stage3_param_persistence_threshold=1920)
    return config


def rank_main(model_dir: str, out_dir: str) -> None:
    """One of 2 gloo ranks: (1) weight + bias written by rank 0 inside GatheredParameters(modifier_rank=0), the way
    transformers loads a ZeRO-3 checkpoint, must be what a later gather returns; (2) `from_pretrained` of the tiny
    merged model under ZeRO-3 must hold exactly the checkpoint's tensors. Writes rank<N>.json."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    from transformers.integrations import HfDeepSpeedConfig

    from examples.compare_checkpoints import canonical_name

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    ds_config = HfDeepSpeedConfig(zero3_config())  # noqa: F841  (kept alive: it makes from_pretrained use zero.Init)

    with deepspeed.zero.Init(config_dict_or_path=zero3_config()):
        linear = torch.nn.Linear(2048, 2048)
    lost = 0
    for trial in range(TRIALS):
        written = torch.arange(2048 * 2048, dtype=torch.float32).reshape(2048, 2048) + trial
        with deepspeed.zero.GatheredParameters([linear.weight, linear.bias], modifier_rank=0):
            if rank == 0:
                linear.weight.data.copy_(written)
                linear.bias.data.fill_(trial)
        with deepspeed.zero.GatheredParameters([linear.weight]):
            lost += not torch.equal(linear.weight.data, written)

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    checkpoint = {canonical_name(k): v for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}
    checkpoint.setdefault("lm_head.weight", checkpoint["model.language_model.embed_tokens.weight"])  # tied
    wrong, compared = [], 0
    for name, param in model.named_parameters(remove_duplicate=False):
        compared += 1
        with deepspeed.zero.GatheredParameters([param]):
            if not torch.equal(param.data, checkpoint[name]):
                wrong.append(f"{name} (max |w| {param.data.abs().max().item():.3g})")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"lost": lost, "wrong": wrong,
                                                                 "compared": compared}))


def test_zero3_load_on_two_gloo_ranks_keeps_every_checkpoint_tensor(work, env, tiny_merged):
    """Before overlays/deepspeed: most blocking weight + bias gathers lost rank 0's write, and a random few vision
    tower / projector Linear weights came out of `from_pretrained` as uninitialised memory (|w| ~ 1e35 or NaN)."""
    import subprocess

    out = work / "zero3_load"
    out.mkdir()
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(20000 + os.getpid() % 9000),
                           __file__, str(tiny_merged), str(out)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads((out / f"rank{rank}.json").read_text())
        assert result["lost"] == 0, f"rank {rank}: {result['lost']} of {TRIALS} gathers lost rank 0's write"
        assert result["compared"] == 57 and result["wrong"] == []  # 56 tensors + the tied lm_head, f"rank {rank}: {result['wrong']}"


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



def test_guard_stops_a_run_whose_loss_is_not_finite(work, env, tiny_data, tiny_merged):
    """Stage 1 with `learning_rate: 1.0e+30` (meant: 1.0e-3): after the first Adam step the projector weights are
    ~1e30 and the loss overflows. The trainer's NaN filter would log it as 0.0 and train on; the guard must stop the
    run with one line at the first non-finite step."""
    out = work / "nan"
    code, log = run_cli(cli_args("train", "stage1.yaml", model_name_or_path=tiny_merged, output_dir=out,
                                 dataset_dir=tiny_data, learning_rate="1.0e+30", max_steps=20,
                                 per_device_train_batch_size=2), env, work / "nan.log")
    assert code != 0
    errors = [line for line in log.splitlines() if "zero-gradient guard:" in line]
    assert len(errors) == 1 and "non-finite loss" in errors[0], log[-3000:]
    assert "Traceback" not in log
    assert 2 <= len(losses(out)) <= 3  # a finite first step, then stopped at the first non-finite one, not after 20
    assert not (out / "model.safetensors").exists()


if __name__ == "__main__":  # run by torchrun from the load test
    sys.path.insert(0, str(REPO))
    rank_main(*sys.argv[1:3])
