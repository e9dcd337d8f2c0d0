"""The stage recipes in examples/ are consistent: dataset_info.json is what data_process/naming.py implies, every
stage YAML (4B and 8B) has the intended freezing, template, learning rate, data and resolution, the tiny YAMLs
mirror them, and LLaMA-Factory reads a data_process shard folder in name order."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from data_process.naming import ONEVISION_CONFIGS, ONEVISION_TEXT_ONLY_CONFIGS, onevision_name
from examples import make_dataset_info
from examples.tiny.make_tiny_data import TINY_DATASETS, make_tiny_data

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
STAGES = ("stage1", "stage2.1", "stage2.2", "stage3")
PREVIOUS = {"stage1": "base", "stage2.1": "stage1", "stage2.2": "stage2.1", "stage3": "stage2.2"}
# What each stage is meant to do (spec §7 and the intended regime of §11 item 1; item 14 for the templates).
INTENT = {
    "stage1": {"freeze_language_model": True, "learning_rate": 5e-4, "num_train_epochs": 5.0,
               "template": "qwen_merge_vl_pt", "enable_thinking": None},
    "stage2.1": {"freeze_language_model": False, "learning_rate": 5e-5, "num_train_epochs": 1.2,
                 "template": "qwen_merge_vl_pt", "enable_thinking": None},
    "stage2.2": {"freeze_language_model": False, "learning_rate": 5e-5, "num_train_epochs": 1.2,
                 "template": "qwen_merge_vl", "enable_thinking": False},
    "stage3": {"freeze_language_model": False, "learning_rate": 5e-5, "num_train_epochs": 1.2,
               "template": "qwen_merge_vl", "enable_thinking": True},
}
METHOD_KEYS = ("stage", "finetuning_type", "freeze_vision_tower", "freeze_multi_modal_projector", "per_turn_samples",
               "freeze_language_model", "template", "enable_thinking")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_dataset_info_is_up_to_date_with_data_process_naming():
    assert make_dataset_info.main(["--check"]) == 0
    info = json.loads((EXAMPLES / "dataset_info.json").read_text())
    onevision = [onevision_name(c) for c in ONEVISION_CONFIGS if c not in ONEVISION_TEXT_ONLY_CONFIGS]
    assert len(onevision) == 84 and len(info) == 3 + 2 + 84 + 2
    assert all(info[name]["file_name"] == f"llavaonevision_converted/{name}" for name in onevision)
    for name in ("LLaVA_ReCap_558K", "LLaVA_ReCap_CC3M", "LLaVA_ReCap_CC12M", "synthdog_en", "synthdog_zh"):
        assert info[name]["file_name"] == name
    for name in ("text2image", "image_thinking"):  # single files, as data_process/stage3 writes them
        assert info[name]["file_name"] == f"{name}.parquet"
    for entry in info.values():
        assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "messages", "images": "images"}


@pytest.mark.parametrize("size", ["4B", "8B"])
@pytest.mark.parametrize("stage", STAGES)
def test_stage_recipe(size, stage):
    recipe = load(EXAMPLES / f"qwen_merge_{size.lower()}" / f"{stage}.yaml")
    info = json.loads((EXAMPLES / "dataset_info.json").read_text())
    intent = INTENT[stage]
    assert recipe["finetuning_type"] == "full" and recipe["stage"] == "sft"
    assert recipe["freeze_vision_tower"] is True and recipe["freeze_multi_modal_projector"] is False
    assert recipe["freeze_language_model"] is intent["freeze_language_model"]
    assert recipe["template"] == intent["template"] and recipe.get("enable_thinking") == intent["enable_thinking"]
    assert recipe["learning_rate"] == intent["learning_rate"]
    assert recipe["num_train_epochs"] == intent["num_train_epochs"]
    assert recipe["cutoff_len"] == 8192 and recipe["bf16"] is True
    datasets = recipe["dataset"].split(",")
    assert datasets == make_dataset_info.stage_datasets()[stage] and set(datasets) <= set(info)
    assert recipe["model_name_or_path"] == f"outputs/Qwen-Merge-VL-{size}-{PREVIOUS[stage]}"
    assert recipe["output_dir"] == f"outputs/Qwen-Merge-VL-{size}-{stage}"
    deepspeed = json.loads((REPO / recipe["deepspeed"]).read_text())
    assert deepspeed["zero_optimization"]["stage"] == (2 if stage == "stage1" else 3)


def test_every_recipe_uses_the_same_pixel_bounds():
    """One resolution for every stage and for chat (examples/README.md: evaluation must use the same bounds)."""
    recipes = sorted(EXAMPLES.glob("qwen_merge_*/*.yaml"))
    assert len(recipes) == 19  # stages 1-3, chat, stage 4 (RFT, DPO), for 4B and 8B; stages 1-3, chat for 30B-A3B
    bounds = {(load(p)["image_min_pixels"], load(p)["image_max_pixels"]) for p in recipes}
    assert bounds == {(256 * 28 * 28, 1280 * 28 * 28)}


def test_8b_recipes_differ_from_4b_only_by_the_model_size():
    for recipe in sorted((EXAMPLES / "qwen_merge_4b").glob("*.yaml")):
        text_8b = (EXAMPLES / "qwen_merge_8b" / recipe.name).read_text()
        assert recipe.read_text().replace("4B", "8B").replace("qwen_merge_4b", "qwen_merge_8b") == text_8b


@pytest.mark.parametrize("stage", STAGES)
def test_tiny_recipe_mirrors_the_real_stage(stage):
    real, tiny = load(EXAMPLES / "qwen_merge_4b" / f"{stage}.yaml"), load(EXAMPLES / "tiny" / f"{stage}.yaml")
    assert {k: tiny.get(k) for k in METHOD_KEYS} == {k: real.get(k) for k in METHOD_KEYS}
    assert set(tiny["dataset"].split(",")) <= set(real["dataset"].split(",")) & set(TINY_DATASETS)
    assert tiny["model_name_or_path"] == f"outputs/tiny/{PREVIOUS[stage]}"
    assert tiny["output_dir"] == f"outputs/tiny/{stage}"
    assert "deepspeed" not in tiny and tiny["bf16"] is False


def test_tiny_data_has_the_real_layout(tmp_path):
    data = make_tiny_data(tmp_path / "data", rows=2)
    written = json.loads((data / "dataset_info.json").read_text())
    real = json.loads((EXAMPLES / "dataset_info.json").read_text())
    assert written == {name: real[name] for name in TINY_DATASETS}
    for entry in written.values():
        target = data / entry["file_name"]
        if target.is_file():  # stage 3: one parquet file
            assert target.suffix == ".parquet"
            continue
        shards = sorted(target.iterdir())
        assert [p.suffix for p in shards] == [".parquet", ".parquet"]


def test_shard_folder_is_read_in_name_order_without_stray_files(tmp_path, tiny_merged):
    """A data_process folder may hold a hidden partial file; shards must be read in name order whatever the file
    system lists first (upstream 0.9.3 takes os.listdir's order and rejects any non-parquet file)."""
    from datasets import Dataset
    from llamafactory.data.loader import _load_single_dataset
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import get_train_args

    folder = tmp_path / "data" / "ordered"
    folder.mkdir(parents=True)
    names = []
    while len(names) < 4 or os.listdir(folder) == sorted(os.listdir(folder)):  # until the listing is out of order
        assert len(names) < 64, "could not produce a folder whose listing is out of name order"
        name = f"ordered-{len(names):05d}.parquet"
        conversation = [{"role": "user", "content": "Which shard?"}, {"role": "assistant", "content": name}]
        Dataset.from_dict({"messages": [conversation]}).to_parquet(str(folder / name))
        names.append(name)
    (folder / ".ordered-99999.parquet.partial").write_bytes(b"half a file")
    (folder / "_stats.json").write_text("{}")
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(
        {"ordered": {"file_name": "ordered", "formatting": "sharegpt", "columns": {"messages": "messages"},
                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant"}}}))
    model_args, data_args, training_args, _, _ = get_train_args(dict(
        model_name_or_path=str(tiny_merged), stage="sft", do_train=True, dataset="ordered",
        dataset_dir=str(tmp_path / "data"), template="qwen_merge_vl", output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"), report_to="none"))
    attr = get_dataset_list(["ordered"], data_args.dataset_dir)[0]
    loaded = _load_single_dataset(attr, model_args, data_args, training_args)
    assert [row["_response"][0]["content"] for row in loaded] == names
