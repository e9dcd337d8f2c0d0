"""Async client for OpenAI-compatible chat servers (vLLM, SGLang, hosted APIs).

* several endpoints, chosen least-busy (fewest requests in flight, ties round-robin) or round-robin;
* retries with exponential backoff and jitter on 5xx, 408/429, timeouts, connection errors and broken
  bodies; other 4xx answers are final;
* one timeout per request, scaled to the number of tokens it may generate;
* counters for the final report (:class:`Stats`).

The API key only ever goes into the ``Authorization`` header; it is never logged.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
SAMPLE_ID_HEADER = "X-Sample-Id"
ERROR_DETAIL_CHARS = 300
# vLLM's 400 answers when a request does not fit the context; each states the context and the prompt length:
#   "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens (2036 in the
#    messages, 64 in the completion). ..."                                  (text prompt + max_tokens too long)
#   "... However, you requested 2100 tokens in the messages, ..."          (no max_tokens, prompt too long)
#   "The decoder prompt (length 2301) is longer than the maximum model length of 2048. ..."
#                                                          (the engine, after image tokens were added)
_CONTEXT_LEN = re.compile(r"maximum (?:context|model) length (?:is|of) (\d+)")
_PROMPT_LEN = re.compile(r"\((\d+) in the messages|requested (\d+) tokens in the messages|prompt \(length (\d+)\)"
                         r"|request has (\d+) input tokens|[Pp]rompt length of (\d+)")
MESSAGE_OVERHEAD_TOKENS = 8
PROBE_TIMEOUT_S = 10.0


class RequestFailed(Exception):
    """A request that did not produce a usable answer; ``reason`` is the counted key."""

    def __init__(self, reason: str, detail: str = "", retryable: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.retryable = retryable


class PromptTooLong(RequestFailed):
    """The server says the prompt leaves fewer than the wanted tokens for the answer: a final answer for this
    item (sending it again cannot help), unlike the failures a rerun retries."""

    def __init__(self, detail: str):
        super().__init__("prompt_too_long", detail)


def context_overflow(detail: str) -> tuple[int, int | None] | None:
    """``(context length, prompt tokens or None)`` from a vLLM context-overflow answer, else None."""
    context = _CONTEXT_LEN.search(detail)
    if context is None:
        return None
    prompt = _PROMPT_LEN.search(detail)
    return int(context.group(1)), next((int(g) for g in prompt.groups() if g), None) if prompt else None


@dataclass
class Stats:
    """Counters shared by the client and the runner; ``as_dict`` is what scripts print and save."""

    items: int = 0
    resumed: int = 0
    requests: int = 0
    retried: Counter = field(default_factory=Counter)
    ok: int = 0
    rejected: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    extra: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def count(self, counter: str) -> None:
        """One more request of the kind ``counter`` ("requests" are the chat requests of the report)."""
        if counter == "requests":
            self.requests += 1
        else:
            self.extra[counter] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items, "resumed (already done)": self.resumed, "requests sent": self.requests,
            "retries": sum(self.retried.values()), "retried by reason": dict(self.retried),
            "ok": self.ok, "rejected": sum(self.rejected.values()), "rejected by reason": dict(self.rejected),
            "failed": sum(self.failed.values()), "failed by reason": dict(self.failed),
            **dict(self.extra), "seconds": round(time.monotonic() - self.started, 1),
        }


@dataclass
class RetryPolicy:
    max_retries: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with "equal jitter": half fixed, half uniform random."""
        cap = min(self.max_delay, self.base_delay * (2 ** attempt))
        return cap / 2 + rng.uniform(0, cap / 2)


@dataclass
class Endpoint:
    base_url: str
    in_flight: int = 0
    sent: int = 0
    errors: int = 0

    @property
    def root_url(self) -> str:
        """Server root (vLLM's ``/tokenize`` lives there, not under ``/v1``)."""
        url = self.base_url.rstrip("/")
        return url.removesuffix("/v1")


