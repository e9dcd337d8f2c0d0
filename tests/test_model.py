"""The Qwen-Merge architecture in transformers (overlay applied by install.sh): losslessness, Auto* classes, both key
layouts, the chat template, generate() with image and video, gradient checkpointing."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import transformers
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                          AutoModelForImageTextToText, AutoModelForVision2Seq, AutoProcessor, AutoTokenizer,
                          AutoVideoProcessor, Qwen2_5_VLForConditionalGeneration)

TEXT = "Describe the merger of a vision tower and a language model. 世界 123"


def load(path, attn="eager", **kw):
    return AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn, **kw).eval()


def image_inputs(path, images, question="What is in the picture?"):
    processor = AutoProcessor.from_pretrained(path)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=[text], images=images, return_tensors="pt")


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_text_logits_equal_the_source_qwen3(request, variant):
    merged = request.getfixturevalue("tiny_merged" if variant == "tied" else "tiny_merged_untied")
    source = request.getfixturevalue("tiny_qwen3" if variant == "tied" else "tiny_qwen3_untied")
    ids = AutoTokenizer.from_pretrained(source)(TEXT, return_tensors="pt").input_ids
    qwen3 = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager").eval()
    model = load(merged)
    with torch.no_grad():
        delta = (model(input_ids=ids).logits - qwen3(input_ids=ids).logits).abs().max().item()
    assert delta < 1e-4


def source_merger_output(model, inputs) -> torch.Tensor:
    """The vision tower's output at the source merger's last layer (mlp.2), before Qwen-Merge's new mlp.3/mlp.4."""
    captured = []
    handle = model.model.visual.merger.mlp[2].register_forward_hook(lambda mod, i, o: captured.append(o))
    with torch.no_grad():
        model.model.visual(inputs.pixel_values, grid_thw=inputs.image_grid_thw)
    handle.remove()
    return captured[0]


def test_vision_features_equal_the_source_qwen25vl(tiny_merged, tiny_qwen25vl, sample_images):
    inputs = image_inputs(tiny_merged, [Image.open(sample_images[0])])
    source = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen25vl, attn_implementation="eager").eval()
    model = load(tiny_merged)
    # same weights, same code: bit-identical
    assert torch.equal(source_merger_output(model, inputs), source_merger_output(source, inputs))
    with torch.no_grad():
        final = model.model.visual(inputs.pixel_values, grid_thw=inputs.image_grid_thw)
    assert final.shape[-1] == model.config.text_config.hidden_size


def test_auto_classes_and_no_shadowing(tiny_merged):
    config = AutoConfig.from_pretrained(tiny_merged)
    assert type(config).__name__ == "Qwen2_5_VL_MergeConfig"
    assert config.text_config.head_dim == 64 and config.vision_config.out_hidden_size2 == config.hidden_size
    for auto in (AutoModelForImageTextToText, AutoModelForVision2Seq):
        assert type(auto.from_pretrained(tiny_merged)).__name__ == "Qwen2_5_VL_MergeForConditionalGeneration"
    assert type(AutoModel.from_pretrained(tiny_merged)).__name__ == "Qwen2_5_VL_MergeModel"
    assert type(AutoProcessor.from_pretrained(tiny_merged)).__name__ == "Qwen2_5_VLProcessor"
    assert type(AutoImageProcessor.from_pretrained(tiny_merged)).__name__.startswith("Qwen2VLImageProcessor")
    assert type(AutoVideoProcessor.from_pretrained(tiny_merged)).__name__ == "Qwen2VLVideoProcessor"
    assert type(AutoTokenizer.from_pretrained(tiny_merged)).__name__ == "Qwen2TokenizerFast"
    assert type(AutoTokenizer.from_pretrained(tiny_merged, use_fast=False)).__name__ == "Qwen2Tokenizer"
    # upstream names still resolve to upstream classes
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl, processing_qwen2_5_vl
    assert transformers.Qwen2_5_VLModel is modeling_qwen2_5_vl.Qwen2_5_VLModel
    assert transformers.Qwen2_5_VLProcessor is processing_qwen2_5_vl.Qwen2_5_VLProcessor
    assert transformers.Qwen2_5_VL_MergeForConditionalGeneration.__module__.endswith("modeling_qwen2_5_vl_merge")


