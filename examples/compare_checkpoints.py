#!/usr/bin/env python3
"""Which parameters differ between two Qwen-Merge checkpoints, e.g. before and after a training stage.

Both key layouts are read: flat, as merge/model_merger.py writes it (`visual.*`, `model.*`, `lm_head.weight`), and
nested, as transformers re-saves it after training (`model.visual.*`, `model.language_model.*`, `lm_head.weight`).
Tensors are compared one pair at a time (memory: two tensors), and reported per group:

    vision_tower    visual.patch_embed.*, visual.blocks.*
    projector       visual.merger.*
    language_model  the decoder (embeddings, layers, final norm)
    lm_head         lm_head.weight (absent when tied to the embeddings)

    python examples/compare_checkpoints.py outputs/Qwen-Merge-VL-4B-base outputs/Qwen-Merge-VL-4B-stage1
    python examples/compare_checkpoints.py BEFORE AFTER --expect-changed projector
        exit 1 unless every tensor of the listed groups changed and every other tensor is bit-identical
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

GROUPS = ("vision_tower", "projector", "language_model", "lm_head")


def canonical_name(key: str) -> str:
    """The nested (transformers 4.52) name of a checkpoint key of either layout."""
    if key.startswith(("model.visual.", "model.language_model.")) or key == "lm_head.weight":
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    raise ValueError(f"unexpected Qwen-Merge checkpoint key {key!r}")


def group_of(name: str) -> str:
    if name.startswith("model.visual.merger."):
        return "projector"
    if name.startswith("model.visual."):
        return "vision_tower"
    if name.startswith("model.language_model."):
        return "language_model"
    return "lm_head"


def tensor_index(checkpoint: Path) -> dict[str, tuple[Path, str]]:
    """canonical name -> (safetensors file, key in that file) for a checkpoint folder or file."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        files = [checkpoint]
    elif (checkpoint / "model.safetensors.index.json").is_file():
        weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
        files = sorted({checkpoint / f for f in weight_map.values()})
    elif (checkpoint / "model.safetensors").is_file():
        files = [checkpoint / "model.safetensors"]
    else:
        raise FileNotFoundError(f"no safetensors weights in {checkpoint}")
    index = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: listed in the index but missing")
        with open_safetensors(file) as f:
            for key in f.keys():
                name = canonical_name(key)
                if name in index:
                    raise ValueError(f"{checkpoint}: {key!r} and {index[name][1]!r} are the same parameter")
                index[name] = (file, key)
    return index


def open_safetensors(file: Path):
    """safe_open, with a damaged file (truncated download, not safetensors) reported as a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e}); is it truncated?") from None


@dataclass
class Comparison:
    changed: set[str] = field(default_factory=set)
    unchanged: set[str] = field(default_factory=set)
    only_before: set[str] = field(default_factory=set)
    only_after: set[str] = field(default_factory=set)

    def by_group(self, names: set[str]) -> dict[str, set[str]]:
        return {g: {n for n in names if group_of(n) == g} for g in GROUPS}

    def changed_groups(self) -> set[str]:
        return {group_of(n) for n in self.changed}

    def check(self, expected_changed: set[str]) -> list[str]:
        """Problems when `expected_changed` groups are not exactly the trained ones (empty list: as expected)."""
        problems = [f"{len(s)} tensors only in {w}: {sorted(s)[:3]}"
                    for w, s in (("before", self.only_before), ("after", self.only_after)) if s]
        for group in GROUPS:
            changed, unchanged = self.by_group(self.changed)[group], self.by_group(self.unchanged)[group]
            if group in expected_changed and unchanged:
                problems.append(f"{group}: {len(unchanged)} tensors did not change, e.g. {sorted(unchanged)[:3]}")
            if group not in expected_changed and changed:
                problems.append(f"{group}: {len(changed)} tensors changed, e.g. {sorted(changed)[:3]}")
        return problems


TIED_HEAD, EMBEDDINGS = "lm_head.weight", "model.language_model.embed_tokens.weight"


def _same_tensor(a: tuple[Path, str], b: tuple[Path, str]) -> bool:
    import torch

    with open_safetensors(a[0]) as fa, open_safetensors(b[0]) as fb:
        return torch.equal(fa.get_tensor(a[1]), fb.get_tensor(b[1]))


def compare_checkpoints(before: Path, after: Path) -> Comparison:
    import torch

    left, right = tensor_index(before), tensor_index(after)
    result = Comparison(only_before=set(left) - set(right), only_after=set(right) - set(left))
    # DeepSpeed ZeRO-3 saves a tied lm_head as its own tensor: an exact copy of the embeddings is an alias, not a change.
    for index, only in ((left, result.only_before), (right, result.only_after)):
        if TIED_HEAD in only and EMBEDDINGS in index and _same_tensor(index[TIED_HEAD], index[EMBEDDINGS]):
            only.discard(TIED_HEAD)
    for name in sorted(set(left) & set(right)):
        (file_a, key_a), (file_b, key_b) = left[name], right[name]
        with open_safetensors(file_a) as fa, open_safetensors(file_b) as fb:
            try:
                a, b = fa.get_tensor(key_a), fb.get_tensor(key_b)
            except Exception as e:  # SafetensorError and friends: a damaged tensor record
                raise ValueError(f"{name}: unreadable in {file_a} or {file_b} ({e})") from None
        common = torch.promote_types(a.dtype, b.dtype)
        same = a.shape == b.shape and torch.equal(a.to(common), b.to(common))
        (result.unchanged if same else result.changed).add(name)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("before", type=Path, help="checkpoint folder (or .safetensors file) before training")
    parser.add_argument("after", type=Path, help="checkpoint folder (or .safetensors file) after training")
    parser.add_argument("--expect-changed", default=None,
                        help=f"comma-separated groups that must have trained (of {', '.join(GROUPS)})")
    args = parser.parse_args(argv)
    expected = None
    if args.expect_changed is not None:
        expected = {g.strip() for g in args.expect_changed.split(",") if g.strip()}
        if not expected <= set(GROUPS):
            parser.error(f"unknown group(s) {sorted(expected - set(GROUPS))}; choose from {', '.join(GROUPS)}")
    try:
        result = compare_checkpoints(args.before, args.after)
    except (FileNotFoundError, ValueError) as e:
        print(f"compare_checkpoints: {e}", file=sys.stderr)
        return 2
    changed, unchanged = result.by_group(result.changed), result.by_group(result.unchanged)
    for group in GROUPS:
        total = len(changed[group]) + len(unchanged[group])
        if total:
            print(f"{group:<15} {len(changed[group]):>5} of {total:>5} tensors changed")
    if expected is None:
        return 0
    problems = result.check(expected)
    for problem in problems:
        print(f"UNEXPECTED {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
