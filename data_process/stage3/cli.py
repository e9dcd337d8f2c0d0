"""Command-line flags shared by the stage-3 scripts (the driver that runs them is ``runner.run_step``)."""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

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


def add_judge_args(parser: argparse.ArgumentParser, *, no_think: bool) -> None:
    """One switch for both judges, only the default differs: ``--judge_no_think`` appends Qwen3's ``/no_think``
    to the judge prompt, ``--judge_thinking`` does not."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--judge_no_think", dest="judge_no_think", action="store_true", default=no_think,
                   help="append /no_think to the judge prompt (Qwen3-style judges)"
                        + (" (default)" if no_think else ""))
    g.add_argument("--judge_thinking", dest="judge_no_think", action="store_false",
                   help="let the judge think (no /no_think)" + ("" if no_think else " (default)"))


def api_key(args: argparse.Namespace) -> str:
    return args.api_key or os.environ.get(API_KEY_ENV) or "EMPTY"


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


def make_client(args: argparse.Namespace, stats):
    """The client the flags describe (kept here for callers outside stage 3; it lives in ``runner``)."""
    from .runner import make_client as build  # runner imports this module: import at call time

    return build(args, stats)
