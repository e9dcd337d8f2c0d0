"""The 4B/8B/30B-A3B recipes are valid for LLaMA-Factory itself, keep a disk footprint a user can live with, resume when
rerun, and the README's training loop stops at the first failed stage.

The stage YAMLs go through LLaMA-Factory's own `get_train_args` (chat.yaml through `get_infer_args`) exactly as
written, in a scratch working directory where every path they name exists (`outputs/...` -> the tiny merged model,
`data/dataset_info.json`, `examples/deepspeed/`), in one subprocess that is a 1-rank torchrun-like process (the
recipes use DeepSpeed, which LLaMA-Factory accepts only in a distributed launch). The only stand-in is the answer
to transformers' "does this GPU do bf16?" check: yes, as on the GPUs the recipes are written for.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
STAGES = ("stage1", "stage2.1", "stage2.2", "stage3")
SIZES = ("4B", "8B", "30B_A3B")  # folders examples/qwen_merge_{size.lower()}
INTERRUPTED = "examples/qwen_merge_4b/stage2.1.yaml"  # validated with checkpoints in its output_dir

pytestmark = pytest.mark.timeout(300)

VALIDATE = textwrap.dedent("""
    import json, os, shutil, sys
    import yaml
    import transformers.training_args
    from llamafactory.hparams import get_infer_args, get_train_args

    if __name__ == "__main__":
        transformers.training_args.is_torch_bf16_gpu_available = lambda: True  # bf16 recipes target GPUs
        results = {}
        tiny_model, interrupted = sys.argv[3], sys.argv[4]
        for recipe in json.load(open(sys.argv[1])):
            args = yaml.safe_load(open(recipe))
            shutil.rmtree("outputs", ignore_errors=True)  # only this recipe's input model exists
            os.makedirs("outputs")
            os.symlink(tiny_model, args["model_name_or_path"])
            if recipe == interrupted:  # its output_dir holds checkpoints: rerunning the command must resume
                for step in (200, 400):
                    os.makedirs(os.path.join(args["output_dir"], f"checkpoint-{step}"))
            if recipe.endswith("chat.yaml"):
                model_args, data_args, finetuning_args, generating_args = get_infer_args(args)
                results[recipe] = {"template": data_args.template, "enable_thinking": data_args.enable_thinking,
                                   "temperature": generating_args.temperature}
                continue
            model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
            results[recipe] = {
                "resume_from_checkpoint": training_args.resume_from_checkpoint,
                "save_only_model": training_args.save_only_model,
                "save_total_limit": training_args.save_total_limit,
                "zero_stage": training_args.hf_deepspeed_config.config["zero_optimization"]["stage"],
                "gradient_checkpointing": not model_args.disable_gradient_checkpointing,
                "per_turn_samples": data_args.per_turn_samples,
                "zero_grad_guard_steps": finetuning_args.zero_grad_guard_steps,
                "bf16": training_args.bf16, "cutoff_len": data_args.cutoff_len,
            }
        json.dump(results, open(sys.argv[2], "w"))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tiny_merged, venv_env) -> dict[str, dict]:
    """{recipe path relative to the repo: what LLaMA-Factory parsed from it}."""
    root = tmp_path_factory.mktemp("recipes")
    (root / "data").mkdir()
    (root / "data" / "dataset_info.json").write_text((EXAMPLES / "dataset_info.json").read_text())
    (root / "examples").mkdir()
    (root / "examples" / "deepspeed").symlink_to(EXAMPLES / "deepspeed")
    for size in SIZES:
        (root / "examples" / f"qwen_merge_{size.lower()}").symlink_to(EXAMPLES / f"qwen_merge_{size.lower()}")

    recipes = [f"examples/qwen_merge_{size.lower()}/{stage}.yaml" for size in SIZES for stage in (*STAGES, "chat")]
    (root / "recipes.json").write_text(json.dumps(recipes))
    (root / "validate.py").write_text(VALIDATE)
    env = {**venv_env, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "HF_DATASETS_CACHE": str(root / "hf")}
    command = [sys.executable, "validate.py", "recipes.json", "results.json", str(tiny_merged), INTERRUPTED]
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((root / "results.json").read_text())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("stage", STAGES)
def test_stage_recipe_passes_llamafactory_get_train_args(validated, size, stage):
    parsed = validated[f"examples/qwen_merge_{size.lower()}/{stage}.yaml"]
    assert parsed["zero_stage"] == (2 if stage == "stage1" else 3)
    assert parsed["bf16"] is True and parsed["cutoff_len"] == 8192
    assert parsed["gradient_checkpointing"] is True
    assert parsed["zero_grad_guard_steps"] > 0  # the guard is on in every recipe
    assert parsed["per_turn_samples"] is (stage in ("stage2.2", "stage3"))
    # disk: one checkpoint with its optimizer states (resumable), not ten
    assert parsed["save_total_limit"] == 1 and parsed["save_only_model"] is False


def test_rerunning_an_interrupted_stage_resumes_from_its_latest_checkpoint(validated):
    resumed = validated[INTERRUPTED]["resume_from_checkpoint"]
    assert resumed is not None and resumed.endswith("outputs/Qwen-Merge-VL-4B-stage2.1/checkpoint-400")
    assert validated["examples/qwen_merge_4b/stage2.2.yaml"]["resume_from_checkpoint"] is None  # nothing to resume


@pytest.mark.parametrize("size", SIZES)
def test_chat_recipe_passes_llamafactory_get_infer_args(validated, size):
    parsed = validated[f"examples/qwen_merge_{size.lower()}/chat.yaml"]
    assert parsed == {"template": "qwen_merge_vl", "enable_thinking": True, "temperature": 0.6}


def readme_training_loop() -> str:
    """The shell lines of the README's step 4 (train), as a user pastes them."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"\n(# 4\. train.*?)\n\n", text, re.DOTALL)
    assert block, "README.md: no '# 4. train' step in the GPU recipe"
    return block.group(1)


def run_readme_loop(tmp_path: Path, failing_stage: str | None = None) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run the README's training loop with a `llamafactory-cli` stand-in on PATH that records each stage it is given
    and exits 3 on `failing_stage`: (the stages started, the finished loop)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fail = f'case "$2" in *{failing_stage}*) exit 3;; esac\n' if failing_stage else ""
    stub = bin_dir / "llamafactory-cli"
    stub.write_text(f'#!/bin/sh\necho "$2" >> {calls}\n{fail}exit 0\n')
    stub.chmod(0o755)
    script = tmp_path / "loop.sh"
    script.write_text(readme_training_loop())
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30,
                          check=False)
    return calls.read_text().split(), proc


def test_readme_training_loop_stops_at_the_first_failed_stage(tmp_path):
    """Stage 2.1 fails: stages 2.2 and 3 must not start (they would train from a missing or stale stage-2.1
    checkpoint) and the loop must report the failure."""
    started, proc = run_readme_loop(tmp_path, failing_stage="stage2.1")
    assert started == ["examples/qwen_merge_4b/stage1.yaml", "examples/qwen_merge_4b/stage2.1.yaml"]
    assert proc.returncode != 0 and "stage2.1 failed" in proc.stderr  # fails, and says which stage


def test_readme_training_loop_runs_every_stage_when_all_succeed(tmp_path):
    started, proc = run_readme_loop(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert started == [f"examples/qwen_merge_4b/{s}.yaml" for s in STAGES]
