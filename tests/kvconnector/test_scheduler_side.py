"""The connector's scheduler side in isolation: which blocks go when, timeouts, exactly-once finishing."""
import pytest

from kvconnector.scheduler_side import ConsumerScheduler, ProducerScheduler


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plan_sends_each_final_block_once_skipping_the_consumers_prefix():
    s = ProducerScheduler(block_size=4, timeout=1.0, clock=Clock())
    s.add("r", "peer", num_tokens=18)  # 5 blocks, the last one partial
    assert s.plan("r", 4, [0, 1, 2, 3, 4], False) is None  # not reserved yet
    assert s.reserved("r", [50, 51, 52], num_cached=2) is None
    table = [10, 11, 12, 13, 14]
    assert s.plan("r", 6, table, False) is None  # blocks 0-1 are the consumer's own
    p = s.plan("r", 13, table, False)
    assert (p.local_block_ids, p.remote_block_ids, p.last) == ([12], [50], False)
    assert s.plan("r", 15, table, False) is None  # block 3 not full yet
    p = s.plan("r", 18, table, True)
    assert (p.local_block_ids, p.remote_block_ids, p.last) == ([13, 14], [51, 52], True)
    assert s.plan("r", 18, table, True) is None


def test_bad_reservation_aborts_once():
    s = ProducerScheduler(block_size=4, clock=Clock())
    s.add("r", "p", num_tokens=9)
    f = s.reserved("r", [1], num_cached=0)  # needs 3 blocks
    assert f is not None and not f.ok and f.cause == "error"
    assert s.abort("r") is None and s.done("r") is None


def test_done_then_abort_finishes_exactly_once():
    s = ProducerScheduler(block_size=4, clock=Clock())
    s.add("r", "p", num_tokens=4)
    s.reserved("r", [7], 0)
    assert s.done("r") is None  # nothing planned yet: a stray Done cannot finish it
    s.plan("r", 4, [3], True)
    f = s.done("r")
    assert f.ok and f.timings["done"] >= f.timings["reserve_start"]
    assert s.abort("r") is None and s.expire() == [] and s.done("r") is None


def test_inactivity_timeout_and_progress():
    clock = Clock()
    s = ProducerScheduler(block_size=4, timeout=1.0, clock=clock)
    s.add("a", "p", 8)
    s.add("b", "q", 8)
    clock.t = 0.8
    s.progress("a")
    clock.t = 1.2
    assert [f.request_id for f in s.expire()] == ["b"]
    clock.t = 1.9
    assert [(f.request_id, f.cause) for f in s.expire()] == [("a", "timeout")]
    s.add("c", "p", 8)
    assert [f.request_id for f in s.peer_lost("p")] == ["c"]


def test_consumer_completes_when_every_layer_of_every_block_landed():
    c = ConsumerScheduler(num_layers=3, clock=Clock())
    c.reserve("r", "p", [5, 9])
    assert c.check_chunk("r", 0, 2, [5, 9]) == ""
    assert c.check_chunk("r", 2, 2, [5]) != ""
    assert c.check_chunk("r", 0, 1, [6]) == "blocks outside the reservation"
    assert c.landed("r", 0, 2, [5, 9]) is None
    assert c.landed("r", 0, 2, [5, 9]) is None  # a duplicate counts once
    assert c.landed("r", 2, 1, [5]) is None
    f = c.landed("r", 2, 1, [9])
    assert f.ok and c.active() == [] and c.abort("r") is None
    with pytest.raises(ValueError):
        c.reserve("x", "p", [1, 1])


def test_consumer_timeout_and_empty_reservation():
    clock = Clock()
    c = ConsumerScheduler(num_layers=2, timeout=1.0, clock=clock)
    c.reserve("r", "p", [1])
    c.reserve("empty", "p", [])
    assert c.complete_if_empty("r") is None
    assert c.complete_if_empty("empty").ok
    clock.t = 1.5
    (f,) = c.expire()
    assert (f.request_id, f.ok, f.cause) == ("r", False, "timeout")


def test_last_token_computed_makes_the_plan_final():
    s = ProducerScheduler(block_size=4, clock=Clock())
    s.add("r", "p", num_tokens=8)
    s.reserved("r", [1, 2], 0)
    p = s.plan("r", 8, [5, 6], prompt_done=False)  # the node forgot to say so: every token is computed
    assert p.last and p.local_block_ids == [5, 6]
    assert s.done("r").ok
