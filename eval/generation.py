"""Generate with a Qwen-Merge checkpoint (or a stock Qwen2-VL / Qwen2.5-VL one) through transformers or vLLM.

What a checkpoint is comes from its own config.json, never from its path: model_type ``qwen2_5_vl_merge`` is
Qwen-Merge, a Qwen3 thinking model, sampled by default with Qwen3's thinking settings (temperature 0.6, top_p 0.95,
top_k 20); stock Qwen2-VL / Qwen2.5-VL checkpoints default to greedy decoding. ``greedy=True`` asks for greedy.

Both backends run on GPU or CPU: transformers uses SDPA attention and ``device_map="auto"`` only when CUDA is
there; vLLM picks its tensor-parallel size from the visible GPUs (1 on CPU). With ``dtype="auto"`` both run the
checkpoint's own dtype.

This module is also installed into VLMEvalKit by the vlmeval overlay (``vlmeval/vlm/qwen_merge/``): it imports only
transformers and ``.answers`` at module level; torch, vLLM and qwen_vl_utils are imported when used.
"""
from __future__ import annotations

import inspect
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from transformers import TextStreamer

from .answers import THINK_OPEN, final_answer, split_thinking

QWEN_MERGE_MODEL_TYPE = "qwen2_5_vl_merge"
STOCK_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# Appended to a thought that ran out of budget, so that the model still gives its answer.
FORCED_ANSWER_CUE = "\n\nI have used up my thinking budget, so I will give my final answer now.\n</think>\n\n"

TextCallback = Callable[[str], None]


class CheckpointError(ValueError):
    """The path is not a checkpoint this module can run."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    model_type: str
    num_attention_heads: int
    torch_dtype: str | None  # the weights' dtype per config.json

    @property
    def is_qwen_merge(self) -> bool:
        return self.model_type == QWEN_MERGE_MODEL_TYPE


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read what the checkpoint is from its config.json."""
    config_file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not config_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: invalid JSON ({err})") from None
    model_type = config.get("model_type")
    if model_type not in (QWEN_MERGE_MODEL_TYPE, *STOCK_VL_MODEL_TYPES):
        raise CheckpointError(f"{path}: model_type {model_type!r} is neither Qwen-Merge ({QWEN_MERGE_MODEL_TYPE!r}) "
                              f"nor a stock Qwen-VL ({', '.join(STOCK_VL_MODEL_TYPES)})")
    text_config = config.get("text_config") or {}
    heads = config.get("num_attention_heads") or text_config.get("num_attention_heads", 1)
    dtype = config.get("torch_dtype") or text_config.get("torch_dtype")
    return CheckpointInfo(os.path.abspath(path), model_type, int(heads), dtype)


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 16384
    greedy: bool = False
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20             # <= 0: no top-k
    repetition_penalty: float = 1.0
    seed: int | None = None     # set per request: the same prompt and seed give the same sample

    @classmethod
    def for_checkpoint(cls, info: CheckpointInfo, greedy: bool | None = None, **overrides) -> SamplingSettings:
        """Defaults for the checkpoint (thinking sampling for Qwen-Merge, greedy otherwise); None means default."""
        settings = cls(greedy=(not info.is_qwen_merge) if greedy is None else bool(greedy))
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None}).validated()

    def validated(self) -> SamplingSettings:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {self.temperature}, "
                             f"{self.top_p}); use greedy decoding instead of temperature 0")
        return self


@dataclass(frozen=True)
class Completion:
    text: str
    hit_limit: bool  # stopped because max_new_tokens ran out


@dataclass(frozen=True)
class Reply:
    text: str                # everything generated, thought included (and the forced-answer cue if used)
    thinking_open: bool      # the prompt itself opened the thought
    forced_answer: bool      # the thought ran out of budget and was closed by FORCED_ANSWER_CUE

    @property
    def truncated(self) -> bool:
        return split_thinking(self.text, self.thinking_open).truncated

    def answer(self, on_truncated: str = "tail") -> str:
        return final_answer(self.text, self.thinking_open, on_truncated)


def load_image(source: str | Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """A PIL image from a path, URL or data URI, resized to a multiple of 28 within [min_pixels, max_pixels]."""
    from qwen_vl_utils import fetch_image

    source = str(source)
    if "://" not in source and not source.startswith("data:") and not Path(source).is_file():
        raise FileNotFoundError(f"image not found: {source}")
    item = {"image": source, **{k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}}
    try:
        return fetch_image(item)
    except Exception as err:  # noqa: BLE001 - PIL and requests raise many types; the caller wants one line
        raise ValueError(f"cannot read image {source}: {err}") from None


class Backend:
    """Prompt rendering (the checkpoint's chat template) and the reply loop shared by both engines."""

    name = ""

    def __init__(self, info: CheckpointInfo):
        from transformers import AutoProcessor

        self.info = info
        self.processor = AutoProcessor.from_pretrained(info.path)

    def render(self, messages: list[dict], enable_thinking: bool = True) -> str:
        extra = {} if enable_thinking else {"enable_thinking": False}
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)

    def complete(self, prompt: str, images: list, settings: SamplingSettings,
                 on_text: TextCallback | None = None) -> Completion:
        raise NotImplementedError

    def reply(self, prompt: str, images: list, settings: SamplingSettings, answer_budget: int = 1024,
              on_text: TextCallback | None = None) -> Reply:
        """Generate; if a thought runs out of tokens, close it and let the model answer within ``answer_budget``."""
        thinking_open = prompt.rstrip().endswith(THINK_OPEN)
        first = self.complete(prompt, images, settings, on_text)
        text, forced = first.text, False
        if first.hit_limit and answer_budget > 0 and split_thinking(text, thinking_open).truncated:
            closed = text + FORCED_ANSWER_CUE
            pending_cue = [FORCED_ANSWER_CUE]  # streamed with the first piece of the answer, once there is one

            def stream_answer(piece: str) -> None:
                on_text("".join(pending_cue) + piece)
                pending_cue.clear()

            try:
                answer = self.complete(prompt + closed, images, replace(settings, max_new_tokens=answer_budget),
                                       stream_answer if on_text else None)
            except ValueError:  # vLLM: prompt and thought already fill the context; keep the truncated thought
                return Reply(text, thinking_open, False)
            text, forced = closed + answer.text, True
        return Reply(text, thinking_open, forced)


