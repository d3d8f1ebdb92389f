"""The connector's scheduler side in isolation: which blocks go when, timeouts, exactly-once finishing."""

import pytest

from pdserve.kvconnector.scheduler_side import ConsumerScheduler, ProducerScheduler


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plan_sends_each_final_block_once_skipping_the_consumers_prefix():
    s = ProducerScheduler(block_size=4, timeout=1.0, clock=Clock())
    s.bind(
        "r", "peer", num_tokens=18, remote_block_ids=[50, 51, 52], num_cached=2
    )  # 5 blocks, the last partial
    table = [10, 11, 12, 13, 14]
    assert s.plan("r", 6, table, False) is None  # blocks 0-1 are the consumer's own
    p = s.plan("r", 13, table, False)
    assert (p.local_block_ids, p.remote_block_ids, p.last) == ([12], [50], False)
    assert s.plan("r", 15, table, False) is None  # block 3 not full yet
    p = s.plan("r", 18, table, True)
    assert (p.local_block_ids, p.remote_block_ids, p.last) == ([13, 14], [51, 52], True)
    assert s.plan("r", 18, table, True) is None


def test_a_reservation_that_does_not_cover_the_prompt_is_refused():
    s = ProducerScheduler(block_size=4, clock=Clock())
    with pytest.raises(ValueError, match="needs 3"):
        s.bind("r", "p", num_tokens=9, remote_block_ids=[1], num_cached=0)
    assert s.active() == [] and s.abort("r") is None
    s.bind("r", "p", num_tokens=9, remote_block_ids=[1, 2, 3], num_cached=0)
    with pytest.raises(ValueError, match="already transferring"):
        s.bind("r", "p", num_tokens=9, remote_block_ids=[1, 2, 3], num_cached=0)


def test_done_then_abort_finishes_exactly_once():
    s = ProducerScheduler(block_size=4, clock=Clock())
    s.bind("r", "p", 4, [7], 0)
    assert s.done("r") is None  # nothing planned yet: a stray completion cannot finish it
    s.plan("r", 4, [3], True)
    f = s.done("r")
    assert f.ok and f.timings["done"] >= f.timings["bound"] and f.timings["blocks"] == 1
    assert s.abort("r") is None and s.expire() == [] and s.done("r") is None


def test_inactivity_timeout_and_progress():
    clock = Clock()
    s = ProducerScheduler(block_size=4, timeout=1.0, clock=clock)
    s.bind("a", "p", 8, [1, 2], 0)
    s.bind("b", "q", 8, [1, 2], 0)
    clock.t = 0.8
    s.progress("a")
    clock.t = 1.2
    assert [f.request_id for f in s.expire()] == ["b"]
    clock.t = 1.9
    assert [(f.request_id, f.cause) for f in s.expire()] == [("a", "timeout")]
    s.bind("c", "p", 8, [1, 2], 0)
    assert [f.request_id for f in s.peer_lost("p")] == ["c"]


def test_consumer_completes_on_done_once_every_layer_of_every_block_landed():
    c = ConsumerScheduler(num_layers=3, clock=Clock())
    c.reserve("r", [5, 9])
    assert c.check_chunk("r", 0, 2, [5, 9]) == ""
    assert c.check_chunk("r", 2, 2, [5]) != ""
    assert c.check_chunk("r", 0, 1, [6]) == "blocks outside the reservation"
    c.landed("r", 0, 2, [5, 9])
    c.landed("r", 0, 2, [5, 9])  # a duplicate counts once
    c.landed("r", 2, 1, [5])
    c.landed("r", 2, 1, [9])
    f = c.done("r", counted=True)
    assert f.ok and c.active() == [] and c.abort("r") is None
    with pytest.raises(ValueError):
        c.reserve("x", [1, 1])


def test_consumer_refuses_a_counted_done_with_pieces_missing_and_trusts_a_one_sided_one():
    c = ConsumerScheduler(num_layers=2, timeout=1.0, clock=Clock())
    c.reserve("tcp", [1, 2])
    c.landed("tcp", 0, 2, [1])
    f = c.done("tcp", counted=True)
    assert (f.ok, f.cause) == (False, "error") and "2 (layer, block) pieces missing" in f.detail
    c.reserve(
        "ipc", [3]
    )  # cuda_ipc: the bytes never pass through the consumer; the producer's fence is the word
    assert c.done("ipc", counted=False).ok
    c.reserve("slow", [4])
    assert c.expire() == []  # no deadline of its own: the node decides when to give up


def test_last_token_computed_makes_the_plan_final():
    s = ProducerScheduler(block_size=4, clock=Clock())
    s.bind("r", "p", 8, [1, 2], 0)
    p = s.plan("r", 8, [5, 6], prompt_done=False)  # the node forgot to say so: every token is computed
    assert p.last and p.local_block_ids == [5, 6]
    assert s.done("r").ok


@pytest.mark.parametrize("num_cached", [0, 2, 5])
@pytest.mark.parametrize("chunks", [[30], [9, 30], [12, 20, 30]])
def test_window_pieces_sent_equal_the_pieces_the_consumer_expects(num_cached, chunks):
    """Sliding layers (window 8, block 4) send only their window's blocks, over chunked prefill and whatever
    prefix the consumer already holds; the consumer, told layer_skips as the decode node computes them
    (wire.sliding_window.shipped_from minus its hits), expects exactly the (layer, block) pieces sent: every
    chunk landing leaves it complete, no piece early or missing."""
    from pdserve.wire.sliding_window import shipped_from

    windows, bs, n = (8, 0, 8), 4, chunks[-1]
    blocks = -(-n // bs)
    local, remote = list(range(100, 100 + blocks)), list(range(200, 200 + blocks - num_cached))
    prod = ProducerScheduler(bs, layer_windows=windows)
    prod.bind("r", "peer", n, remote, num_cached)
    cons = ConsumerScheduler(len(windows))
    skips = [max(0, s - num_cached) for s in shipped_from(windows, n, bs)]
    cons.reserve("r", remote, skips)
    for computed in chunks:
        plan = prod.plan("r", computed, local, computed >= n)
        if plan is None:
            continue
        for layer, window in enumerate(windows):
            skip = plan.window_skips.get(window, 0) if window else 0
            cons.landed("r", layer, 1, plan.remote_block_ids[skip:])
    assert cons.done("r", counted=True).ok
