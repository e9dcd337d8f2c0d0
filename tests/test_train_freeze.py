"""The composite-model registration of `qwen2_5_vl_merge` makes LLaMA-Factory's three freeze flags and its LoRA
targeting act on the right modules, on the real model as `llamafactory-cli train` loads it (untied, so `lm_head`
is a parameter of its own)."""
from __future__ import annotations

import pytest

from examples.compare_checkpoints import GROUPS, group_of

pytestmark = pytest.mark.timeout(300)

LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def loaded_model(checkpoint, tmp_path, **method):
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer

    model_args, _, _, finetuning_args, _ = get_train_args(dict(
        model_name_or_path=str(checkpoint), stage="sft", do_train=True, dataset="unused", template="qwen_merge_vl",
        output_dir=str(tmp_path / "out"), report_to="none", bf16=False, **method))
    return load_model(load_tokenizer(model_args)["tokenizer"], model_args, finetuning_args, is_trainable=True)


def trainable_groups(model) -> dict[str, set[bool]]:
    """For each group, the set of requires_grad values of its parameters ({True}, {False} or both)."""
    flags = {group: set() for group in GROUPS}
    for name, parameter in model.named_parameters():
        flags[group_of(name)].add(parameter.requires_grad)
    return flags


@pytest.mark.parametrize("vision, projector, language, trained", [
    (True, False, True, {"projector"}),                                   # stage 1
    (True, False, False, {"projector", "language_model", "lm_head"}),      # stages 2.1, 2.2, 3
    (False, True, False, {"vision_tower", "language_model", "lm_head"}),
])
def test_freeze_flags(tiny_merged_untied, tmp_path, vision, projector, language, trained):
    model = loaded_model(tiny_merged_untied, tmp_path, finetuning_type="full", freeze_vision_tower=vision,
                         freeze_multi_modal_projector=projector, freeze_language_model=language)
    assert trainable_groups(model) == {group: {group in trained} for group in GROUPS}


@pytest.mark.parametrize("freeze_vision_tower", [True, False])
def test_lora_targets(tiny_merged_untied, tmp_path, freeze_vision_tower):
    """`lora_target: all`: every language-model linear layer; the vision blocks only when the tower is not
    frozen; never the projector, the patch embedding or lm_head."""
    model = loaded_model(tiny_merged_untied, tmp_path, finetuning_type="lora", lora_target="all",
                         freeze_vision_tower=freeze_vision_tower)
    adapted = {name.removesuffix(".lora_A.default") for name, _ in model.named_modules()
               if name.endswith(".lora_A.default")}
    language = {n for n in adapted if ".language_model." in n}
    num_layers = model.config.text_config.num_hidden_layers
    assert len(language) == num_layers * len(LINEAR_KINDS) and all(n.endswith(LINEAR_KINDS) for n in language)
    vision = {n for n in adapted if ".visual." in n}
    assert all(".visual.blocks." in n for n in vision)
    assert bool(vision) is not freeze_vision_tower
    assert adapted == language | vision
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
