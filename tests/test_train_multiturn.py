"""Multi-turn samples train every assistant turn on exactly the prefix inference gives it.

Multi-turn conversations (several images, thoughts in the answers, a tool call with its response) are tokenized
by the real `llamafactory-cli train` with the tiny stage-2.2 (thinking off) and stage-3 (thinking on) recipes,
which save the tokenized dataset (`tokenized_path`) and train one step. For every labelled span of every saved row,
the tokens before it must be what the merged model's own `apply_chat_template` + processor give for that point of
the conversation (history as the chat template renders it, generation prompt as `enable_thinking` says), and the
prefix plus the span must be the chat template's rendering of the conversation up to that turn. Every assistant
turn of the data must be trained exactly once.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.test_train_stages import CLI_SEQUENCE, cli_args, run_logged

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

IGNORE = -100
SIZES = ((112, 56), (56, 56), (56, 112))  # within the tiny recipes' pixel bounds: no resizing anywhere
TOOLS = [{"type": "function", "function": {
    "name": "count_objects", "description": "Count the objects of one kind in the picture.",
    "parameters": {"type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"]}}}]


def thought(text: str, answer: str) -> str:
    return f"<think>\n{text}\n</think>\n\n{answer}"


def conversations(pictures: list[str]) -> list[dict]:
    """LLaMA-Factory sharegpt rows: (messages, images, tools)."""
    three_turns_two_images = [
        {"role": "user", "content": "<image>\n<image>\nWhich picture is brighter?"},
        {"role": "assistant", "content": thought("The first one has more white.", "The first.")},
        {"role": "user", "content": "Describe the second one."},
        {"role": "assistant", "content": "It is a dark photo."},
        {"role": "user", "content": "<image>\nAnd this third one?"},
        {"role": "assistant", "content": thought("Mostly grey.", "A grey photo.")},
    ]
    tool_call = [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "<image>\nHow many coins are there?"},
        {"role": "function_call", "content": thought("I should count them with the tool.",
                                                      json.dumps({"name": "count_objects",
                                                                  "arguments": {"kind": "coin"}}))},
        {"role": "observation", "content": json.dumps({"count": 24})},
        {"role": "assistant", "content": thought("The tool counted 24.", "There are 24 coins.")},
        {"role": "user", "content": "Thanks. Are they round?"},
        {"role": "assistant", "content": "Yes, all of them."},
    ]
    tool_call_without_system = [
        {"role": "user", "content": "Count the cats in the last photo."},
        {"role": "function_call", "content": json.dumps({"name": "count_objects", "arguments": {"kind": "cat"}})},
        {"role": "observation", "content": json.dumps({"count": 0})},
        {"role": "assistant", "content": "There are no cats."},
    ]
    single = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A photo."}]
    return [
        {"messages": three_turns_two_images, "images": pictures[:3], "tools": ""},
        {"messages": tool_call, "images": pictures[:1], "tools": json.dumps(TOOLS)},
        {"messages": tool_call_without_system, "images": [], "tools": json.dumps(TOOLS)},
        {"messages": single, "images": pictures[2:3], "tools": ""},
    ]


def hf_messages(messages: list[dict]) -> list[dict]:
    """The same conversation in the transformers chat format (content parts, tool_calls, role `tool`)."""
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(m)
        elif m["role"] == "user":
            parts = []
            for i, piece in enumerate(m["content"].split("<image>\n")):
                if i:
                    parts.append({"type": "image"})
                if piece:
                    parts.append({"type": "text", "text": piece})
            out.append({"role": m["role"], "content": parts})
        elif m["role"] == "assistant":
            out.append({"role": "assistant", "content": m["content"]})
        elif m["role"] == "function_call":
            head, end, call = m["content"].rpartition("</think>")
            call = json.loads(call)
            out.append({"role": "assistant", "content": head + end,
                        "tool_calls": [{"type": "function", "function": call}]})
        else:
            out.append({"role": "tool", "content": m["content"]})
    return out


def without_thoughts(message: dict) -> dict:
    return {**message, "content": message["content"].rpartition("</think>")[2].lstrip("\n")}


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, sample_images, tiny_merged, venv_env) -> dict[bool, tuple[Path, list[dict]]]:
    """{enable_thinking: (tokenized dataset folder, the rows)} from the stage-3 and stage-2.2 tiny recipes."""
    work = tmp_path_factory.mktemp("multiturn")
    pictures = []
    for i, size in enumerate(SIZES):
        path = work / f"picture{i}.png"
        Image.open(sample_images[i]).convert("RGB").resize(size).save(path)
        pictures.append(str(path))
    rows = conversations(pictures)
    data = work / "data"
    data.mkdir()
    (data / "chats.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"chats": {
        "file_name": "chats.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images", "tools": "tools"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}}}))
    runs = {True: "stage3.yaml", False: "stage2.2.yaml"}
    sequence = [cli_args("train", recipe, model_name_or_path=tiny_merged, dataset="chats", dataset_dir=data,
                         tokenized_path=work / f"tokenized-{thinking}", output_dir=work / f"out-{thinking}",
                         max_steps=1, per_device_train_batch_size=2)
                for thinking, recipe in runs.items()]
    (work / "sequence.json").write_text(json.dumps(sequence, default=str))
    (work / "cli_sequence.py").write_text(CLI_SEQUENCE)
    env = {**venv_env, "HF_DATASETS_CACHE": str(work / "hf_datasets")}
    run_logged([sys.executable, str(work / "cli_sequence.py"), str(work / "sequence.json")], env, work / "cli.log")
    return {thinking: (work / f"tokenized-{thinking}", rows) for thinking in runs}


def labelled_spans(labels: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking-on", "thinking-off"])
def test_every_labelled_span_has_the_inference_prefix(tokenized, tiny_merged, thinking):
    from datasets import load_from_disk
    from transformers import AutoProcessor

    folder, rows = tokenized[thinking]
    saved = load_from_disk(str(folder))["train"]
    processor = AutoProcessor.from_pretrained(tiny_merged, use_fast=True)  # as LLaMA-Factory loads it

    expected = []  # (row, index of the trained message) in data order
    for row in rows:
        expected += [(row, i) for i, m in enumerate(row["messages"]) if m["role"] in ("assistant", "function_call")]
    assert len(saved) == len(expected) == 9  # every assistant turn is one sample: none dropped, none twice

    for sample, (row, turn) in zip(saved, expected):
        spans = labelled_spans(sample["labels"])
        assert len(spans) == 1, f"turn {turn}: labelled spans {spans}"  # the loss is on this turn only
        start, end = spans[0]
        assert sample["labels"][start:end] == sample["input_ids"][start:end]

        # thinking off: the model wrote no thoughts, so none are in its history either
        source = row["messages"] if thinking else [
            without_thoughts(m) if m["role"] in ("assistant", "function_call") else m for m in row["messages"]]
        history, target = hf_messages(source[:turn]), hf_messages(source[turn:turn + 1])
        tools = json.loads(row["tools"]) if row["tools"] else None
        images = [Image.open(p).convert("RGB") for p in row["images"]]
        images = images[:sum(m["content"].count("<image>") for m in row["messages"][:turn])]
        prompt = processor.apply_chat_template(history, tools=tools, add_generation_prompt=True,
                                               enable_thinking=thinking)
        full = processor.apply_chat_template(history + target, tools=tools)
        assert full.startswith(prompt)

        def ids(text: str) -> list[int]:
            return processor(text=[text], images=images or None, return_tensors="pt")["input_ids"][0].tolist()

        context = f"turn {turn} of {row['messages'][0]['content'][:30]!r}: "
        assert sample["input_ids"][:start] == ids(prompt), context + "the prompt differs from inference"
        assert sample["input_ids"][:end] == ids(full), context + "prompt + answer differ from the chat template"
        assert end == len(sample["input_ids"])  # nothing after the trained turn


def test_tiny_recipes_tokenize_per_turn(tokenized):
    """The runs above went through the per-turn processor because the recipes ask for it (not a test default)."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    for recipe in ("examples/tiny/stage2.2.yaml", "examples/tiny/stage3.yaml", "examples/qwen_merge_4b/stage2.2.yaml",
                   "examples/qwen_merge_4b/stage3.yaml", "examples/qwen_merge_8b/stage2.2.yaml",
                   "examples/qwen_merge_8b/stage3.yaml"):
        assert yaml.safe_load((repo / recipe).read_text())["per_turn_samples"] is True, recipe
