"""The Qwen-Merge-VL-30B-A3B recipes (examples/qwen_merge_30b_a3b/) are the 8B recipes with only the changes the MoE
and its size need: model/output names, micro-batch 1 with the accumulation that keeps the global batch, ZeRO-3 with
Adam states in host RAM for the stages that train the LLM, the router loss on, Liger off. LLaMA-Factory itself
parses them in tests/test_train_recipe_args.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MOE, DENSE = REPO / "examples/qwen_merge_30b_a3b", REPO / "examples/qwen_merge_8b"
STAGES = ("stage1", "stage2.1", "stage2.2", "stage3")
MAY_DIFFER = {"model_name_or_path", "output_dir", "run_name", "per_device_train_batch_size",
              "gradient_accumulation_steps", "deepspeed", "moe_aux_loss_coef", "enable_liger_kernel"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("stage", STAGES)
def test_moe_stage_recipe_is_the_8b_recipe_with_the_moe_changes(stage):
    moe, dense = load(MOE / f"{stage}.yaml"), load(DENSE / f"{stage}.yaml")
    assert {k: v for k, v in moe.items() if k not in MAY_DIFFER} == \
        {k: v for k, v in dense.items() if k not in MAY_DIFFER}
    previous = {"stage1": "base", "stage2.1": "stage1", "stage2.2": "stage2.1", "stage3": "stage2.2"}[stage]
    assert moe["model_name_or_path"] == f"outputs/Qwen-Merge-VL-30B-A3B-{previous}"
    assert moe["output_dir"] == f"outputs/Qwen-Merge-VL-30B-A3B-{stage}"
    assert moe["per_device_train_batch_size"] == 1
    assert moe["gradient_accumulation_steps"] == \
        dense["per_device_train_batch_size"] * dense["gradient_accumulation_steps"]  # same global batch
    assert moe["enable_liger_kernel"] is False
    trains_llm = not moe["freeze_language_model"]
    assert moe.get("moe_aux_loss_coef") == (0.001 if trains_llm else None)
    deepspeed = json.loads((REPO / moe["deepspeed"]).read_text())["zero_optimization"]
    assert deepspeed["stage"] == (3 if trains_llm else 2)
    assert (deepspeed.get("offload_optimizer") or {}).get("device") == ("cpu" if trains_llm else None)


def test_offload_config_is_the_zero3_config_plus_cpu_adam_states():
    ours = json.loads((MOE / "ds_z3_offload_config.json").read_text())
    base = json.loads((REPO / "examples/deepspeed/ds_z3_config.json").read_text())
    offload = ours["zero_optimization"].pop("offload_optimizer")
    assert ours == base and offload == {"device": "cpu", "pin_memory": True}


def test_chat_recipe_points_at_the_moe_stage3_output():
    chat, dense = load(MOE / "chat.yaml"), load(DENSE / "chat.yaml")
    assert chat["model_name_or_path"] == "outputs/Qwen-Merge-VL-30B-A3B-stage3"
    assert {k: v for k, v in chat.items() if k != "model_name_or_path"} == \
        {k: v for k, v in dense.items() if k != "model_name_or_path"}
