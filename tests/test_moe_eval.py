"""Qwen-Merge-VL-30B-A3B in evaluation: the VLMEvalKit entry loads a Qwen3-MoE merge and answers an image question
with transformers' greedy tokens, and `python -m eval.chat` holds an image conversation with it."""
from __future__ import annotations

import sys
from pathlib import Path

import pexpect
import pytest
import torch

from eval.chat import INPUT_PROMPT
from tests.test_eval_chat import ask, exit_chat

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is in the image?"


def test_vlmeval_entry_answers_with_the_moe_checkpoint(tiny_merged_moe, sample_images, monkeypatch):
    from overlays import apply as applier

    manifest = applier.load_manifest("vlmeval")
    applier.apply(manifest, verbose=False)
    from vlmeval.config import supported_VLM

    monkeypatch.setenv("QWEN_MERGE_30B_A3B_PATH", str(tiny_merged_moe))
    monkeypatch.setenv("QWEN_MERGE_30B_A3B_ARGS", '{"greedy": true, "max_new_tokens": 6, "enable_thinking": false}')
    model = supported_VLM["Qwen-Merge-VL-30B-A3B"]()
    hf = model.backend.model
    assert type(hf.model.language_model).__name__ == "Qwen2_5_VL_MergeMoeTextModel"
    message = [{"type": "image", "value": str(sample_images[0])}, {"type": "text", "value": QUESTION}]
    answer = model.generate(message)
    assert isinstance(answer, str) and answer.strip()
    # the same question straight through transformers: the entry's answer is its greedy continuation
    from transformers import AutoProcessor
    from PIL import Image
    processor = AutoProcessor.from_pretrained(tiny_merged_moe)
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           enable_thinking=False)
    inputs = processor(text=[prompt], images=[Image.open(sample_images[0]).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        tokens = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs.input_ids.shape[1]:]
    assert answer.strip() in processor.decode(tokens, skip_special_tokens=True)


def test_chat_about_an_image_with_the_moe_checkpoint(tiny_merged_moe, sample_images, venv_env):
    env = {**venv_env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    args = ["-m", "eval.chat", "--model", str(tiny_merged_moe), "--image", str(sample_images[0]), "--backend", "hf",
            "--greedy", "--max-new-tokens", "8", "--show-prompt"]
    child = pexpect.spawn(sys.executable, args, env=env, cwd=str(REPO), encoding="utf-8", echo=False, timeout=300)
    child.delayafterterminate = 2
    try:
        child.expect_exact(INPUT_PROMPT)
        assert "qwen2_5_vl_merge checkpoint on hf; greedy" in child.before
        prompt, reply = ask(child, QUESTION)
        assert prompt.count("<|image_pad|>") == 1 and QUESTION in prompt and reply
        follow_prompt, follow_reply = ask(child, "And the colour?")
        assert reply in follow_prompt and follow_reply
        exit_chat(child)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
