"""The stage-4 recipes (RFT and DPO, 4B and 8B) pass LLaMA-Factory's own argument parser with their freezing as
intended; the tiny variants use the same method; the datasets they name are the ones rollouts.py writes.

Stubbed for this CPU box, and only these: the model path (the tiny untied checkpoint), dataset_dir (a folder
holding the dataset_info.json of data_process/stage4), output_dir, and bf16 (needs a GPU). DeepSpeed stays: the
parser runs in a one-process torchrun-style environment (LLaMA-Factory refuses DeepSpeed without one).
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from data_process.stage4.outputs import dataset_info

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
RECIPES = ("stage4_rft", "stage4_dpo")
# stage, freeze (vision tower, projector, language model), dataset, start model (relative to the size's outputs)
INTENT = {"stage4_rft": ("sft", (True, False, False), "stage4_rft", "stage3"),
          "stage4_dpo": ("dpo", (True, True, False), "stage4_dpo", "stage4-rft")}
METHOD_KEYS = ("stage", "finetuning_type", "freeze_vision_tower", "freeze_multi_modal_projector",
               "freeze_language_model", "template", "enable_thinking", "pref_beta", "pref_loss")

PARSE = textwrap.dedent("""
    import json, sys
    from llamafactory.hparams import get_train_args

    if __name__ == "__main__":
        results = {}
        for name, recipe in json.load(open(sys.argv[1])).items():
            model, data, training, method, _ = get_train_args(recipe)
            results[name] = {"stage": method.stage, "finetuning_type": method.finetuning_type,
                             "freeze": [method.freeze_vision_tower, method.freeze_multi_modal_projector,
                                        method.freeze_language_model],
                             "dataset": data.dataset, "template": data.template, "deepspeed": training.deepspeed,
                             "pref_beta": method.pref_beta, "enable_thinking": data.enable_thinking}
        print("PARSED " + json.dumps(results))
""")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_stage4_recipes_pass_llamafactorys_argument_parser(tiny_merged_untied, tmp_path, venv_env):
    (tmp_path / "dataset_info.json").write_text(json.dumps(dataset_info()))
    recipes = {}
    for size in ("4b", "8b"):
        for name in RECIPES:
            recipe = load(EXAMPLES / f"qwen_merge_{size}" / f"{name}.yaml")
            recipe.update(model_name_or_path=str(tiny_merged_untied), dataset_dir=str(tmp_path),
                          output_dir=str(tmp_path / "out" / f"{size}-{name}"), bf16=False)
            recipes[f"{size}/{name}"] = recipe
    (tmp_path / "recipes.json").write_text(json.dumps(recipes))
    (tmp_path / "parse.py").write_text(PARSE)
    env = {**venv_env, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(tmp_path / "parse.py"), str(tmp_path / "recipes.json")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=540, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parsed = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PARSED "))[7:])
    for key, result in parsed.items():
        stage, freeze, dataset, _ = INTENT[key.split("/")[1]]
        assert (result["stage"], result["finetuning_type"], result["freeze"]) == (stage, "full", list(freeze)), key
        assert result["dataset"] == [dataset] and result["template"] == "qwen_merge_vl" and result["enable_thinking"]
        assert result["deepspeed"] == "examples/deepspeed/ds_z3_config.json"


@pytest.mark.parametrize("size", ["4B", "8B"])
@pytest.mark.parametrize("name", RECIPES)
def test_stage4_recipe_chains_after_stage3_and_reads_the_rollout_outputs(size, name):
    recipe = load(EXAMPLES / f"qwen_merge_{size.lower()}" / f"{name}.yaml")
    stage, freeze, dataset, start = INTENT[name]
    assert recipe["model_name_or_path"] == f"outputs/Qwen-Merge-VL-{size}-{start}"
    assert recipe["output_dir"] == f"outputs/Qwen-Merge-VL-{size}-{name.replace('_', '-')}"
    assert recipe["dataset"] == dataset and dataset in dataset_info()
    assert recipe["dataset_dir"] == "data/stage4" and recipe["bf16"] is True
    assert (recipe["image_min_pixels"], recipe["image_max_pixels"]) == (256 * 28 * 28, 1280 * 28 * 28)
    assert json.loads((REPO / recipe["deepspeed"]).read_text())["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("name", RECIPES)
def test_tiny_stage4_recipe_mirrors_the_real_one(name):
    real, tiny = load(EXAMPLES / "qwen_merge_4b" / f"{name}.yaml"), load(EXAMPLES / "tiny" / f"{name}.yaml")
    assert {k: tiny.get(k) for k in METHOD_KEYS} == {k: real.get(k) for k in METHOD_KEYS}
    assert tiny["dataset"] == real["dataset"] and "deepspeed" not in tiny and tiny["bf16"] is False
    assert tiny["dataset_dir"] == "outputs/tiny/stage4" and tiny["output_dir"] == f"outputs/tiny/{name}"
