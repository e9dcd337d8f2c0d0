"""Write a local multiple-choice benchmark as an MMBench-format TSV that VLMEvalKit runs offline.

    python -m eval.mcq_tsv questions.jsonl "$LMUData/MyBench_MMBench.tsv" [--circular]
    python -m vlmeval.run --data MyBench_MMBench --model Qwen-Merge-VL-4B --judge exact_matching

Each input line is a JSON object: ``question``, ``options`` (a list of 2 to 4 texts, or {"A": ..., "B": ...}),
``answer`` (a letter), ``image`` (a file path), and optionally ``hint``, ``category``, ``l2-category``, ``split``,
``index`` (an int below 1,000,000; default: the line number). Relative image paths are relative to the input file.

``--circular`` adds every rotation of each question's options as rows ``index + k * 1_000_000``; their image cell
holds the base row's index instead of a second copy of the image. VLMEvalKit scores a question right only if all
its rotations are right, for datasets whose name contains "MMBench" or "circular".
"""
from __future__ import annotations

import argparse
import base64
import json
import string
import sys
from pathlib import Path

CIRCULAR_STEP = 1_000_000
COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]


def _options(record: dict, where: str) -> list[str]:
    options = record.get("options")
    if isinstance(options, dict):
        letters = [c for c in string.ascii_uppercase[:4] if c in options]
        if letters != list(string.ascii_uppercase[:len(options)]):
            raise ValueError(f"{where}: option keys must be A, B[, C[, D]], got {sorted(options)}")
        options = [options[c] for c in letters]
    if not isinstance(options, list) or not 2 <= len(options) <= 4:
        raise ValueError(f"{where}: 'options' must hold 2 to 4 choices")
    return [str(o) for o in options]


def base_row(record: dict, default_index: int, where: str) -> dict:
    """One TSV row (image as base64) from an input record; errors name the record."""
    missing = [k for k in ("question", "answer", "image") if not record.get(k)]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    options = _options(record, where)
    answer = str(record["answer"]).strip().upper()
    if answer not in string.ascii_uppercase[:len(options)]:
        raise ValueError(f"{where}: answer {record['answer']!r} is not one of the {len(options)} option letters")
    index = int(record.get("index", default_index))
    if not 0 <= index < CIRCULAR_STEP:
        raise ValueError(f"{where}: index must be in [0, {CIRCULAR_STEP}), got {index}")
    image = Path(record["image"])
    if not image.is_file():
        raise ValueError(f"{where}: image not found: {image}")
    row = {"index": index, "question": record["question"], "hint": record.get("hint", ""), "answer": answer,
           "category": record.get("category", "default"), "l2-category": record.get("l2-category", "default"),
           "split": record.get("split", "dev"), "image": base64.b64encode(image.read_bytes()).decode()}
    row.update(zip("ABCD", options + [""] * (4 - len(options))))
    return row


def rotations(row: dict) -> list[dict]:
    """The row's option rotations 1..n-1 with the answer letter moved along and the image cell pointing at the row."""
    options = [row[c] for c in "ABCD" if row[c]]
    correct = "ABCD".index(row["answer"])
    out = []
    for k in range(1, len(options)):
        rotated = options[k:] + options[:k]
        variant = {**row, "index": row["index"] + k * CIRCULAR_STEP, "image": str(row["index"]),
                   "answer": "ABCD"[(correct - k) % len(options)]}
        variant.update(zip("ABCD", rotated + [""] * (4 - len(rotated))))
        out.append(variant)
    return out


def build_rows(records: list[dict], circular: bool = False) -> list[dict]:
    rows = [base_row(r, i, f"record {i + 1}") for i, r in enumerate(records)]
    seen = [r["index"] for r in rows]
    if len(set(seen)) != len(seen):
        raise ValueError("duplicate question indices")
    if circular:
        rows += [variant for row in rows for variant in rotations(row)]
    return rows


def write_tsv(rows: list[dict], path: str | Path) -> Path:
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(path, sep="\t", index=False)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.mcq_tsv", description=__doc__.split("\n\n")[0],
                                     epilog="Input format: see the module docstring (python -m pydoc eval.mcq_tsv).")
    parser.add_argument("questions", help="JSON-lines file of questions")
    parser.add_argument("output", help="TSV to write, usually $LMUData/<Name>.tsv")
    parser.add_argument("--circular", action="store_true", help="add the option rotations (circular evaluation)")
    args = parser.parse_args(argv)
    try:
        lines = [line for line in Path(args.questions).read_text().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]
        for record in records:  # relative image paths are relative to the questions file
            if isinstance(record, dict) and record.get("image") and not Path(record["image"]).is_absolute():
                record["image"] = str(Path(args.questions).parent / record["image"])
        rows = build_rows(records, args.circular)
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(rows)} rows ({len(records)} questions) to {write_tsv(rows, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
