"""Offline vLLM (`LLM.generate`) on the tiny Qwen-Merge checkpoint exactly as the merger writes it (flat keys, tied
embeddings, float32, so vLLM runs its V0 engine): text, one image and two images in one prompt, and parity with
transformers (greedy tokens equal, first-step top-5 log-probabilities within 1e-3)."""
from __future__ import annotations

import pytest

from tests.test_serve_support import QUESTION, chat_prompt, greedy, hf_greedy, hf_inputs, load_images, vllm_engine

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

MAX_TOKENS = 8
LOGPROB_TOLERANCE = 1e-3
IMAGE_COUNTS = pytest.mark.parametrize("n_images", [0, 1, 2], ids=["text", "one_image", "two_images"])


@pytest.fixture(scope="module")
def llm(tiny_merged):
    with vllm_engine(tiny_merged, "float32") as engine:
        yield engine


@IMAGE_COUNTS
def test_generates_from_the_same_prompt_tokens_as_transformers(llm, tiny_merged, sample_images, n_images):
    images = load_images(sample_images[:n_images])
    prompt = chat_prompt(tiny_merged, QUESTION, n_images)
    out = greedy(llm, prompt, images, max_tokens=MAX_TOKENS)
    expected_ids = hf_inputs(tiny_merged, prompt, images).input_ids[0].tolist()
    # vLLM's multimodal processor expanded each placeholder to one <|image_pad|> per merged patch, like transformers.
    assert out.prompt_token_ids == expected_ids
    assert 1 <= len(out.outputs[0].token_ids) <= MAX_TOKENS


@IMAGE_COUNTS
def test_float32_parity_with_transformers(llm, tiny_merged, sample_images, n_images):
    images = load_images(sample_images[-n_images:] if n_images else [])
    prompt = chat_prompt(tiny_merged, QUESTION, n_images)
    out = greedy(llm, prompt, images, max_tokens=MAX_TOKENS, logprobs=5).outputs[0]
    hf_tokens, hf_top5 = hf_greedy(tiny_merged, prompt, images, MAX_TOKENS)
    assert list(out.token_ids) == hf_tokens
    vllm_first = {token: lp.logprob for token, lp in out.logprobs[0].items()}
    assert set(hf_top5) <= set(vllm_first), (hf_top5, vllm_first)
    worst = max(abs(vllm_first[t] - hf_top5[t]) for t in hf_top5)
    assert worst <= LOGPROB_TOLERANCE, f"first-step top-5 logprobs differ by {worst:.2e}"
