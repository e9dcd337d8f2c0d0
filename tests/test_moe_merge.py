"""Qwen-Merge on a Qwen3-MoE LLM (Qwen-Merge-VL-30B-A3B in miniature): the merger streams every router and expert
bit for bit, the merged config selects the MoE text model in transformers, text logits equal the source Qwen3-MoE's,
and a training forward adds the same load-balancing loss Qwen3MoeForCausalLM adds. Dense merges stay as they were."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merge import model_merger
from tests.test_merge_conformance import all_tensors as tensors_of

REPO = Path(__file__).resolve().parent.parent
TEXT_IDS = [151644, 872, 198, *range(1000, 1031), 151645, 198, 151644, 77091, 198]


@pytest.fixture(scope="module")
def merged_model(tiny_merged_moe):
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(tiny_merged_moe, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def source_model(tiny_qwen3_moe):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe, torch_dtype=torch.float32).eval()


def test_every_router_and_expert_tensor_is_copied_bit_identically(tiny_merged_moe, tiny_qwen3_moe):
    source, merged = tensors_of(tiny_qwen3_moe), tensors_of(tiny_merged_moe)
    routers = [n for n in source if n.endswith(".mlp.gate.weight")]
    experts = [n for n in source if ".mlp.experts." in n]
    assert len(routers) == 2 and len(experts) == 2 * 6 * 3  # layers 0 and 2 sparse, 6 experts, 3 projections each
    assert "model.layers.1.mlp.gate_proj.weight" in source  # the mlp_only layer keeps its dense MLP
    for name, tensor in source.items():  # every LLM tensor, routers and experts included
        assert merged[name].dtype == tensor.dtype and torch.equal(merged[name].view(torch.int32),
                                                                  tensor.view(torch.int32)), name


def test_merged_config_carries_the_moe_fields(tiny_merged_moe, tiny_qwen3_moe):
    from transformers import AutoConfig
    config = json.loads((tiny_merged_moe / "config.json").read_text())
    llm = json.loads((tiny_qwen3_moe / "config.json").read_text())
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                "mlp_only_layers", "norm_topk_prob", "router_aux_loss_coef", "output_router_logits"):
        assert config[key] == llm[key], key
    loaded = AutoConfig.from_pretrained(tiny_merged_moe)
    assert loaded.text_config.is_moe and loaded.num_experts == 6 and loaded.mlp_only_layers == [1]
    loaded.router_aux_loss_coef = 0.5  # LLaMA-Factory sets it at the top level: it must reach the text model
    assert loaded.text_config.router_aux_loss_coef == 0.5


def test_dense_merge_config_has_no_moe_fields_and_builds_the_dense_decoder(tiny_merged):
    from transformers import AutoConfig, AutoModelForImageTextToText
    config = json.loads((tiny_merged / "config.json").read_text())
    assert not {"num_experts", "router_aux_loss_coef", "output_router_logits"} & set(config)
    loaded = AutoConfig.from_pretrained(tiny_merged)
    assert not loaded.text_config.is_moe and "num_experts" not in loaded.to_dict()
    model = AutoModelForImageTextToText.from_pretrained(tiny_merged)
    assert type(model.model.language_model).__name__ == "Qwen2_5_VL_MergeTextModel"


def test_moe_text_model_is_chosen_and_every_expert_is_loaded(merged_model, source_model):
    text = merged_model.model.language_model
    assert type(text).__name__ == "Qwen2_5_VL_MergeMoeTextModel"
    assert type(text.layers[0].mlp).__name__ == "Qwen3MoeSparseMoeBlock"
    assert type(text.layers[1].mlp).__name__ == "Qwen3MoeMLP"
    source = source_model.state_dict()
    for name, param in text.state_dict().items():
        assert torch.equal(param, source["model." + name]), name


def test_text_logits_equal_the_source_qwen3_moe(merged_model, source_model):
    ids = torch.tensor([TEXT_IDS])
    with torch.no_grad():
        ours, theirs = merged_model(input_ids=ids).logits, source_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def switch_balance_loss(router_logits: list[torch.Tensor], real: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer's load-balancing loss as transformers' Qwen-MoE models define it, written out: over the real
    tokens of every sparse layer, num_experts x sum_e (tokens routed to e / tokens) x (mean router probability of e)."""
    probs = torch.cat([torch.softmax(r.float(), dim=-1)[real.flatten()] for r in router_logits])
    chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
    return probs.shape[-1] * (chosen.mean(0) * probs.mean(0)).sum()


