#!/usr/bin/env python3
"""Cost of `per_turn_samples` (each assistant turn of a k-turn conversation trained as its own sample, on the
prefix inference gives it) against one sequence per conversation, on a OneVision-shaped stage-2.2 mix.

Rows are tokenized by LLaMA-Factory's own supervised processors (the per-turn one of the overlay and the upstream one)
with the `qwen_merge_vl` template, thinking off, on the tiny merged model's tokenizer (the Qwen3 vocabulary). Text
comes from the real tokenizer; each image adds --image-tokens tokens to every row that holds it (the tiny
processor's own bounds would shrink it). Reported: tokens and rows per conversation, the ViT images encoded per
conversation, and the LLM token cost ratio.

The turn distribution is an estimate unless --data points at converted OneVision shards (data_process output,
`messages` + `images` parquet), from which it is counted:

    python bench/bench_per_turn.py --model TINY_MERGED_DIR                       # estimated mix
    python bench/bench_per_turn.py --model TINY_MERGED_DIR --data data/llavaonevision_converted
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

# Estimated share of OneVision single-image conversations by number of assistant turns. Single-turn: captioning,
# MathV360K, ALLaVA, ShareGPT4V, UReader, OCR sets; 2-3 turns: most "(cauldron,llava_format)" QA sets, which group
# the questions of one image (ChartQA, TallyQA, ST-VQA, A-OKVQA); 5-12 turns: synthetic many-question sets (DVQA,
# FigureQA, CLEVR, Visual7W, MapQA, RoBUT tables). An estimate, not a count: pass --data for the real one.
ESTIMATED_TURNS = {1: 0.70, 2: 0.10, 3: 0.06, 5: 0.07, 9: 0.07}
QUESTION_WORDS, SHORT_ANSWER_WORDS, LONG_ANSWER_WORDS = 20, 8, 90


def words(rng: random.Random, n: int) -> str:
    vocab = ("chart", "value", "colour", "left", "bar", "shows", "the", "number", "of", "red", "which", "largest",
             "blue", "object", "image", "table", "row", "year", "total", "three")
    return " ".join(rng.choice(vocab) for _ in range(n))


def synthetic_conversation(rng: random.Random, turns: int) -> list[dict]:
    answer_words = LONG_ANSWER_WORDS if turns == 1 else SHORT_ANSWER_WORDS
    messages = []
    for t in range(turns):
        question = ("<image>\n" if t == 0 else "") + words(rng, QUESTION_WORDS) + "?"
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": words(rng, answer_words) + "."}]
    return messages


def conversations_from_data(folder: Path, limit: int) -> list[list[dict]]:
    import pyarrow.parquet as pq

    found = []
    for shard in sorted(folder.rglob("*.parquet")):
        for row in pq.read_table(shard, columns=["messages"]).to_pylist():
            found.append(row["messages"])
            if len(found) >= limit:
                return found
    return found


def batch_of(conversations: list[list[dict]]) -> dict[str, list]:
    n = len(conversations)
    return {"_prompt": [c[:-1] for c in conversations], "_response": [c[-1:] for c in conversations],
            "_system": [""] * n, "_tools": [""] * n, "_images": [None] * n, "_videos": [None] * n,
            "_audios": [None] * n}


def measure(model: str, conversations: list[list[dict]], image_tokens: int) -> dict:
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments, get_infer_args
    from llamafactory.model import load_tokenizer
    from llamafactory.qwen_merge.per_turn import per_turn_processor

    model_args, _, _, _ = get_infer_args({"model_name_or_path": model, "template": "qwen_merge_vl"})
    modules = load_tokenizer(model_args)
    tokenizer = modules["tokenizer"]
    text_only = [[{**m, "content": m["content"].replace("<image>\n", "").replace("<image>", "")} for m in c]
                 for c in conversations]
    images = [sum(m["content"].count("<image>") for m in c) for c in conversations]
    result = {}
    for name, per_turn in (("one_sequence", False), ("per_turn", True)):
        data_args = DataArguments(template="qwen_merge_vl", enable_thinking=False, cutoff_len=1 << 20,
                                  per_turn_samples=per_turn)
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
        cls, data_args = per_turn_processor(SupervisedDatasetProcessor, data_args)
        processor = cls(template=template, tokenizer=tokenizer, processor=modules["processor"], data_args=data_args)
        tokens, rows, encoded_images, trained = 0, 0, 0, 0
        for conversation, conversation_images in zip(text_only, images):
            out = processor.preprocess_dataset(batch_of([conversation]))
            rows += len(out["input_ids"])
            tokens += sum(map(len, out["input_ids"])) + len(out["input_ids"]) * conversation_images * image_tokens
            encoded_images += len(out["input_ids"]) * conversation_images
            trained += sum(sum(label != -100 for label in labels) for labels in out["labels"])
        n = len(conversations)
        result[name] = {"rows_per_conversation": rows / n, "tokens_per_conversation": tokens / n,
                        "images_encoded_per_conversation": encoded_images / n,
                        "trained_tokens_per_conversation": trained / n}
    one, per = result["one_sequence"], result["per_turn"]
    result["ratio"] = {"tokens": per["tokens_per_conversation"] / one["tokens_per_conversation"],
                       "images_encoded": per["images_encoded_per_conversation"] / one["images_encoded_per_conversation"],
                       "rows": per["rows_per_conversation"] / one["rows_per_conversation"]}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Qwen-Merge checkpoint folder (its tokenizer is used)")
    p.add_argument("--data", type=Path, help="converted OneVision shards: count the real turn distribution")
    p.add_argument("--conversations", type=int, default=2000, help="conversations to sample")
    p.add_argument("--image-tokens", type=int, nargs="+", default=[400, 1280],
                   help="visual tokens per image (recipe bounds 256..1280; ~400 for a 640x480 photo)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    rng = random.Random(0)
    if args.data:
        conversations = conversations_from_data(args.data, args.conversations)
        source = f"counted from {args.data}"
    else:
        ks, weights = zip(*ESTIMATED_TURNS.items())
        conversations = [synthetic_conversation(rng, rng.choices(ks, weights)[0]) for _ in range(args.conversations)]
        source = f"estimated turn distribution {ESTIMATED_TURNS}"
    turns = [sum(m["role"] == "assistant" for m in c) for c in conversations]
    report = {"source": source, "conversations": len(conversations), "mean_turns": statistics.mean(turns),
              "by_image_tokens": {}}
    for image_tokens in args.image_tokens:
        report["by_image_tokens"][image_tokens] = measure(args.model, conversations, image_tokens)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
