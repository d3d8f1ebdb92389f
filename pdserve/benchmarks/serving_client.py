"""The load generator of `pdserve bench`: sends a workload to an OpenAI-compatible server over streaming HTTP
and times every request from the client's side. Needs no torch and no pdserve module, and reads pdserve's
extra fields (usage.pdserve_timings) only when a server sends them.

Definitions (those of `vllm bench serve`):
- TTFT: from sending the request to the first chunk that carries content (text or a delta's content);
- ITL: the gaps between consecutive content chunks; a request's p99 ITL is its token-pacing figure;
- TPOT: (e2e - TTFT) / (output tokens - 1), output tokens from the final `usage` (asked for with
  stream_options.include_usage), or the number of content chunks when a server sends no usage;
- E2E: from sending to the stream's end.
A request that fails is recorded with a kind (http_<status>, connect, dropped, timeout, stream_error,
incomplete) and never stops the run.

Arrivals: gaps drawn from a gamma distribution with shape `burstiness` and mean 1/rate (burstiness 1 is a
Poisson process; below 1 is burstier), all at once for rate inf; --max-concurrency caps requests in flight,
and a request waiting for a slot is timed from when it is actually sent. Conversation turns wait for their
session's previous turn.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import httpx

from pdserve.benchmarks.workloads import BenchRequest


@dataclass
class RequestResult:
    ok: bool
    error_kind: str = ""
    error: str = ""
    sent_at: float = 0.0  # seconds since the run started
    ttft: Optional[float] = None
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: Optional[int] = None  # from usage, when given
    cached_tokens: Optional[int] = None  # usage.prompt_tokens_details.cached_tokens, when given
    timings: Optional[dict] = None  # usage.pdserve_timings, when given

    @property
    def tpot(self) -> Optional[float]:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass
class ClientConfig:
    base_url: str  # the server's root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    endpoint: str = "/v1/completions"
    model: str = ""
    ignore_eos: bool = True
    request_timeout_s: float = 600.0
    api_key: str = ""
    tokenizer: object = None  # tokenizers.Tokenizer, to render token-id prompts as chat text

    @property
    def url(self) -> str:
        root = self.base_url.rstrip("/")
        if root.endswith("/v1") and self.endpoint.startswith("/v1/"):
            root = root[:-3]
        return root + self.endpoint

    @property
    def chat(self) -> bool:
        return self.endpoint.endswith("/chat/completions")


def request_body(cfg: ClientConfig, req: BenchRequest) -> dict:
    body = {
        "model": cfg.model,
        "max_tokens": req.output_len,
        "stream": True,
        "temperature": 0.0,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension: every request makes exactly output_len tokens
    if cfg.chat:
        body["messages"] = [{"role": "user", "content": prompt_text(cfg, req)}]
    else:
        body["prompt"] = req.prompt_ids if req.prompt_ids is not None else req.prompt_text
    return body


def prompt_text(cfg: ClientConfig, req: BenchRequest) -> str:
    """Chat takes text: token ids are decoded with the tokenizer, or without one spelled as words, one per id.

    Random ids decode to text that re-encodes to more tokens (byte pieces merge differently), so the text is
    cut back to the target count and decoded again until it holds; the chat template still adds its few
    tokens."""
    if req.prompt_text is not None:
        return req.prompt_text
    tok = cfg.tokenizer
    if tok is None:
        return " ".join(f"w{t}" for t in req.prompt_ids)
    target, ids = len(req.prompt_ids), list(req.prompt_ids)
    for _ in range(4):
        text = tok.decode(ids, skip_special_tokens=True)
        ids = tok.encode(text, add_special_tokens=False).ids
        if len(ids) <= target:
            return text
        ids = ids[:target]
    return tok.decode(ids, skip_special_tokens=True)


class ServerUnusable(Exception):
    """The server cannot be benchmarked at all (unreachable, or no model to name): one line for the user."""


async def resolve_model(client: httpx.AsyncClient, cfg: ClientConfig) -> str:
    """The first model /v1/models lists, when --model was not given."""
    url = cfg.url[: -len(cfg.endpoint)] + "/v1/models"
    try:
        r = await client.get(url, headers=_headers(cfg))
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ServerUnusable(
            f"could not read the model name from {url} ({exc!r}); is the server up? (--model NAME skips this)"
        ) from None


def _headers(cfg: ClientConfig) -> dict:
    return {"authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


# ------------------------------------------------------------------------------------------------ one request


class _Stream:
    """What one SSE stream told us so far."""

    def __init__(self, started: float):
        self.started = started
        self.last_content: Optional[float] = None
        self.res = RequestResult(ok=False)
        self.chunks = 0
        self.done = False

    def content(self, now: float) -> None:
        if self.last_content is None:
            self.res.ttft = now - self.started
        else:
            self.res.itls.append(now - self.last_content)
        self.last_content = now
        self.chunks += 1

    def usage(self, usage: dict) -> None:
        self.res.output_tokens = int(usage.get("completion_tokens") or 0)
        self.res.prompt_tokens = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            self.res.cached_tokens = int(details["cached_tokens"])
        if isinstance(usage.get("pdserve_timings"), dict):
            self.res.timings = usage["pdserve_timings"]

    def event(self, data: str, now: float) -> Optional[str]:
        """Absorb one `data:` payload; returns an error message for an error event."""
        if data == "[DONE]":
            self.done = True
            return None
        obj = json.loads(data)
        if "error" in obj:
            err = obj["error"]
            return str(err.get("message", err) if isinstance(err, dict) else err)
        for choice in obj.get("choices") or []:
            text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            if text:
                self.content(now)
                break
        if obj.get("usage"):
            self.usage(obj["usage"])
        return None


async def send_one(
    client: httpx.AsyncClient, cfg: ClientConfig, req: BenchRequest, t0: float
) -> RequestResult:
    started = time.perf_counter()
    st = _Stream(started)
    try:
        async with client.stream("POST", cfg.url, json=request_body(cfg, req), headers=_headers(cfg)) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                return _failed(st, started, t0, f"http_{r.status_code}", body[:300])
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                error = st.event(line[5:].strip(), time.perf_counter())
                if error is not None:
                    return _failed(st, started, t0, "stream_error", error[:300])
                if st.done:
                    break
    except httpx.TimeoutException as exc:
        return _failed(st, started, t0, "timeout", repr(exc))
    except httpx.ConnectError as exc:
        return _failed(st, started, t0, "connect", repr(exc))
    except (httpx.TransportError, httpx.StreamError) as exc:
        return _failed(st, started, t0, "dropped", repr(exc))
    except (json.JSONDecodeError, ValueError, AttributeError) as exc:
        return _failed(st, started, t0, "bad_response", repr(exc))
    if not st.done:
        return _failed(st, started, t0, "incomplete", "the stream ended without [DONE]")
    res = st.res
    res.ok, res.sent_at, res.e2e = True, started - t0, time.perf_counter() - started
    if not res.output_tokens:
        res.output_tokens = st.chunks  # a server without usage: one token per content chunk
    if res.prompt_tokens is None and req.prompt_ids is not None:
        res.prompt_tokens = len(req.prompt_ids)
    return res


def _failed(st: _Stream, started: float, t0: float, kind: str, message: str) -> RequestResult:
    res = st.res
    res.ok, res.error_kind, res.error = False, kind, message
    res.sent_at, res.e2e = started - t0, time.perf_counter() - started
    return res


# ------------------------------------------------------------------------------------------------ a whole run


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds between consecutive sends: gamma(shape=burstiness, mean 1/rate); zeros for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]


@dataclass
class RunOutput:
    results: list[RequestResult]
    duration_s: float  # first send to last answer


async def run_requests(
    cfg: ClientConfig,
    requests: list[BenchRequest],
    rate: float,
    burstiness: float = 1.0,
    max_concurrency: Optional[int] = None,
    seed: int = 0,
    on_done: Callable[[RequestResult], None] = lambda r: None,
    drain_timeout_s: Optional[float] = None,
) -> RunOutput:
    """Send `requests` on their arrival schedule and wait for every answer, or, with drain_timeout_s, at most
    that long after the last arrival: requests still running then are cancelled and count as `unfinished` (an
    overloaded server would otherwise make one rate of a sweep take minutes)."""
    limits = httpx.Limits(
        max_connections=max_concurrency or None, max_keepalive_connections=max_concurrency or 100
    )
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    turn_done: dict[tuple[int, int], asyncio.Event] = {}  # (session, turn) -> finished
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        if not cfg.model:
            cfg.model = await resolve_model(client, cfg)
        t0 = time.perf_counter()

        async def one(req: BenchRequest) -> RequestResult:
            if req.session is not None and req.turn > 0:
                await turn_done[(req.session, req.turn - 1)].wait()
            try:
                if slots is None:
                    res = await send_one(client, cfg, req, t0)
                else:
                    async with slots:
                        res = await send_one(client, cfg, req, t0)
            finally:
                if req.session is not None:
                    turn_done[(req.session, req.turn)].set()
            on_done(res)
            return res

        for req in requests:
            if req.session is not None:
                turn_done[(req.session, req.turn)] = asyncio.Event()
        tasks, due = [], 0.0
        for req, gap in zip(requests, arrival_gaps(len(requests), rate, burstiness, seed), strict=False):
            due += (
                gap  # sleep to an absolute schedule, so the time spent starting tasks does not lower the rate
            )
            wait = due - (time.perf_counter() - t0)
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(req)))
        done, pending = await asyncio.wait(tasks, timeout=drain_timeout_s) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
        return RunOutput([_outcome(task) for task in tasks], duration)


def _outcome(task: asyncio.Task) -> RequestResult:
    if task.cancelled():
        return RequestResult(
            ok=False, error_kind="unfinished", error="still running when the drain timeout ended"
        )
    return task.result()
