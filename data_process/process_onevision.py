"""Stage 2.2: the LLaVA-OneVision-Data configs to LLaMA-Factory sharegpt parquet shards.

    python data_process/process_onevision.py --output_dir LLaMA-Factory/data/llavaonevision_converted \
        --source lmms-lab/LLaVA-OneVision-Data=/data/LLaVA-OneVision-Data --configs "ai2d(gpt4v)" geo3k
"""

from __future__ import annotations

import argparse
import sys

if __package__ in (None, ""):
    import _bootstrap  # noqa: F401

from data_process import pipeline
from data_process.naming import (
    ONEVISION_CONFIGS,
    ONEVISION_REPO,
    ONEVISION_TEXT_ONLY_CONFIGS,
    onevision_name,
    onevision_uses_image_prepend,
)
from data_process.rules import FIRST_TURN_PREPEND, FIRST_TURN_REQUIRE, LlavaRowConverter

TEST_ROWS = 100


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert LLaVA-OneVision-Data configs (hub or a local copy) to parquet shards for LLaMA-Factory.")
    parser.add_argument("--configs", nargs="+", default=list(ONEVISION_CONFIGS), metavar="CONFIG",
                        help="configs to convert, by config name or output name (default: all 89)")
    parser.add_argument("--local_dir", default=None,
                        help=f"a local copy of {ONEVISION_REPO} in the hub layout "
                             f"(same as --source {ONEVISION_REPO}=DIR)")
    pipeline.add_source_argument(parser)
    pipeline.add_run_arguments(parser, "./llavaonevision_converted", TEST_ROWS)
    return parser


def resolve_configs(parser: argparse.ArgumentParser, values: list[str]) -> list[str]:
    by_name = {onevision_name(config): config for config in ONEVISION_CONFIGS}
    configs = []
    for value in values:
        config = value if value in ONEVISION_CONFIGS else by_name.get(value)
        if config is None:
            parser.error(f"unknown config {value!r} (see --help; names like 'ai2d(gpt4v)' or 'ai2d_gpt4v')")
        configs.append(config)
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sources = pipeline.parse_sources(parser, args.source)
    location = args.local_dir or sources.get(ONEVISION_REPO) or ONEVISION_REPO
    policy = pipeline.image_policy(args)
    jobs = []
    for config in resolve_configs(parser, args.configs):
        first_turn = FIRST_TURN_PREPEND if onevision_uses_image_prepend(config) else FIRST_TURN_REQUIRE
        converter = LlavaRowConverter(first_turn=first_turn, image_policy=policy)
        jobs.append(pipeline.DatasetJob(name=onevision_name(config), converter=converter, location=location,
                                        config=config, may_be_empty=config in ONEVISION_TEXT_ONLY_CONFIGS))
    return pipeline.run_jobs(jobs, pipeline.run_options(args, TEST_ROWS))


if __name__ == "__main__":
    sys.exit(main())