def test_flat_and_nested_layouts_load_and_round_trip(tiny_merged, tmp_path):
    model, info = AutoModelForImageTextToText.from_pretrained(tiny_merged, attn_implementation="eager",
                                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.save_pretrained(tmp_path / "resaved")
    with safe_open(str(tmp_path / "resaved/model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.language_model.") for k in keys)
    assert any(k.startswith("model.visual.") for k in keys)
    reloaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "resaved", attn_implementation="eager",
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    a, b = model.eval().state_dict(), reloaded.eval().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved_config = json.loads((tmp_path / "resaved/config.json").read_text())
    assert "text_config" in saved_config and saved_config["hidden_size"] == saved_config["text_config"]["hidden_size"]


def test_original_recipe_checkpoint_loads_unchanged(tiny_merged, tiny_qwen25vl, tiny_qwen3, tmp_path):
    """A checkpoint laid out as the original recipe writes it: VLM-first config merge (LLM wins conflicts except
    model_type/architectures/rope_scaling), vision_config without a model_type of ours, flat keys."""
    import shutil
    vlm = json.loads((tiny_qwen25vl / "config.json").read_text())
    llm = json.loads((tiny_qwen3 / "config.json").read_text())
    config = dict(vlm)
    for k, v in llm.items():
        if k not in config or (config[k] != v and k not in ("model_type", "architectures", "rope_scaling")):
            config[k] = v
    config["vision_config"] = {**vlm["vision_config"], "out_hidden_size2": llm["hidden_size"]}
    config.update(model_type="qwen2_5_vl_merge", architectures=["Qwen2_5_VL_MergeForConditionalGeneration"],
                  torch_dtype="bfloat16")
    original = tmp_path / "original"
    shutil.copytree(tiny_merged, original)
    (original / "config.json").write_text(json.dumps(config))
    ours, theirs = load(tiny_merged), load(original)
    ids = torch.tensor([[9707, 220, 99489, 16, 17]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_sdpa_matches_eager_and_gradient_checkpointing_matches(tiny_merged, sample_images):
    inputs = image_inputs(tiny_merged, [Image.open(p) for p in sample_images[:2]])
    eager, sdpa = load(tiny_merged, "eager"), load(tiny_merged, "sdpa")
    with torch.no_grad():
        a, b = eager(**inputs).logits, sdpa(**inputs).logits
    assert (a - b).abs().max().item() < 1e-3 * a.abs().max().item()

    @torch.enable_grad()  # other in-process engines (vLLM V0) may leave grad mode off
    def grads(checkpointing: bool):
        model = load(tiny_merged, "eager").train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(**inputs, labels=inputs.input_ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_plain, g_plain = grads(False)
    loss_ckpt, g_ckpt = grads(True)
    assert loss_plain == pytest.approx(loss_ckpt, rel=1e-6)
    assert g_plain.keys() == g_ckpt.keys() and any("visual.blocks" in n for n in g_plain)
    assert all(torch.allclose(g_plain[n], g_ckpt[n], rtol=1e-4, atol=1e-6) for n in g_plain)


def test_chat_template_renders_images_and_history(tiny_merged):
    processor = AutoProcessor.from_pretrained(tiny_merged)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "<think>\nIt looks like a cat.\n</think>\n\nA cat."},
        {"role": "user", "content": "And its colour?"},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nWhat is this?<|im_end|>\n"
                    "<|im_start|>assistant\nA cat.<|im_end|>\n"
                    "<|im_start|>user\nAnd its colour?<|im_end|>\n<|im_start|>assistant\n")
    last = processor.apply_chat_template(messages[:2])
    assert last.endswith("<|im_start|>assistant\n<think>\nIt looks like a cat.\n</think>\n\nA cat.<|im_end|>\n")
    no_think = processor.apply_chat_template(messages[:1], add_generation_prompt=True, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_generate_with_images_and_video(tiny_merged, sample_images):
    model = load(tiny_merged, "sdpa")
    inputs = image_inputs(tiny_merged, [Image.open(p) for p in sample_images[:2]], "Compare the two pictures.")
    n_pad = int((inputs.input_ids == model.config.image_token_id).sum())
    assert n_pad == int((inputs.image_grid_thw.prod(-1) // 4).sum())
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == inputs.input_ids.shape[1] + 6

    processor = AutoProcessor.from_pretrained(tiny_merged)
    frames = np.stack([np.asarray(Image.open(p).convert("RGB").resize((112, 112))) for p in sample_images[:4]])
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True)
    video_inputs = processor(text=[text], videos=[frames], return_tensors="pt")
    assert int((video_inputs.input_ids == model.config.video_token_id).sum()) > 0
    with torch.no_grad():
        out = model.generate(**video_inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == video_inputs.input_ids.shape[1] + 6


# Bugs of the class the parity tests above must catch, applied to a correct merged model: (what, mutation).
TEXT_LAYER = "model.language_model.layers.0."
VISION_BLOCK = "model.visual.blocks.0."
WEIGHT_MISTAKES = {
    "q_norm_and_k_norm_swapped": ("text", ("swap", TEXT_LAYER + "self_attn.q_norm.weight",
                                           TEXT_LAYER + "self_attn.k_norm.weight")),
    "fused_norm_drops_its_weight": ("text", ("ones", TEXT_LAYER + "input_layernorm.weight")),
    "final_norm_drops_its_weight": ("text", ("ones", "model.language_model.norm.weight")),
    "vision_norm1_and_norm2_swapped": ("vision", ("swap", VISION_BLOCK + "norm1.weight", VISION_BLOCK + "norm2.weight")),
    "vision_qkv_bias_dropped": ("vision", ("zeros", VISION_BLOCK + "attn.qkv.bias")),
    "vision_mlp_biases_of_two_blocks_swapped": ("vision", ("swap", VISION_BLOCK + "mlp.down_proj.bias",
                                                           "model.visual.blocks.1.mlp.down_proj.bias")),
    "merger_bias_dropped": ("vision", ("zeros", "model.visual.merger.mlp.0.bias")),
}


def apply_mistake(model, mistake) -> None:
    kind, *names = mistake
    params = dict(model.named_parameters())
    with torch.no_grad():
        if kind == "swap":
            a, b = (params[n] for n in names)
            saved = a.clone()
            a.copy_(b)
            b.copy_(saved)
        else:
            params[names[0]].fill_(1.0 if kind == "ones" else 0.0)


def reset_to_init_values(*models) -> None:
    """What the fixtures used to be: every norm weight 1 and every bias 0 (transformers' init)."""
    with torch.no_grad():
        for model in models:
            for module in model.modules():
                for name, param in module.named_parameters(recurse=False):
                    if name == "bias":
                        param.zero_()
                    elif name == "weight" and "norm" in type(module).__name__.lower():
                        param.fill_(1.0)


@pytest.fixture(scope="module")
def parity_inputs(tiny_merged, tiny_qwen3, tiny_qwen25vl, sample_images):
    ids = AutoTokenizer.from_pretrained(tiny_qwen3)(TEXT, return_tensors="pt").input_ids
    images = image_inputs(tiny_merged, [Image.open(sample_images[0])])
    qwen3 = AutoModelForCausalLM.from_pretrained(tiny_qwen3, attn_implementation="eager").eval()
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen25vl, attn_implementation="eager").eval()
    return ids, images, qwen3, vlm


def parity_gap(model, source, part, ids, images) -> float:
    """What the parity tests measure: max |merged - source| of text logits, or of the source merger's output."""
    with torch.no_grad():
        if part == "text":
            return (model(input_ids=ids).logits - source(input_ids=ids).logits).abs().max().item()
    return (source_merger_output(model, images) - source_merger_output(source, images)).abs().max().item()


@pytest.mark.parametrize("mistake", list(WEIGHT_MISTAKES))
def test_realistic_fixture_exposes_norm_and_bias_mistakes(tiny_merged, parity_inputs, mistake):
    """Each mistake moves the merged model far past the parity tolerances (1e-4 on text logits, bit-equality on
    vision features), while on init-valued weights (norms 1, biases 0: the fixtures before) it is invisible."""
    ids, images, qwen3, vlm = parity_inputs
    part, change = WEIGHT_MISTAKES[mistake]
    source = qwen3 if part == "text" else vlm
    model = load(tiny_merged)
    assert parity_gap(model, source, part, ids, images) < 1e-4
    apply_mistake(model, change)
    assert parity_gap(model, source, part, ids, images) > 1e-2, "the parity tests would not see this mistake"

    init_model, init_source = load(tiny_merged), copy.deepcopy(source)
    reset_to_init_values(init_model, init_source)
    apply_mistake(init_model, change)
    assert parity_gap(init_model, init_source, part, ids, images) < 1e-4  # the old fixtures hid it


def test_top_level_text_fields_are_the_text_config(tiny_merged, tmp_path):
    """vLLM and LLaMA-Factory read and set the top-level text fields, transformers' own code the `text_config`: they
    must be one value (a resized vocabulary used to be saved with two different vocab_size values)."""
    model = load(tiny_merged)
    new_vocab = model.config.vocab_size + 64
    model.resize_token_embeddings(new_vocab)
    assert model.config.vocab_size == model.config.text_config.vocab_size == new_vocab
    model.config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vocab_size"] == saved["text_config"]["vocab_size"] == new_vocab
    assert saved["hidden_size"] == saved["text_config"]["hidden_size"]  # still flat + nested, as vLLM reads it
    config = AutoConfig.from_pretrained(tmp_path)
    config.rope_theta = 5e6  # set at the top level, as users and LLaMA-Factory do
    assert config.text_config.rope_theta == 5e6 and config.to_dict()["rope_theta"] == 5e6
    # A file saved before the fix (stale top level) resolves the way the model is built: from text_config.
    saved["vocab_size"] = 1
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert AutoConfig.from_pretrained(tmp_path).vocab_size == new_vocab
