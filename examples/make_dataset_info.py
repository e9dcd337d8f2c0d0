#!/usr/bin/env python3
"""Write examples/dataset_info.json: the LLaMA-Factory entries of every dataset the stage recipes train on.

Names and entries come from data_process/naming.py, so they match the shard folders data_process writes. Paths are
relative to the `dataset_dir` of the stage YAMLs (`data/`):

    data/LLaVA_ReCap_558K/, data/synthdog_en/, ...   stages 1, 2.1 (process_llava.py, process_synthdog.py)
    data/llavaonevision_converted/<name>/            stage 2.2 (process_onevision.py, its --output_dir)
    data/text2image.parquet, data/image_thinking.parquet   stage 3 (single files from data_process/stage3)

    python examples/make_dataset_info.py            # (re)write examples/dataset_info.json
    python examples/make_dataset_info.py --check    # exit 1 if the file is out of date
    python examples/make_dataset_info.py --output data/dataset_info.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_process.naming import (
    LLAVA_RECAP_DATASETS,
    ONEVISION_CONFIGS,
    ONEVISION_TEXT_ONLY_CONFIGS,
    SYNTHDOG_DATASETS,
    dataset_info_entry,
    hub_output_name,
    onevision_name,
)

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "dataset_info.json"
ONEVISION_DIR = "llavaonevision_converted"
# Stage-3 outputs of data_process/stage3 (text2image: rendered questions; image_thinking: GLM-4.1V distillation).
STAGE3_DATASETS = ("text2image", "image_thinking")


def stage_datasets() -> dict[str, list[str]]:
    """Dataset names per stage, in recipe order (stage 2.2 follows the OneVision config order)."""
    recap = [hub_output_name(hub_id) for hub_id in LLAVA_RECAP_DATASETS]
    synthdog = [hub_output_name(SYNTHDOG_DATASETS[lang]) for lang in ("zh", "en")]
    onevision = [onevision_name(c) for c in ONEVISION_CONFIGS if c not in ONEVISION_TEXT_ONLY_CONFIGS]
    return {
        "stage1": ["LLaVA_ReCap_558K"],
        "stage2.1": recap + synthdog,
        "stage2.2": onevision,
        "stage3": list(STAGE3_DATASETS),
    }


def folder_of(name: str) -> str:
    """Where a dataset lives relative to dataset_dir: a shard folder, or the single parquet file of stage 3."""
    if name in STAGE3_DATASETS:
        return f"{name}.parquet"
    onevision = {onevision_name(c) for c in ONEVISION_CONFIGS}
    return f"{ONEVISION_DIR}/{name}" if name in onevision else name


def dataset_info_entries(names: list[str] | None = None) -> dict[str, dict]:
    """dataset_info.json content for `names` (default: every dataset of every stage)."""
    if names is None:
        names = list(dict.fromkeys(n for stage in stage_datasets().values() for n in stage))
    return {name: dataset_info_entry(name, folder_of(name)) for name in names}


def render(entries: dict[str, dict]) -> str:
    return json.dumps(entries, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="file to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if --output differs")
    args = parser.parse_args(argv)
    wanted = render(dataset_info_entries())
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != wanted:
            print(f"{args.output} is out of date: run python examples/make_dataset_info.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date ({len(json.loads(wanted))} datasets)")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(wanted)
    print(f"wrote {len(json.loads(wanted))} datasets to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
