"""Serving one OpenAI request: start its choices on the nodes, relay them as JSON or SSE, abort on disconnect.

Steps for both endpoints:
 1. start every choice (prompt i, sample j) on the nodes, and wait for each one's first message, so that a
    failure to start (no node, queue full, bad request on the node) is still an HTTP error with the right
    status;
 2. relay: plain JSON after every choice finished, or SSE chunks as tokens arrive;
 3. end: usage (cached tokens included), timings in the `x-pdserve-timings` header or the final chunk's usage.
A client that disconnects (while waiting, or mid-stream) gets every unfinished choice aborted on its decode
node. An error after the stream started is sent as an SSE `{"error": ...}` event, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pdserve.proxy.choice import ChoiceState, Delta, chat_logprobs, completion_logprobs
from pdserve.proxy.client import ClientGone, JobStream, until_disconnect
from pdserve.proxy.dispatch import Dispatcher
from pdserve.proxy.errors import APIError
from pdserve.proxy.metrics import ProxyMetrics
from pdserve.proxy.prompt_logprobs import echo_logprobs, echo_text_length, vllm_prompt_logprobs
from pdserve.proxy.protocol import GenerationRequest
from pdserve.wire.detokenizer import IncrementalDetokenizer
from pdserve.wire.node_messages import TIMING_KEYS
from pdserve.wire.vllm_metrics import FinishedRequest

log = logging.getLogger(__name__)


@dataclass
class Served:
    """What a handler needs from the app."""

    dispatcher: Dispatcher
    tokenizer: object
    metrics: ProxyMetrics
    model_name: str
    request_timeout_s: float


class RequestJob:
    def __init__(self, served: Served, req: GenerationRequest, endpoint: str):
        self.s = served
        self.req = req
        self.endpoint = endpoint
        self.arrival = time.monotonic()
        self.created = int(time.time())
        prefix = "chatcmpl" if req.kind == "chat" else "cmpl"
        self.node_id = (
            f"{prefix}-{uuid.uuid4().hex}"  # node request ids stay unique whatever the client sends
        )
        self.id = f"{prefix}-{req.response_id}" if req.response_id else self.node_id
        self.choices: list[ChoiceState] = []
        self.first_items: list = []
        self.recorded = False
        self.last_token_at: dict[int, float] = {}  # choice index -> when its last tokens arrived (ITL)
        self.counted: set[int] = set()  # choices already in the vllm:* per-request series
        self.tasks: list[asyncio.Task] = []  # a stream's per-choice relays
        self.echo_offsets: dict[int, int] = {}  # stream, echo + logprobs: where generated text offsets start

    # ---- 1. start ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        req, n = self.req, self.req.params.n
        deadline = self.arrival + self.s.request_timeout_s
        specs = [(i, j) for i in range(len(req.prompts)) for j in range(n)]

        # Each choice is registered before its Generate goes out, so a cancellation at any point can abort it.
        for k, (i, j) in enumerate(specs):
            run = self.s.dispatcher.new_run(
                f"{self.node_id}-{k}", req.prompts[i], req.choice_params(j), deadline
            )
            detok = IncrementalDetokenizer(
                self.s.tokenizer,
                req.prompts[i],
                req.params.skip_special_tokens,
                req.params.stop,
                req.params.include_stop_str_in_output,
            )
            self.choices.append(ChoiceState(k, run, detok, req.logprobs is not None))
        results = await asyncio.gather(*(c.run.send_first() for c in self.choices), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self.abort_all("start_failed")
            raise failed[0]
        firsts = await asyncio.gather(*(c.run.next() for c in self.choices), return_exceptions=True)
        failed = [r for r in firsts if isinstance(r, BaseException)]
        if failed:
            self.abort_all("start_failed")
            raise failed[0]
        self.first_items = list(firsts)

    def echo_text(self, c: ChoiceState) -> str:
        """echo: a completion choice starts with its prompt's text (decoded when the prompt came as ids)."""
        if not self.req.echo:
            return ""
        i = c.index // self.req.params.n
        text = self.req.prompt_texts[i] if i < len(self.req.prompt_texts) else None
        return text if text is not None else self.s.tokenizer.decode(self.req.prompts[i])

    def prompt_records(self, c: ChoiceState) -> tuple[list[int], list]:
        """c's prompt and its prompt logprob records (sample 0 of each prompt computed them for all)."""
        n = self.req.params.n
        i = c.index // n
        return self.req.prompts[i], self.choices[i * n].run.prompt_records.entries

    def prompt_logprobs(self, c: ChoiceState) -> list:
        prompt, entries = self.prompt_records(c)
        return vllm_prompt_logprobs(self.s.tokenizer, prompt, entries, self.req.prompt_logprobs)

    def echo_logprobs(self, c: ChoiceState, final: bool) -> dict:
        """echo with logprobs: the prompt's tokens first, then (final) the generated ones."""
        prompt, entries = self.prompt_records(c)
        ids, generated = (c.token_ids, c.logprobs) if final else ([], [])
        return echo_logprobs(self.s.tokenizer, prompt, entries, ids, generated)

    def abort_all(self, reason: str) -> None:
        for c in self.choices:
            c.run.abort(reason)

    def _absorb(self, c: ChoiceState, msg) -> Delta:
        delta = c.absorb(msg)
        vllm, n = self.s.metrics.vllm, len(delta.token_ids)
        if n:
            now = time.monotonic()
            if c.run.first_token_at is not None and len(c.token_ids) == n:
                self.s.metrics.ttft.observe(c.run.first_token_at - self.arrival)
                vllm.first_token(c.run.first_token_at - self.arrival)
                vllm.generation_tokens.inc(n)
            elif c.index in self.last_token_at:
                vllm.tokens_arrived(now - self.last_token_at[c.index], n)
            self.last_token_at[c.index] = now
        if delta.finish_reason is not None:
            self._count_choice(c, delta.finish_reason)
        return delta

    def _count_choice(self, c: ChoiceState, finish_reason: str) -> None:
        """One choice ended: one request in vLLM's per-request series (n > 1 runs n requests there too)."""
        if c.index in self.counted:
            return
        self.counted.add(c.index)
        timings = c.timings or {}
        self.s.metrics.node_timings(timings)
        self.s.metrics.vllm.finished(
            FinishedRequest(
                arrival=self.arrival,
                finished=time.monotonic(),
                finish_reason=finish_reason,
                prompt_tokens=len(self.req.prompts[c.index // self.req.params.n]),
                generation_tokens=len(c.token_ids),
                scheduled=self.arrival + float(timings.get("prefill_queue", 0.0)),
                first_token=c.run.first_token_at,
                max_tokens=self.req.params.max_tokens,
            )
        )

    # ---- 3. usage and timings ------------------------------------------------------------------------------
    def usage(self) -> dict:
        n = self.req.params.n
        prompt_tokens = sum(len(p) for p in self.req.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        cached = sum(
            self.choices[i * n].num_cached_tokens
            for i in range(len(self.req.prompts))
            if i * n < len(self.choices)
        )
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def timings(self) -> dict:
        first = self.choices[0] if self.choices else None
        t = {k: 0.0 for k in TIMING_KEYS}
        if first is not None and first.timings:
            t.update({k: float(v) for k, v in first.timings.items() if k in TIMING_KEYS})
        firsts = [c.run.first_token_at for c in self.choices if c.run.first_token_at is not None]
        t["ttft"] = (min(firsts) - self.arrival) if firsts else 0.0
        t["total"] = time.monotonic() - self.arrival
        return {k: round(v, 6) for k, v in t.items()}

    def route_header(self) -> str:
        return ",".join(c.run.route_label for c in self.choices)

    def close(self) -> None:
        """The stream is over however it ended: abort what is unfinished, count the request once."""
        for t in self.tasks:
            t.cancel()
        if any(not c.run.ended for c in self.choices):
            self.abort_all("client_gone")
        if not self.recorded:
            self.record(499)

    def record(self, status: int) -> None:
        if self.recorded:
            return
        self.recorded = True
        m = self.s.metrics
        m.requests.labels(self.endpoint, str(status)).inc()
        m.request_seconds.labels(self.endpoint).observe(time.monotonic() - self.arrival)
        usage = self.usage()
        m.prompt_tokens.inc(usage["prompt_tokens"])
        m.cached_tokens.inc(usage["prompt_tokens_details"]["cached_tokens"])
        m.generation_tokens.inc(usage["completion_tokens"])
        m.vllm.prompt_tokens.inc(usage["prompt_tokens"])
        m.prefix_queries += usage["prompt_tokens"]
        m.prefix_hits += usage["prompt_tokens_details"]["cached_tokens"]
        if status == 200 and m.planner is not None:  # the traffic the planner's wish follows
            m.planner.record(usage["prompt_tokens"], usage["completion_tokens"])
        for c in self.choices:  # those that never finished (an error, the client gone) ended as aborts
            self._count_choice(c, "abort")
        if self.choices:
            m.vllm.request_group(self.req.params.n, max(len(c.token_ids) for c in self.choices))

    # ---- 2a. plain JSON ------------------------------------------------------------------------------------
    async def collect(self) -> dict:
        async def drive(c: ChoiceState, first) -> None:
            msg = first
            while True:
                self._absorb(c, msg)
                if c.done:
                    return
                msg = await c.run.next()

        results = await asyncio.gather(
            *(drive(c, f) for c, f in zip(self.choices, self.first_items, strict=False)),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self.abort_all("error")
            raise failed[0]
        return self.response_body()

    def response_body(self) -> dict:
        tok = self.s.tokenizer
        choices = []
        for c in self.choices:
            if self.req.kind == "chat":
                lp = chat_logprobs(tok, c.token_ids, c.logprobs) if self.req.logprobs is not None else None
                choices.append(
                    {
                        "index": c.index,
                        "message": {"role": "assistant", "content": self.req.chat_echo + c.text},
                        "logprobs": lp,
                        "finish_reason": c.finish_reason,
                    }
                )
            else:
                lp = None
                if self.req.logprobs is not None:
                    lp = (
                        self.echo_logprobs(c, final=True)
                        if self.req.echo
                        else completion_logprobs(tok, c.token_ids, c.logprobs, 0)
                    )
                text = self.echo_text(c) + c.text
                choices.append(
                    {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}
                )
                if self.req.prompt_logprobs is not None:
                    choices[-1]["prompt_logprobs"] = self.prompt_logprobs(c)
        if self.req.return_token_ids:
            n = self.req.params.n
            for c, choice in zip(self.choices, choices, strict=False):
                choice["token_ids"] = list(c.token_ids)
                choice["prompt_token_ids"] = self.req.prompts[c.index // n]
        obj = "chat.completion" if self.req.kind == "chat" else "text_completion"
        body = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.s.model_name,
            "choices": choices,
            "usage": self.usage(),
        }
        if self.req.kind == "chat" and self.req.prompt_logprobs is not None:
            body["prompt_logprobs"] = self.prompt_logprobs(self.choices[0])  # vLLM's place: one chat prompt
        return body

    # ---- 2b. server-sent events ----------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], usage: Optional[dict] = None) -> str:
        obj = "chat.completion.chunk" if self.req.kind == "chat" else "text_completion"
        body = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.s.model_name,
            "choices": choices,
        }
        if usage is None and self.req.continuous_usage and choices:
            usage = self.usage()  # the counts so far, on every chunk
        if usage is not None or self.req.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _delta_choice(self, c: ChoiceState, d: Delta, text_offset: int) -> Optional[dict]:
        lp_wanted = self.req.logprobs is not None and d.token_ids
        ids_wanted = self.req.return_token_ids and d.token_ids
        if not d.text and not lp_wanted and not ids_wanted and d.finish_reason is None:
            return None
        choice = self._delta_body(c, d, text_offset, lp_wanted)
        if self.req.return_token_ids:
            choice["token_ids"] = list(d.token_ids)
        return choice

    def _delta_body(self, c: ChoiceState, d: Delta, text_offset: int, lp_wanted) -> dict:
        tok = self.s.tokenizer
        if self.req.kind == "chat":
            lp = chat_logprobs(tok, d.token_ids, d.logprobs) if lp_wanted else None
            delta = {"content": d.text} if d.text or d.finish_reason is None else {}
            return {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
        text_offset += self.echo_offsets.get(c.index, 0)
        lp = completion_logprobs(tok, d.token_ids, d.logprobs, text_offset) if lp_wanted else None
        return {"index": c.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}

    async def stream(self) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def drive(c: ChoiceState, first) -> None:
            try:
                msg = first
                while True:
                    offset = c.text_len
                    d = self._absorb(c, msg)
                    queue.put_nowait((c, d, offset))
                    if c.done:
                        return
                    msg = await c.run.next()
            except APIError as exc:
                queue.put_nowait(exc)
            except Exception as exc:  # noqa: BLE001 - a bug must still end the stream, not hang it
                log.exception("stream %s failed", self.id)
                queue.put_nowait(APIError(500, f"internal error: {exc}"))

        tasks = [
            asyncio.create_task(drive(c, f)) for c, f in zip(self.choices, self.first_items, strict=False)
        ]
        self.tasks = tasks
        status, finished = 200, False
        try:
            if self.req.kind == "chat":
                yield self._chunk(
                    [
                        {
                            "index": c.index,
                            "delta": {"role": "assistant", "content": self.req.chat_echo},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for c in self.choices
                    ]
                )
            elif self.req.echo:
                yield self._chunk([self._echo_choice(c) for c in self.choices])
            remaining = len(self.choices)
            while remaining:
                item = await queue.get()
                if isinstance(item, APIError):
                    status = item.status
                    self.abort_all("error")
                    yield f"data: {json.dumps(item.body())}\n\n"
                    break
                c, d, offset = item
                choice = self._delta_choice(c, d, offset)
                if (
                    d.finish_reason is not None
                ):  # this delta ended it (c.done may already be true for an earlier one)
                    remaining -= 1
                last = remaining == 0
                if choice is not None:
                    # Without include_usage, the last chunk still carries usage with the timings extension.
                    usage = self._final_usage() if last and not self.req.include_usage else None
                    yield self._chunk([choice], usage)
            if status == 200 and self.req.include_usage:
                yield self._chunk([], self._final_usage())
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            for t in tasks:
                t.cancel()
            if not finished:
                status = 499
                self.abort_all("client_gone")
            self.record(status)

    def _echo_choice(self, c: ChoiceState) -> dict:
        """A stream's first completion chunk under echo: the prompt's text (with logprobs, its tokens')."""
        lp = None
        if self.req.logprobs is not None:
            lp = self.echo_logprobs(c, final=False)
            self.echo_offsets[c.index] = echo_text_length(self.s.tokenizer, self.prompt_records(c)[0])
        return {"index": c.index, "text": self.echo_text(c), "logprobs": lp, "finish_reason": None}

    def _final_usage(self) -> dict:
        usage = self.usage()
        usage["pdserve_timings"] = self.timings()
        return usage


async def serve(
    served: Served, request: Request, req: GenerationRequest, endpoint: str, on_end=lambda: None
) -> Response:
    """Serve one request; `on_end` runs exactly once, when the response (or stream) is over."""
    job = RequestJob(served, req, endpoint)
    streaming = False
    try:
        if req.stream:
            await until_disconnect(request, job.start(), on_gone=lambda: job.abort_all("client_gone"))
            headers = {"x-pdserve-route": job.route_header(), "cache-control": "no-cache"}
            streaming = True
            return JobStream(
                job.stream(), lambda: (job.close(), on_end()), media_type="text/event-stream", headers=headers
            )
        body = await until_disconnect(
            request, _start_and_collect(job), on_gone=lambda: job.abort_all("client_gone")
        )
    except ClientGone:
        job.abort_all("client_gone")
        job.record(499)
        return Response(status_code=499)
    except APIError as exc:
        job.abort_all("error")
        job.record(exc.status)
        raise
    except BaseException:
        job.abort_all("error")
        raise
    finally:
        if not streaming:
            on_end()
    job.record(200)
    headers = {
        "x-pdserve-timings": json.dumps(job.timings(), separators=(",", ":")),
        "x-pdserve-route": job.route_header(),
    }
    return JSONResponse(body, headers=headers)


async def _start_and_collect(job: RequestJob) -> dict:
    await job.start()
    return await job.collect()
