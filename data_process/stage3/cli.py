"""Command-line flags shared by the stage-3 scripts, and the objects built from them."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from typing import Any

from .client import ChatClient, RetryPolicy, Stats, endpoint_urls
from .records import checkpoint_path, require_paths, stats_path
from .runner import Checkpoint, report, run_main, run_tasks

API_KEY_ENV = "OPENAI_API_KEY"


def json_object(text: str) -> dict:
    """argparse type: a JSON object given inline or as ``@path/to/file.json``."""
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as handle:
            text = handle.read()
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_api_args(parser: argparse.ArgumentParser, *, model_flags: tuple[str, ...], model_default: str | None,
                 extra_body_flags: tuple[str, ...] = ("--extra_body",), max_tokens: int | None = 8192) -> None:
    """Server, model, retry and timeout flags (the original names: --api_ips, --api_base_template, ...)."""
    g = parser.add_argument_group("server")
    g.add_argument(*model_flags, dest="model", default=model_default, required=model_default is None,
                   help="model name sent in each request")
    g.add_argument("--api_ips", nargs="+", default=["localhost"],
                   help="hosts (or full base URLs) of the servers; requests are spread over all of them")
    g.add_argument("--api_base_template", default="http://{ip}:8000/v1", help="base URL for each of --api_ips")
    g.add_argument("--api_key", default=None, help=f"API key (default: ${API_KEY_ENV} or 'EMPTY'); never printed")
    g.add_argument("--endpoint_policy", choices=("least_busy", "round_robin"), default="least_busy")
    g.add_argument(*extra_body_flags, dest="extra_body", type=json_object, default={},
                   help='JSON merged into every request body, e.g. \'{"chat_template_kwargs": {...}}\' or '
                        'vLLM guided decoding \'{"guided_regex": "..."}\'; "@file.json" reads a file')
    g.add_argument("--max_tokens", type=int, default=max_tokens,
                   help="generation budget; lowered per request so prompt + max_tokens fits the server context")
    g.add_argument("--max_model_len", type=int, default=None,
                   help="server context length (default: read from the server's /models)")
    g.add_argument("--context_margin", type=int, default=16, help="tokens kept free below the context length")
    g.add_argument("--request_timeout", type=float, default=120.0, help="seconds per request, plus ...")
    g.add_argument("--timeout_per_token", type=float, default=0.1, help="... this many seconds per max_tokens")
    g.add_argument("--max_retries", type=int, default=6)
    g.add_argument("--retry_base_delay", type=float, default=1.0, help="first backoff (doubles per retry)")
    g.add_argument("--retry_max_delay", type=float, default=60.0)


def add_run_args(parser: argparse.ArgumentParser, *, max_workers: int = 32) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--max_workers", type=int, default=max_workers, help="requests in flight at once")
    g.add_argument("--seed", type=int, default=42, help="seed of every sampling decision and request seed")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    g.add_argument("--log_level", default="INFO")


def add_sampling_args(parser: argparse.ArgumentParser, *, temperature: float | None, top_p: float | None,
                      min_tokens: int | None = None) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, help="default %(default)s (None: server's)")
    g.add_argument("--top_p", type=float, default=top_p, help="default %(default)s (None: server's)")
    if min_tokens is not None:
        g.add_argument("--min_tokens", type=int, default=min_tokens,
                       help="skip an item when less than this many tokens are left for the answer")


def script_main(parse_args, amain, name: str, argv: list[str] | None, inputs=None) -> int:
    """Parse, check that the input paths ``inputs(args)`` exist, set up logging, run ``amain(args, logger)``
    with clean Ctrl-C/SIGTERM handling; file-system errors end it with one line."""
    args = parse_args(argv)
    if inputs is not None:
        require_paths(*inputs(args))
    logger = setup(args, name)
    with one_line_os_errors():
        return run_main(lambda: amain(args, logger))


@contextlib.contextmanager
def one_line_os_errors():
    """A file-system mistake (missing input, output folder that is a file, no permission, disk full) ends the
    script with one line naming the path, not a traceback."""
    try:
        yield
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        what = err.strerror or str(err)
        if isinstance(err, FileExistsError) and err.filename and os.path.isfile(err.filename):
            what = "is a file, not a folder"
        raise SystemExit(f"error: {where}{what}") from None


def api_key(args: argparse.Namespace) -> str:
    return args.api_key or os.environ.get(API_KEY_ENV) or "EMPTY"


def make_client(args: argparse.Namespace, stats: Stats) -> ChatClient:
    return ChatClient(
        endpoint_urls(args.api_ips, args.api_base_template), model=args.model, api_key=api_key(args),
        endpoint_policy=args.endpoint_policy,
        retry=RetryPolicy(args.max_retries, args.retry_base_delay, args.retry_max_delay),
        request_timeout=args.request_timeout, timeout_per_token=args.timeout_per_token,
        extra_body=args.extra_body, stats=stats, seed=args.seed, context_margin=args.context_margin)


def public_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as they may be logged: the API key masked."""
    shown = dict(vars(args))
    if shown.get("api_key"):
        shown["api_key"] = "***"
    return shown


def setup(args: argparse.Namespace, name: str) -> logging.Logger:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    log = logging.getLogger(name)
    log.info("arguments: %s", json.dumps(public_args(args), ensure_ascii=False, default=str))
    return log


async def run_requests(args: argparse.Namespace, stats: Stats, tasks, make_handler, output: str,
                       desc: str, total: int | None = None) -> dict[str, dict]:
    """Open the client, read the server context length, run ``tasks`` against ``<output>.ckpt.jsonl``.

    ``make_handler(client, context_len)`` returns the per-task coroutine function.
    """
    async with make_client(args, stats) as client:
        server_len = await client.probe()  # fails at once, with one line, when no endpoint answers
        context_len = args.max_model_len or server_len
        total = len(tasks) if total is None else total
        logging.getLogger(__name__).info("%d tasks, server context length %s", total, context_len)
        with Checkpoint(checkpoint_path(output)) as ckpt:
            return await run_tasks(tasks, make_handler(client, context_len), ckpt, max_workers=args.max_workers,
                                   stats=stats, desc=desc, total=total, progress=not args.no_progress)


@contextlib.contextmanager
def final_report(stats: Stats, output: str):
    """Print and save the statistics when the block ends, however it ends (except a one-line usage error
    before any request: ``SystemExit`` passes through alone)."""
    try:
        yield
    except SystemExit:
        if stats.items:  # work had started: say what was done
            report(stats, stats_path(output), interrupted=True)
        raise
    except BaseException:
        report(stats, stats_path(output), interrupted=True)
        raise
    report(stats, stats_path(output), interrupted=False)


def exit_code(stats: Stats) -> int:
    """0, or 2 when some items failed after all retries (a rerun sends them again)."""
    return 2 if stats.failed else 0
