"""A real `vllm serve` process (V1 engine in its own process, bfloat16) on the untied Qwen-Merge checkpoint (separate
lm_head, like Qwen-Merge-VL-8B): the OpenAI chat endpoint accepts a base64 `image_url` part for model_type
`qwen2_5_vl_merge` and answers; text-only requests are sent separately (vLLM 0.9.1 CPU cannot batch them together)."""
from __future__ import annotations

import base64

import pytest
import requests

from tests.test_serve_support import QUESTION, chat_prompt, hf_inputs, load_images
from examples.tiny.vllm_server import vllm_server

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tiny_merged_untied, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "HF_HUB_OFFLINE": "1"}
    with vllm_server(tiny_merged_untied, served_model_name="qwen-merge", env=env, log_file=log,
                     extra_args=["--max-model-len", "1024", "--max-num-seqs", "2"]) as srv:
        yield srv


def chat(server, content) -> dict:
    body = {"model": "qwen-merge", "messages": [{"role": "user", "content": content}],
            "max_tokens": MAX_TOKENS, "temperature": 0.0}
    response = requests.post(server.base_url + "/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, f"{response.status_code}: {response.text}\n{server.log_tail()}"
    return response.json()


def image_url_part(path) -> dict:
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def test_chat_completion_with_a_base64_image(server, tiny_merged_untied, sample_images):
    path = sample_images[0]
    reply = chat(server, [image_url_part(path), {"type": "text", "text": QUESTION}])
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert 0 < reply["usage"]["completion_tokens"] <= MAX_TOKENS
    # The server rendered our chat template with one vision placeholder and expanded it for this image exactly as
    # transformers does: same prompt length, image tokens included.
    prompt = chat_prompt(tiny_merged_untied, QUESTION, n_images=1)
    expected = hf_inputs(tiny_merged_untied, prompt, load_images([path])).input_ids.shape[1]
    assert reply["usage"]["prompt_tokens"] == expected


def test_chat_completion_text_only(server, tiny_merged_untied):
    reply = chat(server, QUESTION)
    assert reply["choices"][0]["message"]["content"]
    expected = hf_inputs(tiny_merged_untied, chat_prompt(tiny_merged_untied, QUESTION), []).input_ids.shape[1]
    assert reply["usage"]["prompt_tokens"] == expected
