"""A Qwen-Merge checkpoint re-saved by transformers (`save_pretrained` writes the nested key layout
`model.visual.*` / `model.language_model.*`, as LLaMA-Factory training output does) loads into vLLM with every weight
in place, and generates on the V1 engine (bfloat16, as users serve it)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.test_serve_support import QUESTION, chat_prompt, greedy, load_images, vllm_engine

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

# transformers (nested) prefixes -> vLLM module prefixes, and vLLM's fused decoder projections.
NESTED_TO_VLLM = {"model.visual.": "visual.", "model.language_model.": "language_model.model.",
                  "lm_head.": "language_model.lm_head."}
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@pytest.fixture(scope="module")
def nested_checkpoint(tiny_merged, tmp_path_factory):
    """tiny_merged trained for zero steps: re-saved in bfloat16 with its processor, like a LLaMA-Factory output."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    out = tmp_path_factory.mktemp("nested-checkpoint")
    model = AutoModelForImageTextToText.from_pretrained(tiny_merged, torch_dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_merged).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llm(nested_checkpoint):
    with vllm_engine(nested_checkpoint, "bfloat16") as engine:
        yield engine


def expected_vllm_weights(checkpoint_dir) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under vLLM's parameter names (q/k/v and gate/up stacked as vLLM fuses them)."""
    expected = {}
    for name, tensor in load_file(str(checkpoint_dir / "model.safetensors")).items():
        prefix = next((p for p in NESTED_TO_VLLM if name.startswith(p)), None)
        assert prefix is not None, f"not a nested-layout key: {name}"
        expected[NESTED_TO_VLLM[prefix] + name[len(prefix):]] = tensor
    for fused, parts in FUSED.items():
        firsts = [n for n in expected if n.startswith("language_model.") and f".{parts[0]}." in n]
        for first in firsts:
            pieces = [expected.pop(first.replace(f".{parts[0]}.", f".{part}.")) for part in parts]
            expected[first.replace(f".{parts[0]}.", f".{fused}.")] = torch.cat(pieces)
    return expected


def vllm_weights(llm) -> dict[str, torch.Tensor]:
    [weights] = llm.collective_rpc(lambda worker: {n: p.detach().clone()
                                                   for n, p in worker.model_runner.model.named_parameters()})
    return weights


def test_checkpoint_is_nested_and_runs_on_v1(nested_checkpoint, llm):
    from vllm.v1.engine.llm_engine import LLMEngine as V1Engine
    keys = load_file(str(nested_checkpoint / "model.safetensors")).keys()
    assert any(k.startswith("model.visual.merger.mlp.4.") for k in keys)
    assert any(k.startswith("model.language_model.layers.") for k in keys)
    assert isinstance(llm.llm_engine, V1Engine)


def test_every_weight_loads_from_the_nested_layout(nested_checkpoint, llm):
    expected, loaded = expected_vllm_weights(nested_checkpoint), vllm_weights(llm)
    assert sorted(loaded) == sorted(expected)
    mismatched = [n for n in expected if not torch.equal(loaded[n], expected[n].to(loaded[n].dtype))]
    assert not mismatched, mismatched[:5]


def test_generates_text_and_images(nested_checkpoint, llm, sample_images):
    text_out = greedy(llm, chat_prompt(nested_checkpoint, QUESTION)).outputs[0].token_ids
    assert len(text_out) > 0
    image_prompt = chat_prompt(nested_checkpoint, QUESTION, n_images=1)
    by_image = [tuple(greedy(llm, image_prompt, load_images([path])).outputs[0].token_ids)
                for path in sample_images[:2]]
    assert all(by_image) and by_image[0] != by_image[1], "the image does not reach the language model"
