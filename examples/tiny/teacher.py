"""The quickstart's stage-3 teacher: the tiny Qwen2.5-VL source, taught the toy task honestly.

The GPU recipe distils from GLM-4.1V-Thinking (images) and Qwen3-32B (text). At toy scale no such model exists, so
the sources step teaches a copy of the tiny Qwen2.5-VL, from pictures of its own seed (no other set uses it), the
two replies the stage-3 scripts ask of a teacher:

  * picture + colour question   -> GLM's format ``<think>..</think><answer>colour</answer>`` (image/process.py)
  * the task described in words -> ``<think>..</think>`` + the colour                      (text2image/process.py)

At distillation time it is never told the answer: it looks at the picture (or reads the question) and replies,
and the quickstart keeps only the replies a checker finds equal to the dataset's reference. Training is a plain
PyTorch loop (logits only at the reply tokens, so the 152k-word output layer stays cheap on a CPU).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from examples.quickstart_samples import QUESTION, draw_picture, option_question, text_question

TEACHER_PIXELS = (56 * 56, 112 * 112)  # the pictures' size in training and in vLLM (written to its processor)


def glm_reply(colour: str) -> str:
    return f"<think>\nThe shape in the picture is {colour}.\n</think>\n<answer>{colour}</answer>"


def text_reply(colour: str) -> str:
    return f"<think>\nThe question says the shape is {colour}.\n</think>\n\n{colour}"


def lessons(rng: np.random.Generator, count: int) -> list[tuple[list, object, str]]:
    """``(user content, picture or None, reply)`` examples: 3 in 4 with a picture, drawn at random."""
    out = []
    for _ in range(count):
        picture, meta = draw_picture(rng)
        colour = meta["colour"]
        if rng.random() < 0.75:  # image/process.py asks the OneVision questions with their picture
            question = option_question(colour, rng) if rng.random() < 0.5 else QUESTION
            out.append(([{"type": "image"}, {"type": "text", "text": question}], picture, glm_reply(colour)))
        else:  # text2image/process.py asks the text version
            out.append(([{"type": "text", "text": text_question(meta)}], None, text_reply(colour)))
    return out


def encode(processor, batch: list[tuple[list, object, str]]):
    """Token ids, attention mask, pixel inputs and a mask of the reply tokens (right padded)."""
    import torch

    prompts = [processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
               for content, _, _ in batch]
    pictures = [picture for _, picture, _ in batch if picture is not None]
    kwargs = {"min_pixels": TEACHER_PIXELS[0], "max_pixels": TEACHER_PIXELS[1]}
    full = processor(text=[p + reply + "<|im_end|>" for p, (_, _, reply) in zip(prompts, batch)],
                     images=pictures or None, return_tensors="pt", padding=True, images_kwargs=kwargs)
    reply_lengths = [len(processor.tokenizer(reply + "<|im_end|>", add_special_tokens=False).input_ids)
                     for _, _, reply in batch]
    lengths = full.attention_mask.sum(1).tolist()
    target = torch.zeros_like(full.input_ids, dtype=torch.bool)
    for i, (length, reply_length) in enumerate(zip(lengths, reply_lengths)):
        target[i, length - reply_length - 1:length - 1] = True  # positions that predict the reply tokens
    return full, target


def teach(source: Path, out: Path, steps: int = 200, batch_size: int = 8, lr: float = 1e-3, seed: int = 2,
          log=print) -> dict:
    """Train a copy of the tiny Qwen2.5-VL `source` into `out` (atomically); return the loss and timing."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    processor = AutoProcessor.from_pretrained(source)
    processor.tokenizer.padding_side = "right"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, torch_dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.train()
    # The source ties its output layer to the embeddings (as vLLM loads it), but transformers 4.52 reads the flat
    # hub config's tie flag only at the top level and would give lm_head fresh random weights: tie it here.
    model.lm_head.weight = model.get_input_embeddings().weight
    for name, param in model.named_parameters():  # as stage 2: the ViT stays as it is, its merger and the LLM learn
        param.requires_grad_("visual" not in name or "merger" in name)
    model.lm_head.weight.requires_grad_(False)  # the tied 152k-row table: Adam on it costs more than all the rest
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng, losses, started = np.random.default_rng(seed), [], time.time()
    for step in range(steps):
        inputs, target = encode(processor, lessons(rng, batch_size))
        hidden = model.model(**inputs).last_hidden_state
        logits = model.lm_head(hidden[target])
        labels = inputs.input_ids[:, 1:][target[:, :-1]]
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
        if step % 20 == 0 or step == steps - 1:
            log(f"teacher step {step + 1}/{steps}: loss {losses[-1]:.3f} ({time.time() - started:.0f} s)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.image_processor.min_pixels, processor.image_processor.max_pixels = TEACHER_PIXELS
    processor.image_processor.size = {"shortest_edge": TEACHER_PIXELS[0], "longest_edge": TEACHER_PIXELS[1]}
    processor.save_pretrained(tmp)
    for name in ("config.json", "vocab.json", "merges.txt", "generation_config.json"):  # the source's flat config
        if (source / name).exists():
            shutil.copy2(source / name, tmp / name)
    (tmp / "teacher.json").write_text(json.dumps({"steps": steps, "batch_size": batch_size, "lr": lr,
                                                  "losses": losses}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"losses": losses, "seconds": round(time.time() - started, 1)}