def test_training_loss_adds_the_load_balancing_loss_of_the_real_tokens(tiny_merged_moe, tiny_qwen3_moe):
    """With output_router_logits and router_aux_loss_coef (what LLaMA-Factory's moe_aux_loss_coef sets), the loss is
    the source Qwen3-MoE's LM loss + coef x the load-balancing loss of its routers over the non-padding tokens.
    (Qwen3MoeForCausalLM itself cannot compute it for this checkpoint: its aux loss fails on the router-less
    mlp_only layer, so the reference is the source's LM loss and router logits with the loss written out.)"""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    ours = AutoModelForImageTextToText.from_pretrained(tiny_merged_moe, output_router_logits=True,
                                                       router_aux_loss_coef=0.25, torch_dtype=torch.float32).train()
    theirs = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe, torch_dtype=torch.float32).train()
    ids = torch.tensor([TEXT_IDS, TEXT_IDS[:20] + [151643] * (len(TEXT_IDS) - 20)])
    mask = (torch.arange(len(TEXT_IDS)) < torch.tensor([[len(TEXT_IDS)], [20]])).long()
    labels = ids.masked_fill(mask == 0, -100)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    ref = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    routers = theirs.model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
    expected_aux = switch_balance_loss([r for r in routers if r is not None], mask.bool(), top_k=2)
    assert expected_aux > 2.0  # top-2 routing: perfectly balanced gives 2, anything else more
    torch.testing.assert_close(out.aux_loss, expected_aux, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss, ref.loss + 0.25 * expected_aux, rtol=1e-5, atol=0)
    out.loss.backward()
    router = ours.model.language_model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert ours.model.language_model.last_router_logits is None  # not kept past the step


# ----------------------------------------------------------------------------------------------------------------
# Refusals: one line each, nothing written

def moe_source(tmp_path: Path, tiny_qwen3_moe: Path, **changes) -> Path:
    llm = tmp_path / "llm"
    shutil.copytree(tiny_qwen3_moe, llm)
    config = json.loads((llm / "config.json").read_text())
    config.update(changes)
    (llm / "config.json").write_text(json.dumps(config))
    return llm


@pytest.mark.parametrize("changes, says", [
    ({"decoder_sparse_step": 0}, "decoder_sparse_step 0"),
    ({"num_experts_per_tok": 7}, "num_experts_per_tok 7; it must be 1..6"),
    ({"mlp_only_layers": [5]}, "mlp_only_layers [5]"),
    ({"num_experts": 8}, "tensor(s) that its config (3 layers, 8 experts"),
    ({"mlp_only_layers": []}, "model.layers.1.mlp.experts.0.down_proj.weight"),
], ids=["sparse-step-0", "top-k-above-experts", "mlp-only-layer-out-of-range", "more-experts-than-weights",
        "dense-layer-read-as-sparse"])
def test_impossible_moe_configs_are_refused_with_one_line(tmp_path, tiny_qwen25vl, tiny_qwen3_moe, changes, says):
    llm = moe_source(tmp_path, tiny_qwen3_moe, **changes)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "merge/model_merger.py"), "--quiet", "--vlm-path",
                           str(tiny_qwen25vl), "--llm-path", str(llm), "--output-path", str(out)],
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err, proc.stderr
    assert says in err, err
    assert not out.exists()


def test_moe_defaults_table_equals_the_installed_qwen3_moe_config():
    import inspect

    from transformers import Qwen3MoeConfig
    signature = inspect.signature(Qwen3MoeConfig.__init__).parameters
    assert {k: signature[k].default for k in model_merger.QWEN3_MOE_DEFAULTS} == model_merger.QWEN3_MOE_DEFAULTS
    assert "head_dim" not in signature  # hence the hidden / heads fallback in qwen3_fields


def test_forward_keeps_the_parents_parameters_for_trainer_and_generate():
    """The aux-loss wrapper must not hide `labels` etc.: Trainer finds label columns (and so computes eval loss)
    from the forward signature."""
    import inspect

    from transformers import Qwen2_5_VL_MergeForConditionalGeneration, Qwen2_5_VLForConditionalGeneration
    from transformers.utils import find_labels
    assert find_labels(Qwen2_5_VL_MergeForConditionalGeneration) == ["labels"]
    assert inspect.signature(Qwen2_5_VL_MergeForConditionalGeneration.forward) == \
        inspect.signature(Qwen2_5_VLForConditionalGeneration.forward)