class EndpointPool:
    def __init__(self, base_urls: list[str], policy: str = "least_busy"):
        if not base_urls:
            raise ValueError("at least one endpoint is needed")
        if policy not in ("least_busy", "round_robin"):
            raise ValueError(f"unknown endpoint policy {policy!r}")
        self.endpoints = [Endpoint(u.rstrip("/")) for u in base_urls]
        self.policy = policy
        self._next = 0

    def acquire(self, avoid: Endpoint | None = None) -> Endpoint:
        """Pick an endpoint (not ``avoid`` when there is a choice) and count it as busy."""
        n = len(self.endpoints)
        order = [self.endpoints[(self._next + i) % n] for i in range(n)]
        self._next = (self._next + 1) % n
        if avoid is not None and n > 1:
            order = [e for e in order if e is not avoid]
        chosen = order[0] if self.policy == "round_robin" else min(order, key=lambda e: e.in_flight)
        chosen.in_flight += 1
        chosen.sent += 1
        return chosen

    def release(self, endpoint: Endpoint, ok: bool) -> None:
        endpoint.in_flight -= 1
        if not ok:
            endpoint.errors += 1


def endpoint_urls(api_ips: list[str], template: str) -> list[str]:
    """``--api_ips`` through ``--api_base_template``; entries that already are URLs are kept as they are."""
    return [ip if ip.startswith(("http://", "https://")) else template.format(ip=ip) for ip in api_ips]


