"""Per-turn samples: every trained assistant turn sees exactly the prefix inference gives it (qwen-merge overlay).

The model's chat template (as Qwen3's) drops the thoughts of the answers before the last user query, and its
generation prompt ends with `<think>\\n\\n</think>\\n\\n` when thinking is off. One training sequence cannot give every
turn of a k-turn conversation its inference prefix (an answer's own prompt holds the think block that the next
turn's history must not have), so with `per_turn_samples: true` a k-turn conversation becomes k samples: sample t
holds turns 1..t, its history rendered by `QwenMergeTemplate` as the chat template renders it, and the loss on
turn t only (LLaMA-Factory's `mask_history`, which also truncates the oldest history first). Each sample keeps
only the images/videos/audios its turns refer to.

Wired in by one line in `data/loader.py:_get_dataset_processor`, and the `per_turn_samples` field of DataArguments.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ..data.processor.supervised import PackedSupervisedDatasetProcessor, SupervisedDatasetProcessor
from ..extras import logging
from ..extras.constants import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

logger = logging.get_logger(__name__)

MEDIA = (("_images", IMAGE_PLACEHOLDER), ("_videos", VIDEO_PLACEHOLDER), ("_audios", AUDIO_PLACEHOLDER))


def split_turns(examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A batch of converted samples (`_prompt`, `_response`, ...) with each k-turn conversation replaced by k
    samples, one per assistant turn. Malformed samples pass through unchanged (the processor reports and drops them)."""
    out = {key: [] for key in examples}
    for i in range(len(examples["_prompt"])):
        prompt, response = examples["_prompt"][i], examples["_response"][i]
        if len(prompt) % 2 != 1 or len(response) != 1 or len(prompt) == 1:
            for key in examples:
                out[key].append(examples[key][i])
            continue

        messages = prompt + response
        for end in range(1, len(messages), 2):  # the assistant (or function call) turns
            turns = messages[: end + 1]
            for key in examples:
                out[key].append(examples[key][i])
            out["_prompt"][-1], out["_response"][-1] = turns[:-1], turns[-1:]
            if end == len(messages) - 1:
                continue  # the whole conversation keeps all its media: upstream checks their count
            for key, placeholder in MEDIA:
                media = examples.get(key, [None] * (i + 1))[i]
                if media:
                    used = sum(m["content"].count(placeholder) for m in turns)
                    out[key][-1] = media[:used]
    return out


@dataclass
class PerTurnSupervisedDatasetProcessor(SupervisedDatasetProcessor):
    def preprocess_dataset(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return super().preprocess_dataset(split_turns(examples))


@dataclass
class PerTurnPackedSupervisedDatasetProcessor(PackedSupervisedDatasetProcessor):
    def preprocess_dataset(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return super().preprocess_dataset(split_turns(examples))


PER_TURN = {
    SupervisedDatasetProcessor: PerTurnSupervisedDatasetProcessor,
    PackedSupervisedDatasetProcessor: PerTurnPackedSupervisedDatasetProcessor,
}


def per_turn_processor(processor_class: type, data_args) -> tuple[type, Any]:
    """(processor class, data arguments) to use: the per-turn variant, with the history masked, when
    `per_turn_samples` is on for supervised fine-tuning; unchanged otherwise."""
    if not getattr(data_args, "per_turn_samples", False) or processor_class not in PER_TURN:
        return processor_class, data_args
    if data_args.train_on_prompt:
        raise ValueError("per_turn_samples trains each assistant turn on its own; it cannot be combined with "
                         "train_on_prompt.")
    logger.info_rank0("per_turn_samples: each assistant turn is one sample, its history rendered as at inference.")
    data_args = copy.copy(data_args)
    data_args.mask_history = True  # loss on the last turn of each sample only
    return PER_TURN[processor_class], data_args
