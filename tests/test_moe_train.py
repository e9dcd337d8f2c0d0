"""Qwen-Merge on a Qwen3-MoE in LLaMA-Factory, on the real model as `llamafactory-cli train` loads it: the stage freeze
sets hold with experts and routers counted as the language model, `moe_aux_loss_coef` turns on the router loss, and
a neat-packed batch gives the loss (LM + load balancing) of the same samples unpacked."""
from __future__ import annotations

import pytest
import torch

from examples.compare_checkpoints import GROUPS
from examples.tiny.make_tiny_data import make_tiny_data
from tests.test_train_freeze import loaded_model, trainable_groups

pytestmark = pytest.mark.timeout(600)

DATASETS = "ai2d_gpt4v,LLaVA_ReCap_558K,text2image"  # chat, captions and reasoning, each with a photo


def moe_parameters(model) -> dict[str, list[bool]]:
    flags = {"router": [], "expert": []}
    for name, parameter in model.named_parameters():
        if name.endswith(".mlp.gate.weight"):
            flags["router"].append(parameter.requires_grad)
        elif ".mlp.experts." in name:
            flags["expert"].append(parameter.requires_grad)
    return flags


@pytest.mark.parametrize("stage, freeze, trained", [
    ("1", dict(freeze_vision_tower=True, freeze_multi_modal_projector=False, freeze_language_model=True),
     {"projector"}),
    ("2.1-3", dict(freeze_vision_tower=True, freeze_multi_modal_projector=False, freeze_language_model=False),
     {"projector", "language_model", "lm_head"}),
])
def test_stage_freeze_sets_cover_every_expert_and_router(tiny_merged_moe, tmp_path, stage, freeze, trained):
    model = loaded_model(tiny_merged_moe, tmp_path, finetuning_type="full", **freeze)
    assert trainable_groups(model) == {group: {group in trained} for group in GROUPS}
    flags = moe_parameters(model)
    assert len(flags["router"]) == 2 and len(flags["expert"]) == 2 * 6 * 3
    assert set(flags["router"]) == set(flags["expert"]) == {"language_model" in trained}


def test_moe_aux_loss_coef_turns_on_the_router_loss(tiny_merged_moe, tmp_path):
    stage2 = dict(finetuning_type="full", freeze_vision_tower=True, freeze_language_model=False)
    plain = loaded_model(tiny_merged_moe, tmp_path / "plain", **stage2)
    assert plain.config.text_config.output_router_logits is False
    model = loaded_model(tiny_merged_moe, tmp_path / "aux", moe_aux_loss_coef=0.02, **stage2)
    text = model.config.text_config
    assert text.output_router_logits is True and text.router_aux_loss_coef == 0.02
    ids = torch.tensor([[151644, 872, 198, *range(2000, 2024), 151645]])
    out = model(input_ids=ids, labels=ids)
    lm_only = plain(input_ids=ids, labels=ids).loss
    assert out.aux_loss > 2.0  # top-2 routing: perfectly balanced gives 2
    torch.testing.assert_close(out.loss, lm_only + 0.02 * out.aux_loss, rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def packed_and_unpacked(tmp_path_factory, tiny_merged_moe, sample_images):
    """(model with the router loss on, packed batch, unpacked batch), built by LLaMA-Factory's get_dataset + SFT
    collator from the same 6 samples."""
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer

    work = tmp_path_factory.mktemp("moe-packing")
    data = make_tiny_data(work / "data", images=sample_images[0].parent)
    model, built = None, {}
    for packed in (True, False):
        model_args, data_args, training_args, finetuning_args, _ = get_train_args(dict(
            model_name_or_path=str(tiny_merged_moe), stage="sft", do_train=True, finetuning_type="full",
            dataset=DATASETS, dataset_dir=str(data), template="qwen_merge_vl", cutoff_len=1024, max_samples=2,
            image_max_pixels=12544, neat_packing=packed, moe_aux_loss_coef=0.05, output_dir=str(work / "out"),
            overwrite_cache=True, cache_dir=str(work / "cache"), report_to="none", bf16=False))
        modules = load_tokenizer(model_args)
        template = get_template_and_fix_tokenizer(modules["tokenizer"], data_args)
        dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **modules)["train_dataset"]
        if model is None:
            model = load_model(modules["tokenizer"], model_args, finetuning_args, is_trainable=True).eval()
        collator = SFTDataCollatorWith4DAttentionMask(
            template=template, model=model, pad_to_multiple_of=8, label_pad_token_id=-100,
            block_diag_attn=model_args.block_diag_attn, attn_implementation=model.config._attn_implementation,
            compute_dtype=torch.float32, **modules)
        built[packed] = collator([dataset[i] for i in range(len(dataset))])
    return model, built[True], built[False]


def test_packed_and_unpacked_batches_give_the_same_loss_and_router_loss(packed_and_unpacked):
    model, packed, unpacked = packed_and_unpacked
    assert packed["input_ids"].shape[0] == 1 and unpacked["input_ids"].shape[0] == 6
    assert model.config.text_config.output_router_logits is True
    with torch.no_grad():
        packed_out, unpacked_out = model(**packed), model(**unpacked)
    assert torch.isfinite(packed_out.loss) and packed_out.aux_loss > 2.0
    torch.testing.assert_close(packed_out.aux_loss, unpacked_out.aux_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(packed_out.loss, unpacked_out.loss, rtol=1e-5, atol=0)


def test_zero3_keeps_each_sparse_moe_block_whole(tiny_merged_moe, tiny_merged):
    """Under ZeRO-3, LLaMA-Factory marks the Qwen3-MoE blocks as DeepSpeed leaf modules (gathered whole, not
    expert by expert) for our model_type too; a dense Qwen-Merge gets no leaf modules."""
    from llamafactory.model.model_utils.moe import add_z3_leaf_module
    from transformers import AutoModelForImageTextToText
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    models = {2: AutoModelForImageTextToText.from_pretrained(tiny_merged_moe),  # built before ZeRO-3 is on
              0: AutoModelForImageTextToText.from_pretrained(tiny_merged)}
    keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})  # noqa: F841
    try:
        assert is_deepspeed_zero3_enabled()
        for expected, model in models.items():
            add_z3_leaf_module(model)
            leaves = [type(m).__name__ for m in model.modules() if getattr(m, "_z3_leaf", False)]
            assert leaves == ["Qwen3MoeSparseMoeBlock"] * expected, leaves
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
