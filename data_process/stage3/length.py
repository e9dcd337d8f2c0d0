"""Length of a stage-3 row as the trainer will see it, so rows longer than ``cutoff_len`` are dropped at
conversion instead of being cut by LLaMA-Factory (a cut row teaches the model to stop mid-thought: the
``</think>``, the answer and ``<|im_end|>`` are lost).

The count uses the student model's own processor: its chat template with thinking on, its tokenizer, and its
image processor at the training pixel bounds (``image_min_pixels`` / ``image_max_pixels`` of the stage-3
YAML), so each image counts as the number of ``<|image_pad|>`` tokens it becomes in training.
"""
from __future__ import annotations

import io
from functools import lru_cache

# examples/qwen_merge_4b/stage3.yaml (and the 8B recipe): the defaults of the conversion flags.
STAGE3_CUTOFF_LEN = 8192
STAGE3_IMAGE_MIN_PIXELS = 200704
STAGE3_IMAGE_MAX_PIXELS = 1003520
IMAGE_PLACEHOLDER = "<image>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


class TrainingLength:
    """``count(messages, images)``: tokens of one sharegpt row (``<image>`` placeholders in the text)."""

    def __init__(self, processor_path: str, min_pixels: int = STAGE3_IMAGE_MIN_PIXELS,
                 max_pixels: int = STAGE3_IMAGE_MAX_PIXELS):
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(processor_path)
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor
        self.image_pad = getattr(self.processor, "image_token", "<|image_pad|>")
        self.merge = int(getattr(self.image_processor, "merge_size", 2)) ** 2
        self.min_pixels, self.max_pixels = min_pixels, max_pixels

    def image_tokens(self, data: bytes) -> int:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            grid = self.image_processor(images=[image.convert("RGB")], min_pixels=self.min_pixels,
                                        max_pixels=self.max_pixels, return_tensors="pt")["image_grid_thw"][0]
        return int(grid.prod()) // self.merge  # "pt": the fast image processor (LLaMA-Factory saves it) has no "np"

    def count(self, messages: list[dict], images: list[bytes]) -> int:
        # As LLaMA-Factory's Qwen2-VL plugin does: each <image> becomes vision_start + pads + vision_end.
        image = f"{VISION_START}{self.image_pad}{VISION_END}"
        conversation = [{"role": m["role"], "content": m["content"].replace(IMAGE_PLACEHOLDER, image)}
                        for m in messages]
        text = self.processor.apply_chat_template(conversation, tokenize=False, enable_thinking=True)
        pads = text.count(self.image_pad)
        if pads != len(images):
            raise ValueError(f"{pads} image placeholders for {len(images)} images")
        text_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return text_tokens - pads + sum(self.image_tokens(data) for data in images)


@lru_cache(maxsize=2)
def training_length(processor_path: str, min_pixels: int, max_pixels: int) -> TrainingLength:
    """One :class:`TrainingLength` per process (loaded on first use in each worker)."""
    return TrainingLength(processor_path, min_pixels, max_pixels)


def add_length_args(parser) -> None:
    """``--processor``, ``--cutoff_len`` and the pixel bounds (defaults: the stage-3 YAMLs)."""
    g = parser.add_argument_group("length policy (rows longer than the training cutoff are dropped as too_long)")
    g.add_argument("--processor", default=None,
                   help="the student model (folder with its tokenizer, chat template and preprocessor_config.json); "
                        "without it rows are not measured and LLaMA-Factory may cut long ones")
    g.add_argument("--cutoff_len", type=int, default=STAGE3_CUTOFF_LEN,
                   help="training sequence limit, prompt + image tokens + answer (stage-3 YAML: %(default)s)")
    g.add_argument("--train_image_min_pixels", type=int, default=STAGE3_IMAGE_MIN_PIXELS,
                   help="training image_min_pixels (default %(default)s)")
    g.add_argument("--train_image_max_pixels", type=int, default=STAGE3_IMAGE_MAX_PIXELS,
                   help="training image_max_pixels (default %(default)s)")
