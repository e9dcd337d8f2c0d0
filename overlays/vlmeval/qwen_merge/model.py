"""VLMEvalKit model class for Qwen-Merge checkpoints.

Registered as ``Qwen-Merge-VL-4B`` / ``Qwen-Merge-VL-8B`` / ``Qwen-Merge-VL-30B-A3B`` (the Qwen3-MoE text side,
``$QWEN_MERGE_30B_A3B_PATH``; the backends load either kind from the checkpoint's config):

    export QWEN_MERGE_4B_PATH=/ckpt/Qwen-Merge-VL-4B-stage3
    export QWEN_MERGE_4B_ARGS='{"max_new_tokens": 16384}'     # optional: constructor options as JSON
    python -m vlmeval.run --data MMBench_DEV_EN --model Qwen-Merge-VL-4B [--use-vllm]

or any options through ``run.py --config cfg.json``: ``{"model": {"Qwen-Merge-VL-4B": {"greedy": true}}, ...}``
(the registered entry plus overrides) or ``{"model": {"my-run": {"class": "QwenMergeChat", "model_path": ...}}}``.
Options given explicitly win over ``$<prefix>_ARGS``. ``--use-vllm`` selects vLLM, otherwise transformers.

The checkpoint's config.json decides what it is (``eval.generation``): Qwen-Merge gets Qwen3 thinking sampling
(temperature 0.6, top_p 0.95, top_k 20, seeded per request with ``seed``, default 0, so reruns reproduce) unless
``greedy`` is set; the scored prediction is the text after ``</think>``. A thought that runs out of
``max_new_tokens`` is closed and answered within ``answer_budget`` tokens; if that is 0, ``on_truncated`` decides
what is scored (see ``eval.answers``). Images keep their size within the checkpoint processor's limits unless
``min_pixels`` / ``max_pixels`` are given (no forced upscaling of small images).
"""
from __future__ import annotations

import json
import os

from ...smp import get_logger
from ..base import BaseModel
from ..qwen2_vl.prompt import Qwen2VLPromptMixin
from .answers import TRUNCATION_POLICIES, boxed_content
from .generation import SamplingSettings, describe, load_backend, load_image


def options_from_env(prefix: str) -> dict:
    """Constructor options from ``$<prefix>_ARGS`` (a JSON object), or {}."""
    raw = os.environ.get(f"{prefix}_ARGS", "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"${prefix}_ARGS is not valid JSON: {err}") from None
    if not isinstance(options, dict):
        raise ValueError(f"${prefix}_ARGS must be a JSON object of QwenMergeChat options, got {raw!r}")  # noqa: TRY004
    return options


class QwenMergeChat(Qwen2VLPromptMixin, BaseModel):
    INSTALL_REQ = False
    INTERLEAVE = True
    allowed_types = ("text", "image")

    def __init__(self, model_path: str | None = None, env_prefix: str | None = None, **options):
        if env_prefix:
            options = {**options_from_env(env_prefix), **options}
            model_path = model_path or os.environ.get(f"{env_prefix}_PATH")
        super().__init__(use_custom_prompt=options.pop("use_custom_prompt", False))
        if not model_path:
            hint = f"set ${env_prefix}_PATH to the checkpoint directory or " if env_prefix else ""
            raise ValueError(f"QwenMergeChat: no checkpoint given; {hint}pass model_path (run.py --config)")
        self._configure(str(model_path), **options)

    def _configure(self, model_path: str, use_vllm: bool = False, greedy: bool | None = None,
                   max_new_tokens: int = 16384, temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None, repetition_penalty: float | None = None, seed: int | None = 0,
                   min_pixels: int | None = None, max_pixels: int | None = None, system_prompt: str | None = None,
                   enable_thinking: bool = True, answer_budget: int = 1024, on_truncated: str = "tail",
                   post_process: bool = False, verbose: bool = False, **backend_options):
        if on_truncated not in TRUNCATION_POLICIES:
            raise ValueError(f"on_truncated must be one of {TRUNCATION_POLICIES}, got {on_truncated!r}")
        self.model_path = model_path
        self.backend = load_backend(model_path, "vllm" if use_vllm else "hf", **backend_options)
        self.sampling = SamplingSettings.for_checkpoint(
            self.backend.info, greedy=greedy, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, repetition_penalty=repetition_penalty, seed=seed)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.system_prompt, self.enable_thinking = system_prompt, enable_thinking
        self.answer_budget, self.on_truncated = answer_budget, on_truncated
        self.post_process, self.verbose = post_process, verbose
        self.truncated_thoughts = 0
        self.logger = get_logger("QwenMergeChat")
        self.logger.info(f"{model_path}: {self.backend.info.model_type} on {self.backend.name}; "
                         f"{describe(self.sampling)}")

    def generate_inner(self, message, dataset=None):
        content, images = [], []
        for item in message:
            if item["type"] == "image":
                images.append(load_image(item["value"], self.min_pixels, self.max_pixels))
                content.append({"type": "image"})
            else:
                content.append({"type": "text", "text": item["value"]})
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": content})
        prompt = self.backend.render(messages, self.enable_thinking)
        reply = self.backend.reply(prompt, images, self.sampling, self.answer_budget)
        if reply.forced_answer or reply.truncated:
            self.truncated_thoughts += 1
            self.logger.warning(f"thought cut at max_new_tokens={self.sampling.max_new_tokens} "
                                f"({self.truncated_thoughts} so far); "
                                + ("answered after closing it" if reply.forced_answer else
                                   f"scoring per on_truncated={self.on_truncated!r}"))
        answer = reply.answer(self.on_truncated)
        if self.post_process:
            answer = boxed_content(answer) or answer
        if self.verbose:
            print(f"\033[31m{prompt}\033[0m\n\033[32m{reply.text}\033[0m\n=> {answer!r}", flush=True)
        return answer
