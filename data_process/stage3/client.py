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
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
SAMPLE_ID_HEADER = "X-Sample-Id"
ERROR_DETAIL_CHARS = 300


class RequestFailed(Exception):
    """A request that did not produce a usable answer; ``reason`` is the counted key."""

    def __init__(self, reason: str, detail: str = "", retryable: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.retryable = retryable


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
        return url[: -len("/v1")] if url.endswith("/v1") else url


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
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning and "<think>" not in content:
        return f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"
    return content


@dataclass
class ChatResult:
    text: str
    finish_reason: str | None
    usage: dict
    endpoint: str


class ChatClient:
    """Use as ``async with ChatClient(...) as client``; all methods are safe to call concurrently."""

    def __init__(self, base_urls: list[str], *, model: str, api_key: str = "EMPTY",
                 endpoint_policy: str = "least_busy", retry: RetryPolicy | None = None,
                 request_timeout: float = 120.0, timeout_per_token: float = 0.1,
                 extra_body: dict | None = None, stats: Stats | None = None, seed: int = 0):
        self.pool = EndpointPool(base_urls, endpoint_policy)
        self.model = model
        self.retry = retry or RetryPolicy()
        self.request_timeout = request_timeout
        self.timeout_per_token = timeout_per_token
        self.extra_body = dict(extra_body or {})
        self.stats = stats or Stats()
        self._rng = random.Random(seed)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "ChatClient":
        # No connection cap here: concurrency is bounded by the runner's semaphore.
        self._session = aiohttp.ClientSession(headers=self._headers, connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()

    def timeout_for(self, max_tokens: int | None) -> float:
        return self.request_timeout + self.timeout_per_token * (max_tokens or 0)

    async def max_model_len(self) -> int | None:
        """The smallest ``max_model_len`` reported by the endpoints' ``/models`` (vLLM), or None."""
        lengths = []
        for ep in self.pool.endpoints:
            try:
                data = await self._get_json(ep.base_url + "/models")
            except (RequestFailed, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
                log.warning("could not read %s/models: %s", ep.base_url, err)
                continue
            for entry in data.get("data", []):
                if entry.get("id") == self.model and isinstance(entry.get("max_model_len"), int):
                    lengths.append(entry["max_model_len"])
        return min(lengths) if lengths else None

    async def count_prompt_tokens(self, messages: list[dict]) -> int | None:
        """Prompt length from vLLM's ``/tokenize`` (chat template applied); None where unsupported."""
        ep = self.pool.acquire()
        ok = False
        try:
            body = {"model": self.model, "messages": messages, "add_generation_prompt": True}
            data = await self._post_json(ep.root_url + "/tokenize", body, timeout=self.request_timeout)
            ok = True
            return int(data["count"])
        except (RequestFailed, aiohttp.ClientError, asyncio.TimeoutError, KeyError, TypeError, ValueError):
            return None
        finally:
            self.pool.release(ep, ok)

    async def chat(self, body: dict, *, sample_id: str) -> ChatResult:
        """POST ``/chat/completions`` with retries; raise :class:`RequestFailed` when it cannot succeed."""
        body = {"model": self.model, **body, **self.extra_body}
        timeout = self.timeout_for(body.get("max_tokens"))
        last: Endpoint | None = None
        for attempt in range(self.retry.max_retries + 1):
            ep = self.pool.acquire(avoid=last)
            last = ep
            ok = False
            try:
                self.stats.requests += 1
                data = await self._post_json(ep.base_url + "/chat/completions", body, timeout=timeout,
                                             headers={SAMPLE_ID_HEADER: sample_id})
                result = _parse_chat(data, ep.base_url)
                ok = True
                return result
            except RequestFailed as err:
                failure = err
            finally:
                self.pool.release(ep, ok)
            if not failure.retryable:
                raise failure
            self.stats.retried[failure.reason] += 1
            if attempt == self.retry.max_retries:
                raise RequestFailed(failure.reason, f"gave up after {attempt + 1} attempts: {failure.detail}")
            delay = self.retry.delay(attempt, self._rng)
            log.debug("%s: %s, retry %d in %.2fs", sample_id, failure.reason, attempt + 1, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _get_json(self, url: str) -> dict:
        assert self._session is not None, "use `async with ChatClient(...)`"
        async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
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


def _parse_chat(data: dict, endpoint: str) -> ChatResult:
    try:
        choice = data["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise RequestFailed("bad_response", json.dumps(data)[:ERROR_DETAIL_CHARS], retryable=True) from None
    return ChatResult(text=message_text(message), finish_reason=choice.get("finish_reason"),
                      usage=data.get("usage") or {}, endpoint=endpoint)
