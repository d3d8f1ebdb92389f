"""Scheduler driven by a fake model, pure Python.

The fake model keeps a paged "KV cache" of token ids: each step writes the scheduled tokens into the slots of
their block table, and a sampling request's next token is a function of the context READ BACK FROM THOSE
SLOTS. So any wrong block table, wrong prefix hit or lost block after preemption changes the output, and every
test compares outputs with a reference computed straight from the token sequence.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.scheduler import RequestTooLargeError, Scheduler
from pdserve.wire.errors import PromptTooLongError
from pdserve.wire.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

BS = 4
VOCAB = 1000


def next_token(context: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(context)) * 31 + len(context)) % VOCAB


def params(max_tokens=5, ignore_eos=False, stop_token_ids=(), min_tokens=0):
    return SimpleNamespace(
        max_tokens=max_tokens,
        ignore_eos=ignore_eos,
        stop_token_ids=list(stop_token_ids),
        min_tokens=min_tokens,
    )


def reference(prompt, p, eos=frozenset(), max_model_len=10**9) -> list[int]:
    seq, out = list(prompt), []
    while True:
        tok = next_token(seq)
        seq.append(tok)
        out.append(tok)
        stop_ok = len(out) >= p.min_tokens
        if stop_ok and ((tok in eos and not p.ignore_eos) or tok in p.stop_token_ids):
            return out
        if len(out) >= p.max_tokens or len(seq) >= max_model_len:
            return out


class FakeModel:
    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.slots: dict[int, int] = {}
        self.steps: list = []

    def step(self, out) -> dict[str, int]:
        self.steps.append(out)
        s = self.sched
        assert out.num_scheduled_tokens == sum(x.num_new_tokens for x in out.scheduled)
        assert 0 < out.num_scheduled_tokens <= s.max_num_batched_tokens
        assert len(out.scheduled) <= s.max_num_seqs
        assert all(x.is_decode for x in out.decodes) and not any(x.is_decode for x in out.prefills)
        sampled = {}
        for x in out.scheduled:
            assert len(x.block_ids) * BS >= x.seq_len
            for k, tok in enumerate(x.token_ids):
                pos = x.num_computed_tokens + k
                self.slots[x.block_ids[pos // BS] * BS + pos % BS] = tok
            if x.samples:
                context = [self.slots[x.block_ids[p // BS] * BS + p % BS] for p in range(x.seq_len)]
                sampled[x.request_id] = next_token(context)
        return sampled


def make(num_blocks=64, budget=64, max_seqs=16, eos=(), max_model_len=256, emit_events=False, caching=True):
    pool = BlockPool(num_blocks, enable_caching=caching, block_size=BS, emit_events=emit_events)
    kv = KVCacheManager(pool, BS, max_model_len)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    sched = Scheduler(cfg, kv, max_model_len, eos_token_ids=eos)
    return sched, FakeModel(sched)


def add(sched, rid, prompt, p=None):
    r = Request(rid, list(prompt), p or params())  # block size comes from the cache
    sched.add_request(r)
    return r


def drive(sched, model, max_steps=5000, between=None) -> dict[str, Request]:
    finished = {}
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return finished
        out = sched.schedule()
        if between:
            between(out)
        for r in sched.update_from_output(out, model.step(out)):
            finished[r.request_id] = r
        sched.kv.pool.check_invariants()
    raise AssertionError("scheduler did not finish")


def prompt_of(n, seed=0):
    return [(seed * 7919 + i * 13) % VOCAB for i in range(n)]


@pytest.mark.parametrize("budget", [1, 7, 64])
def test_chunked_prefill_schedules_exactly_the_prompt_then_decodes(budget):
    sched, model = make(budget=budget)
    p = params(max_tokens=6, ignore_eos=True)
    r = add(sched, "a", prompt_of(37), p)
    done = drive(sched, model)
    assert done["a"].output_token_ids == reference(r.prompt_token_ids, p)
    sizes = [out.scheduled[0].num_new_tokens for out in model.steps]
    n_prefill = -(-37 // budget)
    assert sizes[:n_prefill] == [min(budget, 37 - i * budget) for i in range(n_prefill)]
    assert sum(sizes[:n_prefill]) == 37
    assert [out.scheduled[0].samples for out in model.steps[:n_prefill]] == [False] * (n_prefill - 1) + [True]
    assert sizes[n_prefill:] == [1] * 5 and all(o.scheduled[0].is_decode for o in model.steps[n_prefill:])
    assert sched.kv.pool.num_used == 0


def test_mixed_steps_put_decodes_first_within_budget():
    sched, model = make(budget=8)
    pa, pb = params(max_tokens=10), params(max_tokens=3)
    add(sched, "a", prompt_of(3), pa)
    add(sched, "b", prompt_of(30, 1), pb)
    done = drive(sched, model)
    mixed = [o for o in model.steps if o.num_decodes and o.prefills]
    assert mixed and all(o.scheduled[0].request_id == "a" for o in mixed)
    assert done["a"].output_token_ids == reference(prompt_of(3), pa)
    assert done["b"].output_token_ids == reference(prompt_of(30, 1), pb)


def test_prefix_hits_are_counted_and_give_identical_output():
    sched, model = make()
    shared = prompt_of(13)  # 3 full blocks
    p = params(max_tokens=4)
    add(sched, "a", shared + [5, 6], p)
    drive(sched, model)
    b = add(sched, "b", shared + [7, 8, 9], p)
    done = drive(sched, model)
    assert b.num_cached_tokens == 12
    assert sched.kv.pool.stats.hit_tokens == 12 and sched.kv.pool.stats.requests == 2
    assert done["b"].output_token_ids == reference(shared + [7, 8, 9], p)
    assert sched.make_stats().prefix_cache_hit_tokens == 12


def test_preemption_with_a_tiny_cache_still_finishes_everything():
    sched, model = make(num_blocks=10, budget=16)
    p = params(max_tokens=14, ignore_eos=True)
    prompts = {f"r{i}": prompt_of(10, i) for i in range(4)}
    for rid, prompt in prompts.items():
        add(sched, rid, prompt, p)
    done = drive(sched, model)
    assert sched.num_preemptions > 0
    assert sum(r.num_preemptions for r in done.values()) == sched.num_preemptions
    assert any(o.preempted_request_ids for o in model.steps)
    for rid, prompt in prompts.items():
        assert done[rid].output_token_ids == reference(prompt, p), rid
    pool = sched.kv.pool
    assert pool.num_used == 0 and pool.num_free + pool.num_cached == pool.num_blocks


def test_preemption_takes_the_youngest():
    sched, model = make(num_blocks=6, budget=64)
    p = params(max_tokens=12, ignore_eos=True)
    add(sched, "old", prompt_of(8), p)
    add(sched, "young", prompt_of(8, 3), p)
    first_preempted = None
    for _ in range(50):
        out = sched.schedule()
        if out.preempted_request_ids:
            first_preempted = out.preempted_request_ids[0]
            break
        sched.update_from_output(out, model.step(out))
    assert first_preempted == "young"
    assert sched.waiting[0].request_id == "young" and sched.waiting[0].status == RequestStatus.PREEMPTED


def test_abort_frees_everything_in_any_state():
    sched, model = make(num_blocks=12, budget=8)
    for i in range(4):
        add(sched, f"r{i}", prompt_of(10, i), params(max_tokens=20))
    out = sched.schedule()
    sched.update_from_output(out, model.step(out))
    out = sched.schedule()  # r0 running, others mid-prefill or waiting
    assert sched.abort_request("r0").finish_reason == "abort"
    assert sched.abort_request("r3").status == RequestStatus.FINISHED_ABORTED
    assert sched.abort_request("r3") is None and sched.abort_request("nope") is None
    finished = sched.update_from_output(out, model.step(out))  # r0's result is ignored
    assert "r0" not in {r.request_id for r in finished}
    assert set(sched.schedule().finished_request_ids) == {"r0", "r3"}
    for rid in list(sched.requests):
        sched.abort_request(rid)
    pool = sched.kv.pool
    pool.check_invariants()
    assert not sched.has_unfinished() and pool.num_used == 0 and not sched.running and not sched.waiting


def test_stop_conditions():
    first = next_token(prompt_of(6))  # eos fires on the very first token
    sched, model = make(eos=[first], max_model_len=40)
    add(sched, "eos", prompt_of(6), params(max_tokens=5))
    add(sched, "ign", prompt_of(6), params(max_tokens=5, ignore_eos=True))
    add(sched, "stop", prompt_of(6), params(max_tokens=5, ignore_eos=True, stop_token_ids=[first]))
    add(sched, "min", prompt_of(6), params(max_tokens=5, stop_token_ids=[first], min_tokens=2))
    done = drive(sched, model)
    assert done["eos"].output_token_ids == [first] and done["eos"].finish_reason == "stop"
    assert len(done["ign"].output_token_ids) == 5 and done["ign"].finish_reason == "length"
    assert done["stop"].stop_reason == first and done["stop"].finish_reason == "stop"
    assert len(done["min"].output_token_ids) > 1
    add(sched, "mml", prompt_of(30), params(max_tokens=None))
    assert drive(sched, model)["mml"].num_tokens == 40


def test_finish_request_from_the_detokenizer():
    sched, model = make()
    add(sched, "a", prompt_of(5), params(max_tokens=50))
    out = sched.schedule()
    sched.update_from_output(out, model.step(out))
    r = sched.finish_request("a", "stop")
    assert r.finish_reason == "stop" and not sched.has_unfinished() and sched.kv.pool.num_used == 0


def test_rejections():
    sched, _ = make(num_blocks=4, max_model_len=32)
    with pytest.raises(PromptTooLongError):
        add(sched, "long", prompt_of(30), params(max_tokens=5))
    with pytest.raises(RequestTooLargeError):  # fits max_model_len, never fits 4 blocks of 4
        add(sched, "big", prompt_of(10), params(max_tokens=10))
    with pytest.raises(ValueError):
        add(sched, "empty", [], params())
    add(sched, "ok", prompt_of(4), params())
    with pytest.raises(ValueError):
        add(sched, "ok", prompt_of(4), params())
    assert sched.get_num_unfinished() == 1


def test_kv_events_are_consistent():
    sched, model = make(num_blocks=12, budget=7, emit_events=True)
    p = params(max_tokens=9, ignore_eos=True)
    for i in range(3):
        add(sched, f"r{i}", prompt_of(11 + i, i % 2), p)
    index: set[int] = set()

    def replay(_out):
        for ev in sched.kv.take_events():
            if isinstance(ev, BlockStored):
                assert len(ev.token_ids) == ev.block_size * len(ev.block_hashes) and ev.block_size == BS
                index.update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                assert set(ev.block_hashes) <= index
                index.difference_update(ev.block_hashes)
            else:
                assert isinstance(ev, AllBlocksCleared)
                index.clear()

    drive(sched, model, between=replay)
    replay(None)
    assert index and len(index) == sched.kv.pool.num_cached


@settings(max_examples=40, deadline=None)
@given(
    num_blocks=st.integers(8, 24),
    budget=st.integers(1, 24),
    max_seqs=st.integers(1, 4),
    reqs=st.lists(
        st.tuples(st.integers(1, 14), st.integers(1, 8), st.integers(0, 2)), min_size=1, max_size=6
    ),
    abort_at=st.integers(0, 30),
)
def test_random_workloads_finish_with_reference_outputs(num_blocks, budget, max_seqs, reqs, abort_at):
    sched, model = make(num_blocks=num_blocks, budget=budget, max_seqs=max_seqs)
    expected, step = {}, [0]
    for i, (plen, max_tokens, seed) in enumerate(reqs):
        prompt = prompt_of(plen, seed)  # shared seeds give shared prefixes
        p = params(max_tokens=max_tokens, ignore_eos=True)
        try:
            add(sched, f"r{i}", prompt, p)
        except RequestTooLargeError:
            continue
        expected[f"r{i}"] = reference(prompt, p)

    def maybe_abort(_out):
        step[0] += 1
        if step[0] == abort_at and "r0" in sched.requests:
            sched.abort_request("r0")
            expected.pop("r0")

    done = drive(sched, model, between=maybe_abort)
    assert {rid: r.output_token_ids for rid, r in done.items()} == expected
    assert sched.kv.pool.num_used == 0
