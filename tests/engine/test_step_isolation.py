"""One request's failure inside an engine step fails only that request: its neighbours get their tokens, the
loop logs it with the request's id, and a step-wide failure is retried once before anything is aborted."""

from __future__ import annotations

import logging
import threading

import pytest

from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_core import EngineCore
from pdserve.engine.engine_loop import EngineLoop, Sink
from pdserve.wire.sampling_params import SamplingParams


@pytest.fixture
def core(model_dir):
    config = EngineConfig.create(model=model_dir, device="cpu", dtype="float32", block_size=16)
    return EngineCore(config)


def greedy(n: int = 6, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def test_out_of_vocabulary_ids_are_refused_at_add_request(core):
    vocab = core.runner.arch.vocab_size
    with pytest.raises(ValueError, match="stop_token_ids"):
        core.add_request("a", [5, 6, 7], greedy(min_tokens=1, stop_token_ids=[vocab + 10]))
    with pytest.raises(ValueError, match="prompt token id"):
        core.add_request("b", [5, vocab], greedy())
    assert not core.has_unfinished()


def test_a_request_whose_sampling_raises_fails_alone(core):
    vocab = core.runner.arch.vocab_size
    for rid in ("ok1", "bad", "ok2"):
        core.add_request(rid, [11, 12, 13, 14], greedy())
    # A poison that slipped past admission (as the min_tokens + out-of-range stop id did).
    core.scheduler.get_request("bad").sampling_params.stop_token_ids = [vocab + 4000]
    core.scheduler.get_request("bad").sampling_params.min_tokens = 1
    outputs = core.step()
    by_id = {o.request_id: o for o in outputs}
    assert by_id["bad"].finished and by_id["bad"].error and "IndexError" in by_id["bad"].error
    assert by_id["ok1"].new_token_ids and by_id["ok2"].new_token_ids and not by_id["ok1"].error
    assert core.scheduler.get_request("bad") is None
    while core.has_unfinished():
        core.step()
    assert core.block_pool.num_free + core.block_pool.num_cached == core.block_pool.num_blocks


def run_loop(core, prompts: dict[str, SamplingParams]) -> tuple[dict, dict]:
    loop = EngineLoop(core).start()
    tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
    failed: dict[str, str] = {}
    done = threading.Event()

    def finish_check():
        if all(rid in failed or (tokens[rid] and tokens[rid][-1] == -1) for rid in prompts):
            done.set()

    def sink(rid):
        def on_output(out):
            tokens[rid].extend(out.new_token_ids)
            if out.finished:
                tokens[rid].append(-1)
            finish_check()

        def on_fail(why):
            failed[rid] = why
            finish_check()

        return Sink(on_output=on_output, on_fail=on_fail)

    try:
        for rid, params in prompts.items():
            loop.add_request(rid, [20, 21, 22, 23, 24], params, sink(rid)).result(10)
        assert done.wait(60), (tokens, failed)
    finally:
        loop.stop()
    return tokens, failed


def test_a_step_wide_failure_is_retried_once_and_logged_with_the_batch(core, caplog):
    real = core.runner.execute
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("transient forward failure")
        return real(*args, **kwargs)

    core.runner.execute = flaky
    with caplog.at_level(logging.ERROR, logger="pdserve.engine.engine_loop"):
        tokens, failed = run_loop(core, {"r1": greedy(4), "r2": greedy(4)})
    assert not failed
    assert all(len(t) == 5 for t in tokens.values())  # 4 tokens, then the finished marker
    assert any(
        "r1" in rec.getMessage() and "r2" in rec.getMessage() and "attempt 1" in rec.getMessage()
        for rec in caplog.records
    )
    assert not any("aborting every in-flight request" in rec.getMessage() for rec in caplog.records)


def test_a_step_that_fails_twice_aborts_the_batch_and_the_loop_goes_on(core):
    real = core.runner.execute
    calls = {"n": 0}

    def broken_twice(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (1, 2):
            raise RuntimeError("forward failure")
        return real(*args, **kwargs)

    core.runner.execute = broken_twice
    tokens, failed = run_loop(core, {"r1": greedy(3)})
    assert set(failed) == {"r1"}
    calls["n"] = 10
    tokens, failed = run_loop(core, {"r2": greedy(3)})
    assert not failed and len(tokens["r2"]) == 4
