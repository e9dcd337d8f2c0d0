"""Qwen-Merge-VL-30B-A3B in miniature served by vLLM (one engine for this module): the tiny Qwen3-MoE merge runs with
vLLM's Qwen3MoeForCausalLM as its text side (fused experts, routers, the dense mlp_only layer) and generates what
transformers generates, for a text prompt and an image prompt (greedy tokens equal, first-step top-5 log-probabilities
within 1e-3)."""
from __future__ import annotations

import pytest

from tests.test_serve_support import QUESTION, chat_prompt, greedy, hf_greedy, load_images, vllm_engine

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

MAX_TOKENS = 8
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def llm(tiny_merged_moe):
    with vllm_engine(tiny_merged_moe, "float32") as engine:
        yield engine


def test_vllm_builds_the_moe_text_model(llm):
    from vllm.model_executor.layers.fused_moe import FusedMoE

    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    text = model.language_model
    assert type(text).__name__ == "Qwen3MoeForCausalLM"
    layers = text.model.layers
    assert isinstance(layers[0].mlp.experts, FusedMoE) and layers[0].mlp.experts.global_num_experts == 6
    assert type(layers[1].mlp).__name__ == "Qwen3MoeMLP"  # mlp_only_layers [1]


@pytest.mark.parametrize("n_images", [0, 1], ids=["text", "one_image"])
def test_vllm_generates_what_transformers_generates(llm, tiny_merged_moe, sample_images, n_images):
    images = load_images(sample_images[:n_images])
    prompt = chat_prompt(tiny_merged_moe, QUESTION, n_images)
    out = greedy(llm, prompt, images, max_tokens=MAX_TOKENS, logprobs=5).outputs[0]
    hf_tokens, hf_top5 = hf_greedy(tiny_merged_moe, prompt, images, MAX_TOKENS)
    assert len(hf_tokens) > 1 and list(out.token_ids) == hf_tokens
    vllm_first = {token: lp.logprob for token, lp in out.logprobs[0].items()}
    assert set(hf_top5) <= set(vllm_first), (hf_top5, vllm_first)
    worst = max(abs(vllm_first[t] - hf_top5[t]) for t in hf_top5)
    assert worst <= LOGPROB_TOLERANCE, f"first-step top-5 logprobs differ by {worst:.2e}"