class CallbackStreamer(TextStreamer):
    """transformers streamer that hands each finished piece of new text to a callback."""

    def __init__(self, tokenizer, on_text: TextCallback):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.on_text(text)


class HFBackend(Backend):
    name = "hf"

    def __init__(self, info: CheckpointInfo, dtype: str = "auto", attn_implementation: str = "sdpa",
                 device_map: str | None = None):
        super().__init__(info)
        import torch
        from transformers import AutoModelForImageTextToText

        if device_map is None:
            device_map = "auto" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForImageTextToText.from_pretrained(
            info.path, torch_dtype=dtype, attn_implementation=attn_implementation, device_map=device_map).eval()
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.model.generation_config.pad_token_id or self.processor.tokenizer.pad_token_id

    def complete(self, prompt, images, settings, on_text=None):
        import torch
        from transformers import GenerationConfig

        inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt").to(self.model.device)
        sampling = {} if settings.greedy else {"temperature": settings.temperature, "top_p": settings.top_p,
                                               "top_k": max(settings.top_k, 0)}
        config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy,
                                  repetition_penalty=settings.repetition_penalty, eos_token_id=sorted(self.stop_ids),
                                  pad_token_id=self.pad_id, **sampling)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        streamer = CallbackStreamer(self.processor.tokenizer, on_text) if on_text else None
        with torch.inference_mode():
            # use_model_defaults=False: the checkpoint's generation_config must not refill what we set (do_sample...)
            output = self.model.generate(**inputs, generation_config=config, streamer=streamer,
                                         use_model_defaults=False)
        new_ids = output[0, inputs["input_ids"].shape[1]:].tolist()
        text = self.processor.tokenizer.decode(new_ids, skip_special_tokens=True)
        hit_limit = len(new_ids) >= settings.max_new_tokens and new_ids[-1] not in self.stop_ids
        return Completion(text, hit_limit)


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, info: CheckpointInfo, dtype: str = "auto", max_model_len: int | None = None,
                 tensor_parallel_size: int | None = None, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, max_images: int = 24, seed: int = 0):
        super().__init__(info)
        from vllm import LLM

        # "auto" means the checkpoint's dtype, as in transformers (vLLM's own "auto" halves float32 checkpoints)
        if dtype == "auto" and info.torch_dtype:
            dtype = info.torch_dtype
        self.llm = LLM(model=info.path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       tensor_parallel_size=tensor_parallel_size or default_tensor_parallel_size(info),
                       gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                       limit_mm_per_prompt={"image": max_images})
        self.engine = self.llm.llm_engine
        self._request_ids = itertools.count()

    def complete(self, prompt, images, settings, on_text=None):
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=settings.max_new_tokens, repetition_penalty=settings.repetition_penalty, seed=settings.seed,
            temperature=0.0 if settings.greedy else settings.temperature,
            top_p=1.0 if settings.greedy else settings.top_p,
            top_k=-1 if settings.greedy or settings.top_k <= 0 else settings.top_k)
        request = {"prompt": prompt}
        if images:
            request["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        request_id = f"qwen-merge-{next(self._request_ids)}"
        # The engine's step loop serves streaming and plain calls alike, on the V0 and V1 engines.
        self.engine.add_request(request_id, request, params)
        shown, final = "", None
        while final is None:
            for output in self.engine.step():
                if output.request_id != request_id:
                    continue
                text = output.outputs[0].text
                if on_text and len(text) > len(shown):
                    on_text(text[len(shown):])
                    shown = text
                if output.finished:
                    final = output.outputs[0]
        return Completion(final.text, final.finish_reason == "length")


def default_tensor_parallel_size(info: CheckpointInfo) -> int:
    """The largest power of two that fits the visible GPUs and divides the attention heads (1 without CUDA)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    size = 1
    while size * 2 <= gpus and info.num_attention_heads % (size * 2) == 0:
        size *= 2
    return size


BACKENDS = {"hf": HFBackend, "vllm": VLLMBackend}


def load_backend(model_path: str | Path, backend: str = "hf", **options) -> Backend:
    """Inspect the checkpoint and start the named backend; ``options`` go to its constructor."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    cls = BACKENDS[backend]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "info"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"unknown option(s) for the {backend} backend: {', '.join(unknown)} "
                         f"(accepted: {', '.join(sorted(accepted))})")
    return cls(inspect_checkpoint(model_path), **options)


def describe(settings: SamplingSettings) -> str:
    """One line for logs."""
    if settings.greedy:
        return f"greedy, max_new_tokens={settings.max_new_tokens}"
    return ", ".join(f"{k}={v}" for k, v in asdict(settings).items() if k != "greedy")
