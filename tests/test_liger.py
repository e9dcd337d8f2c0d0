"""Liger kernels for qwen2_5_vl_merge through LLaMA-Factory's `enable_liger_kernel` (CPU part).

Liger's kernels are Triton GPU kernels, so the numbers (loss and gradient parity) are measured on a GPU by
bench/liger_parity.py (bench/results/liger_parity_*.json). Here: the patch reaches exactly the right modules of a
real Qwen-Merge built from the merged fixture, LLaMA-Factory's own entry point routes our model_type to it, the folded
M-RoPE has the cos/sin layout Liger's RoPE kernel reads, and configurations a kernel does not fit are refused."""
import pytest
import torch


@pytest.fixture
def restore_patches():
    """Liger patches module globals; put them back after each test (the suite shares one process)."""
    from transformers.loss import loss_utils
    from transformers.models.qwen2_5_vl_merge import modeling_qwen2_5_vl_merge as merge_modeling
    from transformers.models.qwen3 import modeling_qwen3
    names = ("apply_rotary_pos_emb", "Qwen3RMSNorm", "Qwen3MLP")
    saved = {n: getattr(modeling_qwen3, n) for n in names}
    cls = merge_modeling.Qwen2_5_VL_MergeForConditionalGeneration
    forward, cross_entropy = cls.forward, loss_utils.nn.functional.cross_entropy
    yield
    for n, v in saved.items():
        setattr(modeling_qwen3, n, v)
    cls.forward = forward
    loss_utils.nn.functional.cross_entropy = cross_entropy


def _liger_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_llamafactory_enable_liger_patches_the_text_decoder_only(tiny_merged, restore_patches):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from llamafactory.hparams import ModelArguments
    from llamafactory.model.model_utils.liger_kernel import apply_liger_kernel
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.qwen3 import modeling_qwen3

    config = AutoConfig.from_pretrained(tiny_merged)
    apply_liger_kernel(config, ModelArguments(model_name_or_path=str(tiny_merged), enable_liger_kernel=True),
                       is_trainable=True, require_logits=False)
    model, info = AutoModelForImageTextToText.from_pretrained(tiny_merged, output_loading_info=True)
    # the Liger modules hold the same parameters: the checkpoint loads with nothing missing or unexpected
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
    text, layers = model.model.language_model, config.text_config.num_hidden_layers
    text_counts, vision_counts = _liger_counts(text), _liger_counts(model.model.visual)
    # per layer: input/post-attention norms + q/k norms; plus the final norm
    assert text_counts.get("LigerRMSNorm") == 4 * layers + 1, text_counts
    assert text_counts.get("LigerSwiGLUMLP") == layers and "Qwen3MLP" not in text_counts
    assert not any(name.startswith("Liger") for name in vision_counts), vision_counts
    assert modeling_qwen3.apply_rotary_pos_emb is liger_rotary_pos_emb
    assert getattr(type(model).forward, "_qwen_merge_fused_loss", False)


def test_stages_that_need_logits_get_plain_liger_cross_entropy(tiny_merged, restore_patches):
    from liger_kernel.transformers.functional import liger_cross_entropy
    from llamafactory.hparams import ModelArguments
    from llamafactory.model.model_utils.liger_kernel import apply_liger_kernel
    from transformers import AutoConfig
    from transformers.loss import loss_utils
    from transformers.models.qwen2_5_vl_merge.modeling_qwen2_5_vl_merge import (
        Qwen2_5_VL_MergeForConditionalGeneration)

    config = AutoConfig.from_pretrained(tiny_merged)
    apply_liger_kernel(config, ModelArguments(model_name_or_path=str(tiny_merged), enable_liger_kernel=True),
                       is_trainable=True, require_logits=True)  # e.g. DPO: logits are needed
    assert loss_utils.nn.functional.cross_entropy is liger_cross_entropy
    assert not getattr(Qwen2_5_VL_MergeForConditionalGeneration.forward, "_qwen_merge_fused_loss", False)


def test_folded_mrope_cos_sin_halves_are_identical_for_image_positions(tiny_merged):
    """Liger's RoPE kernel reads cos/sin[..., :head_dim/2] only; our folded M-RoPE must repeat its halves even where
    the t/h/w position streams differ (image tokens)."""
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl_merge.modeling_qwen2_5_vl_merge import Qwen2_5_VL_MergeRotaryEmbedding

    text = AutoConfig.from_pretrained(tiny_merged).text_config
    rotary = Qwen2_5_VL_MergeRotaryEmbedding(text)
    positions = torch.stack([torch.arange(40).repeat(2, 1), (torch.arange(80) % 7).reshape(2, 40),
                             (torch.arange(80) // 3).reshape(2, 40)])  # (3, batch 2, seq 40), streams differ
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = text.head_dim // 2
    assert cos.shape == (2, 40, text.head_dim)
    assert not torch.equal(cos[..., :half][0], cos[..., :half][0].roll(1, dims=-1))  # non-trivial content
    assert torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])


def test_configurations_a_kernel_does_not_fit_are_refused(tiny_merged):
    from llamafactory.qwen_merge.liger import LigerNotApplicable, apply_liger_kernel_to_qwen2_5_vl_merge
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_merged)
    gelu = AutoConfig.from_pretrained(tiny_merged)
    gelu.text_config.hidden_act = "gelu"
    with pytest.raises(LigerNotApplicable, match="SwiGLU needs hidden_act silu"):
        apply_liger_kernel_to_qwen2_5_vl_merge(config=gelu)
    odd = AutoConfig.from_pretrained(tiny_merged)
    odd.text_config.rope_scaling = dict(odd.text_config.rope_scaling, mrope_section=[8, 8, 8])
    with pytest.raises(LigerNotApplicable, match=r"sum\(mrope_section\)"):
        apply_liger_kernel_to_qwen2_5_vl_merge(config=odd)
    with pytest.raises(LigerNotApplicable, match="exclusive"):
        apply_liger_kernel_to_qwen2_5_vl_merge(config=config, cross_entropy=True, fused_linear_cross_entropy=True)
