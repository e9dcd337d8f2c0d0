"""Stage 1 / 2.1 captions: LLaVA-ReCap (558K, CC12M, CC3M) to LLaMA-Factory sharegpt parquet shards.

    python data_process/process_llava.py --output_dir LLaMA-Factory/data \
        --source lmms-lab/LLaVA-ReCap-558K=/data/LLaVA-ReCap-558K --num_processes 16
"""

from __future__ import annotations

import argparse
import sys

if __package__ in (None, ""):
    import _bootstrap  # noqa: F401

from data_process import pipeline
from data_process.naming import LLAVA_RECAP_DATASETS, hub_output_name
from data_process.rules import FIRST_TURN_PREPEND, LlavaRowConverter

TEST_ROWS = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert LLaVA-ReCap datasets (hub ids or local copies) to parquet shards for LLaMA-Factory.")
    parser.add_argument("--datasets", nargs="+", default=list(LLAVA_RECAP_DATASETS), metavar="HUB_ID",
                        help="hub ids to convert (default: %(default)s)")
    pipeline.add_source_argument(parser)
    pipeline.add_run_arguments(parser, "./llava_recap_converted", TEST_ROWS, default_max_samples=2_000_000)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sources = pipeline.parse_sources(parser, args.source)
    converter = LlavaRowConverter(first_turn=FIRST_TURN_PREPEND, image_policy=pipeline.image_policy(args))
    jobs = []
    for hub_id in args.datasets:
        name = hub_output_name(hub_id)
        location = sources.get(hub_id) or sources.get(name) or hub_id
        jobs.append(pipeline.DatasetJob(name=name, converter=converter, location=location))
    return pipeline.run_jobs(jobs, pipeline.run_options(args, TEST_ROWS))


if __name__ == "__main__":
    sys.exit(main())
