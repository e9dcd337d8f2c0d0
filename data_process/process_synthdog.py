"""Stage 2.1 OCR: synthdog-en / synthdog-zh to LLaMA-Factory sharegpt parquet shards.

    python data_process/process_synthdog.py --output_dir LLaMA-Factory/data --languages en zh
"""

from __future__ import annotations

import argparse
import sys

if __package__ in (None, ""):
    import _bootstrap  # noqa: F401

from data_process import pipeline
from data_process.naming import SYNTHDOG_DATASETS, hub_output_name
from data_process.rules import SynthdogRowConverter

TEST_ROWS = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert synthdog OCR datasets (hub ids or local copies) to parquet shards for LLaMA-Factory.")
    parser.add_argument("--languages", nargs="+", choices=sorted(SYNTHDOG_DATASETS), default=["en", "zh"],
                        help="languages to convert (default: en zh)")
    pipeline.add_source_argument(parser)
    pipeline.add_run_arguments(parser, "./synthdog_converted", TEST_ROWS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sources = pipeline.parse_sources(parser, args.source)
    jobs = []
    for language in args.languages:
        hub_id = SYNTHDOG_DATASETS[language]
        name = hub_output_name(hub_id)
        converter = SynthdogRowConverter(language=language, image_policy=pipeline.image_policy(args))
        location = sources.get(hub_id) or sources.get(name) or hub_id
        jobs.append(pipeline.DatasetJob(name=name, converter=converter, location=location))
    return pipeline.run_jobs(jobs, pipeline.run_options(args, TEST_ROWS))


if __name__ == "__main__":
    sys.exit(main())