def message_text(message: dict) -> str:
    """The assistant text, with a separately returned reasoning part put back as ``<think>…</think>``."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if reasoning is None:
        reasoning = message.get("reasoning")  # the field's newer name
    if reasoning is not None and "<think>" not in content:
        return f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"
    return content


@dataclass
class ChatResult:
    text: str
    finish_reason: str | None
    usage: dict
    max_tokens: int | None  # as finally sent (after any context correction)


class ChatClient:
    """Use as ``async with ChatClient(...) as client``; all methods are safe to call concurrently."""

    def __init__(self, base_urls: list[str], *, model: str, api_key: str = "EMPTY",
                 endpoint_policy: str = "least_busy", retry: RetryPolicy | None = None,
                 request_timeout: float = 120.0, timeout_per_token: float = 0.1,
                 extra_body: dict | None = None, stats: Stats | None = None, seed: int = 0,
                 context_margin: int = 16):
        self.pool = EndpointPool(base_urls, endpoint_policy)
        self.model = model
        self.retry = retry or RetryPolicy()
        self.request_timeout = request_timeout
        self.timeout_per_token = timeout_per_token
        self.extra_body = dict(extra_body or {})
        self.context_margin = context_margin
        self.stats = stats or Stats()
        self._rng = random.Random(seed)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None
        self._tokenize_supported = True

    async def __aenter__(self) -> ChatClient:
        # No connection cap here: concurrency is bounded by the runner's semaphore.
        self._session = aiohttp.ClientSession(headers=self._headers, connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()

    def timeout_for(self, max_tokens: int | None) -> float:
        return self.request_timeout + self.timeout_per_token * (max_tokens or 0)

    async def probe(self) -> int | None:
        """Ask every endpoint's ``/models`` once, at start-up; return the smallest ``max_model_len`` reported.

        Endpoints that do not answer at all are dropped with a warning; when none answers, this fails at once
        with one line (instead of every item retrying for a minute). Any HTTP answer counts as alive.
        """
        lengths, alive, errors = [], [], []
        for ep in self.pool.endpoints:
            try:
                data = await self._get_json(ep.base_url + "/models", timeout=PROBE_TIMEOUT_S)
            except RequestFailed as err:  # an HTTP error: the server is there (a hosted API may refuse /models)
                alive.append(ep)
                log.warning("%s/models: %s", ep.base_url, err.reason)
                continue
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as err:
                errors.append(f"{ep.base_url} ({type(err).__name__}: {err})" if str(err) else
                              f"{ep.base_url} ({type(err).__name__})")
                continue
            alive.append(ep)
            entries = [e for e in (data or {}).get("data", []) if isinstance(e, dict)
                       and isinstance(e.get("max_model_len"), int)] if isinstance(data, dict) else []
            named = [e for e in entries if e.get("id") == self.model]
            lengths += [e["max_model_len"] for e in (named or entries)]  # served under another name: all
        if not alive:
            raise SystemExit(f"error: no server answers at {', '.join(errors)}; start it or fix "
                             f"--api_ips / --api_base_template")
        for error in errors:
            log.warning("dropping an endpoint that does not answer: %s", error)
        self.pool.endpoints = alive
        return min(lengths) if lengths else None

    async def max_model_len(self) -> int | None:
        """The smallest ``max_model_len`` reported by the endpoints' ``/models`` (vLLM), or None."""
        return await self.probe()

    async def count_prompt_tokens(self, messages: list[dict], sample_id: str = "") -> int | None:
        """Prompt length from vLLM's ``/tokenize`` (chat template applied); None where unsupported.

        For images vLLM counts one placeholder token only; the server's overflow answer corrects that.
        """
        if not self._tokenize_supported:
            return None
        body = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        try:
            data = await self._with_retries(lambda ep: ep.root_url + "/tokenize", body, sample_id=sample_id,
                                            count_as="tokenize requests")
            return int(data["count"])
        except RequestFailed as err:
            if err.reason in ("http_404", "http_405"):
                self._tokenize_supported = False  # not vLLM: stop asking
            return None
        except (KeyError, TypeError, ValueError):
            return None

    async def fit_max_tokens(self, messages: list[dict], wanted: int | None, context_len: int | None,
                             sample_id: str = "") -> int | None:
        """``wanted`` lowered so that prompt + max_tokens + margin fits ``context_len``.

        The prompt is measured by the server where it can (``/tokenize``), else estimated from its length;
        for images the server's own overflow answer corrects the budget in :meth:`chat`.
        """
        if context_len is None:
            return wanted
        prompt = await self.count_prompt_tokens(messages, sample_id)
        if prompt is None:
            prompt = estimate_prompt_tokens(messages)
        room = context_len - prompt - self.context_margin
        return room if wanted is None else min(wanted, room)

    async def ask(self, messages: list[dict], *, sample_id: str, max_tokens: int | None, context_len: int | None,
                  seed: int, temperature: float | None = None, top_p: float | None = None,
                  min_tokens: int = 1) -> ChatResult | None:
        """One chat request with a budget that fits the context; None if fewer than ``min_tokens`` fit.

        "Fit" is decided before sending (``/tokenize``) and again from the server's own overflow answer (which
        counts image tokens too). Sampling parameters left at None are not sent (the server's defaults apply).
        """
        budget = await self.fit_max_tokens(messages, max_tokens, context_len, sample_id)
        if budget is not None and budget < min_tokens:
            return None
        optional = {"max_tokens": budget, "temperature": temperature, "top_p": top_p}
        body = {"messages": messages, "seed": seed, **{k: v for k, v in optional.items() if v is not None}}
        try:
            return await self.chat(body, sample_id=sample_id, min_tokens=min_tokens)
        except PromptTooLong as err:
            log.info("%s: %s", sample_id, err.detail)
            return None

    async def chat(self, body: dict, *, sample_id: str, min_tokens: int = 1) -> ChatResult:
        """POST ``/chat/completions`` with retries; raise :class:`RequestFailed` when it cannot succeed
        (:class:`PromptTooLong` when the server says fewer than ``min_tokens`` fit)."""
        body = {"model": self.model, **body, **self.extra_body}
        data = await self._with_retries(
            lambda ep: ep.base_url + "/chat/completions", body, sample_id=sample_id, count_as="requests",
            validate=_check_chat, adjust=lambda b, failure: _fit_to_server(b, failure, self.context_margin,
                                                                          min_tokens))
        return _parse_chat(data, body)

    async def _with_retries(self, url_of, body: dict, *, sample_id: str, count_as: str,
                            validate: Callable[[dict], None] | None = None,
                            adjust: Callable[[dict, RequestFailed], bool] | None = None) -> dict:
        """POST ``body`` until it succeeds. ``count_as`` names the counter each attempt adds to, ``validate``
        raises :class:`RequestFailed` for an unusable 200 answer, ``adjust`` may change the body after a
        failure and return True to send it again at once (it does not use up a retry)."""
        last: Endpoint | None = None
        for attempt in range(self.retry.max_retries + 1):
            ep = self.pool.acquire(avoid=last)
            last = ep
            ok = False
            self.stats.count(count_as)
            try:
                data = await self._post_json(url_of(ep), body, timeout=self.timeout_for(body.get("max_tokens")),
                                             headers={SAMPLE_ID_HEADER: sample_id})
                if validate is not None:
                    validate(data)
                ok = True
                return data
            except RequestFailed as err:
                failure = err
            finally:
                self.pool.release(ep, ok)
            if adjust is not None and adjust(body, failure):
                self.stats.retried["context_overflow"] += 1
                continue
            if not failure.retryable:
                raise failure
            if attempt == self.retry.max_retries:
                break
            self.stats.retried[failure.reason] += 1
            delay = self.retry.delay(attempt, self._rng)
            log.debug("%s: %s, retry %d in %.2fs", sample_id, failure.reason, attempt + 1, delay)
            await asyncio.sleep(delay)
        raise RequestFailed(failure.reason, f"gave up after {self.retry.max_retries + 1} attempts: {failure.detail}")

    async def _get_json(self, url: str, timeout: float = 30.0) -> dict:
        assert self._session is not None, "use `async with ChatClient(...)`"
        async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                raise RequestFailed(f"http_{resp.status}")
            return await resp.json(content_type=None)

    async def _post_json(self, url: str, body: dict, *, timeout: float, headers: dict | None = None) -> dict:
        """One attempt; every failure becomes a :class:`RequestFailed` that says whether to retry."""
        assert self._session is not None, "use `async with ChatClient(...)`"
        try:
            async with self._session.post(url, json=body, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                text = await resp.text()
                if resp.status != 200:
                    retry = resp.status >= 500 or resp.status in RETRYABLE_STATUS
                    raise RequestFailed(f"http_{resp.status}", text[:ERROR_DETAIL_CHARS], retryable=retry)
        except asyncio.TimeoutError:
            raise RequestFailed("timeout", f"no answer within {timeout:.0f}s", retryable=True) from None
        except aiohttp.ClientPayloadError as err:
            raise RequestFailed("broken_body", str(err), retryable=True) from None
        except aiohttp.ClientError as err:  # connection refused/reset, server disconnected, ...
            raise RequestFailed("connection", f"{type(err).__name__}: {err}", retryable=True) from None
        try:
            return json.loads(text)
        except ValueError:
            raise RequestFailed("bad_json", text[:ERROR_DETAIL_CHARS], retryable=True) from None


def estimate_prompt_tokens(messages: list[dict]) -> int:
    """Rough prompt length: one token per character (at least as many as BPE uses for CJK text)."""
    total = 0
    for message in messages:
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"text": content or ""}]
        total += MESSAGE_OVERHEAD_TOKENS + sum(len(p.get("text") or "") for p in parts)
    return total


def _fit_to_server(body: dict, failure: RequestFailed, margin: int, min_tokens: int) -> bool:
    """After vLLM's context-overflow answer: lower ``max_tokens`` to what fits and return True (send again),
    or raise :class:`PromptTooLong` when fewer than ``min_tokens`` fit; False for any other failure."""
    overflow = context_overflow(failure.detail) if failure.reason == "http_400" else None
    if overflow is None:
        return False
    context_len, prompt = overflow
    if prompt is None:
        return False
    room = context_len - prompt - margin
    if room < max(1, min_tokens):
        raise PromptTooLong(f"the server counts {prompt} prompt tokens, its context is {context_len}")
    if not body.get("max_tokens") or room >= body["max_tokens"]:
        return False
    body["max_tokens"] = room
    return True


def _check_chat(data: dict) -> None:
    try:
        data["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        raise RequestFailed("bad_response", json.dumps(data)[:ERROR_DETAIL_CHARS], retryable=True) from None


def _parse_chat(data: dict, body: dict) -> ChatResult:
    choice = data["choices"][0]
    return ChatResult(text=message_text(choice["message"]), finish_reason=choice.get("finish_reason"),
                      usage=data.get("usage") or {}, max_tokens=body.get("max_tokens"))
