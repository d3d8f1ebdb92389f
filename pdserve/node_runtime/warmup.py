"""Warm a node before it says it is ready: run the shapes it will serve once, so no client pays for
compilation.

Decode CUDA graphs are captured when the runner starts, but a Triton kernel compiles once per new set of
constexpr arguments, and the paths a first real request meets (chunked prefill of a full chunk, prefill over
cached prefix blocks, the sampler's greedy / temperature / top-p / top-k / seeded / logprobs branches, a
decode batch of several) each compiled on first use: the first requests after /health turned 200 took seconds.
`warm_up` sends such requests through the engine loop and waits for them before the node binds its RPC socket
and HTTP port, so neither a proxy (heartbeats) nor a probe (/health) sees the node before it is warm.

Afterwards the prefix cache is reset (the warm-up prompts would otherwise sit in it, unknown to the proxies'
index) and its KV events are dropped. Every block returns to the free pool; a test checks that.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time

from pdserve.engine.engine_loop import Sink
from pdserve.wire.sampling_params import SamplingParams

log = logging.getLogger(__name__)

WARMUP_PREFIX = "pdserve-warmup-"


def warmup_requests(max_model_len: int, max_batched_tokens: int, block_size: int, vocab_size: int) -> list:
    """[(prompt ids, params)]: one full prefill chunk, a short prompt and its prefix hit, and a decode batch
    that uses every sampler branch."""
    vocab = max(int(vocab_size or 0), 2)

    def prompt(n: int, salt: int) -> list[int]:
        return [(salt * 7919 + i * 31) % vocab for i in range(max(n, 1))]

    out_tokens = 4
    long_len = max(min(max_batched_tokens, max_model_len - out_tokens - 1), 1)
    short_len = max(min(block_size * 2 + 3, max_model_len - out_tokens - 1), 1)
    greedy = dict(temperature=0.0, max_tokens=out_tokens, ignore_eos=True)
    reqs = [
        (prompt(long_len, 1), greedy),
        (prompt(short_len, 2), greedy),
        (prompt(short_len, 2) + prompt(3, 3), greedy),  # a prefix hit: chunked prefill over cached blocks
        (prompt(short_len, 4), dict(greedy, temperature=0.8, top_p=0.9, top_k=20, seed=1)),
        (prompt(short_len, 5), dict(greedy, temperature=1.0, logprobs=5)),
        (prompt(short_len, 6), dict(greedy, temperature=0.7)),
    ]
    return [
        (p[: max_model_len - out_tokens - 1] or [0], SamplingParams.from_dict(params)) for p, params in reqs
    ]


def warm_up(loop, core, timeout_s: float = 600.0) -> float:
    """Run the warm-up requests to completion on a running engine loop; returns the seconds it took."""
    started = time.perf_counter()
    runner, sched = core.runner, core.scheduler
    reqs = warmup_requests(
        sched.max_model_len,
        sched.max_num_batched_tokens,
        core.block_pool.block_size,
        getattr(runner.arch, "vocab_size", 0),
    )
    # The first two alone (the long chunk, then the prefix-hit pair's first half), then the rest as one batch.
    for group in (reqs[:1], reqs[1:2], reqs[2:]):
        _run_group(loop, group, started + timeout_s)
    loop.call(_forget, core).result(timeout=60)
    seconds = time.perf_counter() - started
    log.info("warm-up: %d requests in %.2f s", len(reqs), seconds)
    return seconds


def _run_group(loop, group: list, deadline: float) -> None:
    done = [threading.Event() for _ in group]
    failures: list[str] = []
    ids = []
    for i, (prompt, params) in enumerate(group):
        rid = f"{WARMUP_PREFIX}{time.monotonic_ns()}-{i}"
        ids.append(rid)
        event = done[i]

        def on_output(out, event=event):
            if out.finished:
                event.set()

        def on_fail(why, event=event):
            failures.append(why)
            event.set()

        future = loop.add_request(rid, prompt, params, Sink(on_output=on_output, on_fail=on_fail))
        try:
            future.result(timeout=max(deadline - time.perf_counter(), 1.0))
        except (concurrent.futures.TimeoutError, Exception) as exc:  # noqa: BLE001 - warm-up must not stop a node
            failures.append(f"{type(exc).__name__}: {exc}")
            event.set()
    for event, rid in zip(done, ids, strict=True):
        if not event.wait(max(deadline - time.perf_counter(), 0.0)):
            failures.append(f"{rid} did not finish in time")
            loop.abort(rid)
    if failures:
        log.warning("warm-up: %s", "; ".join(failures))


def _forget(core) -> None:
    """Loop thread: drop the warm-up prompts from the prefix cache and their events, unpublished."""
    core.block_pool.reset_prefix_cache()
    core.block_pool.take_events()
