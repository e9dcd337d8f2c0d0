"""Shared pieces of the vLLM serving tests (test_serve_*.py); this module holds no tests.

vLLM 0.9.1 CPU crashes when a text-only and an image prompt share a batch (stock Qwen2.5-VL too), so every test sends
its prompts one `generate` call at a time.
"""
from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

# Small CPU engines; in-process V1 (no engine-core process) starts faster. V0 (float32) always runs in-process.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false"}
ENGINE_KWARGS = dict(max_model_len=1024, enforce_eager=True, max_num_seqs=2, seed=0, limit_mm_per_prompt={"image": 2})
QUESTION = "Describe the picture in detail."


def user_turn(text: str, n_images: int) -> list[dict]:
    """One user message with `n_images` image items before the text (OpenAI-style content list)."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


@functools.lru_cache(maxsize=4)
def hf_processor(model_dir: Path):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(model_dir)


@functools.lru_cache(maxsize=1)
def hf_model(model_dir: Path):
    """The transformers model in float32 with SDPA attention (the attention vLLM's CPU backend uses)."""
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                       attn_implementation="sdpa").eval()


def chat_prompt(model_dir: Path, text: str, n_images: int = 0) -> str:
    """The model's own chat template rendered for one user turn, ready for generation."""
    return hf_processor(model_dir).apply_chat_template(user_turn(text, n_images), add_generation_prompt=True)


def load_images(paths: Sequence[Path]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in paths]


def vllm_request(prompt: str, images: Sequence[Image.Image]) -> dict:
    return {"prompt": prompt, "multi_modal_data": {"image": list(images)}} if images else {"prompt": prompt}


@contextlib.contextmanager
def vllm_engine(model_dir: Path, dtype: str) -> Iterator[object]:
    """A `vllm.LLM` on CPU for one test module; torn down (memory and process group) on exit.

    VLLM_USE_V1 is left unset so vLLM picks the engine per model (float32 runs only on V0 on CPU). Setting it
    at import time would bind `vllm.LLMEngine` to one engine class for the whole process, and the V0 fallback writes
    VLLM_USE_V1=0 into the environment, which must not leak into the next module's engine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("VLLM_USE_V1", raising=False)
        for key, value in ENGINE_ENV.items():
            mp.setenv(key, value)
        from vllm import LLM
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        llm = LLM(model=str(model_dir), dtype=dtype, **ENGINE_KWARGS)
        try:
            yield llm
        finally:
            del llm
            gc.collect()
            cleanup_dist_env_and_memory()


def greedy(llm, prompt: str, images: Sequence[Image.Image] = (), max_tokens: int = 8, logprobs: int | None = None):
    """Greedy completion of one prompt: the vLLM `RequestOutput` (prompt ids, generated ids, logprobs)."""
    from vllm import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs)
    [out] = llm.generate([vllm_request(prompt, images)], params, use_tqdm=False)
    return out


def hf_inputs(model_dir: Path, prompt: str, images: Sequence[Image.Image]):
    """transformers' processor output for the prompt (image placeholders expanded to one pad per merged patch)."""
    return hf_processor(model_dir)(text=[prompt], images=list(images) or None, return_tensors="pt")


def hf_greedy(model_dir: Path, prompt: str, images: Sequence[Image.Image], max_new_tokens: int,
              top_k: int = 5) -> tuple[list[int], dict[int, float]]:
    """transformers' greedy tokens (up to EOS, as vLLM stops) and its first-step top-k log-probabilities."""
    inputs = hf_inputs(model_dir, prompt, images)
    with torch.no_grad():
        out = hf_model(model_dir).generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                           output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs.input_ids.shape[1]:].tolist()
    first = torch.log_softmax(out.logits[0][0].float(), dim=-1)
    values, ids = first.topk(top_k)
    return tokens, dict(zip(ids.tolist(), values.tolist()))
