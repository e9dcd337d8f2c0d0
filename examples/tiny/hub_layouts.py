"""Writers of local copies of hub datasets in their repos' own layouts and schemas (LLaVA-ReCap, synthdog,
LLaVA-OneVision-Data), readable by ``datasets.load_dataset(dir)`` and by the data scripts' ``--source NAME=DIR``.
Used by the quickstart's samples and the data tests (examples must not import from tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["hub_features", "make_onevision_repo", "make_recap_repo", "make_synthdog_repo", "write_parquet_files"]


def hub_features(kind: str):
    """The ``datasets.Features`` of each hub dataset (as published)."""
    import datasets

    conversations = [{"from": datasets.Value("string"), "value": datasets.Value("string")}]
    columns = {
        "recap": {"id": datasets.Value("string"), "image": datasets.Image(), "conversations": conversations},
        "synthdog": {"image": datasets.Image(), "ground_truth": datasets.Value("string")},
        "onevision": {"id": datasets.Value("string"), "image": datasets.Image(), "conversations": conversations,
                      "data_source": datasets.Value("string")},
    }[kind]
    return datasets.Features(columns)


def write_parquet_files(rows: list[dict], kind: str, paths: list[Path]) -> None:
    """Split ``rows`` over ``paths`` as HF datasets would publish them (features metadata included)."""
    import datasets

    chunks = np.array_split(np.arange(len(rows)), len(paths))
    for path, chunk in zip(paths, chunks):
        path.parent.mkdir(parents=True, exist_ok=True)
        part = datasets.Dataset.from_list([rows[i] for i in chunk], features=hub_features(kind))
        part.to_parquet(str(path))


def make_recap_repo(root: Path, rows: list[dict], num_files: int = 2) -> Path:
    """``lmms-lab/LLaVA-ReCap-*`` layout: ``data/train-0000x-of-0000n.parquet``."""
    paths = [root / "data" / f"train-{i:05d}-of-{num_files:05d}.parquet" for i in range(num_files)]
    write_parquet_files(rows, "recap", paths)
    return root


def make_synthdog_repo(root: Path, rows: list[dict]) -> Path:
    """``naver-clova-ix/synthdog-*`` layout: ``data/{train,validation}-*.parquet``."""
    write_parquet_files(rows, "synthdog", [root / "data" / "train-00000-of-00001-abc.parquet"])
    write_parquet_files(rows[:2], "synthdog", [root / "data" / "validation-00000-of-00001-def.parquet"])
    return root


def make_onevision_repo(root: Path, configs: dict[str, list[dict]]) -> Path:
    """``lmms-lab/LLaVA-OneVision-Data`` layout: one folder per config plus README configs YAML."""
    lines = ["---", "configs:"]
    for config, rows in configs.items():
        write_parquet_files(rows, "onevision", [root / config / "train-00000-of-00001.parquet"])
        lines += [f"- config_name: {config}", "  data_files:", "  - split: train", f"    path: {config}/train-*"]
    lines.append("---")
    (root / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
