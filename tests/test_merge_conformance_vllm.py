"""A representative conformance row served by vLLM (one engine for this module): the published Qwen2.5-VL-7B-Instruct
config (sparse vision_config without out_hidden_size: 32 blocks, windowed attention, full attention at 7/15/23/31)
merged with the published Qwen3-4B-Instruct-2507 config (rope_theta 5e6, 262144 positions, head_dim 128), weights
shrunk as in test_merge_conformance.py. vLLM must generate what transformers generates from the same checkpoint, for a
text prompt and an image prompt (greedy tokens equal, first-step top-5 log-probabilities within 1e-3)."""
from __future__ import annotations

import pytest

from merge import model_merger
from tests.test_merge_conformance import Weights, sources_of
from tests.test_serve_support import QUESTION, chat_prompt, greedy, hf_greedy, load_images, vllm_engine

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

ROW = ("qwen2_5_vl_7b.hub", "qwen3_4b_instruct_2507")
MAX_TOKENS = 6
LOGPROB_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def merged(tmp_path_factory, fixture_paths, tiny_qwen25vl):
    from examples.tiny import tiny_models

    root = tmp_path_factory.mktemp("conformance-vllm")
    processor_files = [tiny_qwen25vl / f for f in ("preprocessor_config.json", "video_preprocessor_config.json")
                       if (tiny_qwen25vl / f).is_file()]
    weights = Weights(root / "weights", fixture_paths["tokenizer"], processor_files)
    (root / "weights").mkdir()
    vlm, llm, _, _ = sources_of(weights, root / "row", *ROW)
    out = root / "merged"
    # float32 (vLLM runs it on its V0 engine, like test_serve_offline); small images keep prompts under max_model_len
    model_merger.merge(vlm, llm, out, dtype="float32", quiet=True, image_min_pixels=tiny_models.MIN_PIXELS,
                       image_max_pixels=tiny_models.MAX_PIXELS)
    return out


@pytest.fixture(scope="module")
def llm(merged):
    with vllm_engine(merged, "float32") as engine:
        yield engine


@pytest.mark.parametrize("n_images", [0, 1], ids=["text", "one_image"])
def test_vllm_generates_what_transformers_generates(llm, merged, sample_images, n_images):
    images = load_images(sample_images[:n_images])
    prompt = chat_prompt(merged, QUESTION, n_images)
    out = greedy(llm, prompt, images, max_tokens=MAX_TOKENS, logprobs=5).outputs[0]
    hf_tokens, hf_top5 = hf_greedy(merged, prompt, images, MAX_TOKENS)
    assert list(out.token_ids) == hf_tokens
    vllm_first = {token: lp.logprob for token, lp in out.logprobs[0].items()}
    assert set(hf_top5) <= set(vllm_first), (hf_top5, vllm_first)
    worst = max(abs(vllm_first[t] - hf_top5[t]) for t in hf_top5)
    assert worst <= LOGPROB_TOLERANCE, f"first-step top-5 logprobs differ by {worst:.2e}"
