"""The producer worker's hot path, checked without a GPU: what the forward thread does per layer, and when an
aborted request's end may run (never before the writes of the step in progress)."""

import threading

import torch

from pdserve.kvconnector.scheduler_side import SendPlan
from pdserve.kvconnector.transport import DataPlane, Fence
from pdserve.kvconnector.worker_side import CompletionThread, ProducerWorker


class GateFence(Fence):
    def __init__(self):
        self.gate = threading.Event()

    def wait(self):
        self.gate.wait(5)


class RecordingPlane(DataPlane):
    """Counts calls; its fences open only when the test says so."""

    name = "recording"

    def __init__(self, num_layers=3):
        super().__init__(None, [torch.zeros(2, 8, 4, 1, 2)] * num_layers)
        self.calls, self.fences = [], []

    def stage(self, writes):
        self.calls.append(("stage", tuple(writes.request_ids)))

    def write_layer(self, writes, layer):
        self.calls.append(("write", layer, tuple(writes.request_ids), writes.num_blocks))

    def fence(self, link):
        self.fences.append(GateFence())
        return self.fences[-1]


def plans():
    return [
        SendPlan("a", "peer1", [1, 2], [10, 11], last=True),
        SendPlan("b", "peer1", [3], [12], last=False),
        SendPlan("c", "peer2", [4], [13], last=True),
        SendPlan("d", "peer2", [], [], last=True),
    ]


def test_one_write_per_peer_and_layer_whatever_the_number_of_requests_and_blocks():
    plane = RecordingPlane()
    landed = []
    w = ProducerWorker(
        plane, on_landed=lambda rid, exposed, last_layer: landed.append(rid), on_first_write=lambda rid: None
    )
    w.start_step(plans())
    for layer in range(3):
        w.save_layer(layer)
    writes = [c for c in plane.calls if c[0] == "write"]
    # two peers x three layers; each call carries every request of its peer (d has no blocks to move)
    assert writes == [
        ("write", layer, rids, n) for layer in range(3) for rids, n in ((("a", "b"), 3), (("c",), 1))
    ]
    w.end_step()
    assert len(plane.fences) == 3  # a, c, d finish their transfer in this step
    for f in plane.fences:
        f.gate.set()
    done = threading.Event()
    w.completions.after(Fence(), lambda _: done.set())
    assert done.wait(5) and sorted(landed) == ["a", "c", "d"]
    w.close()


def test_an_abort_during_a_step_waits_for_the_end_of_the_step_then_for_a_fence():
    plane = RecordingPlane()
    w = ProducerWorker(plane, on_landed=lambda *landed: None, on_first_write=lambda rid: None)
    ended = threading.Event()
    w.begin_planning(p.request_id for p in plans())
    w.start_step(plans())
    w.save_layer(0)
    w.after_writes(
        "b", "peer1", lambda _: ended.set()
    )  # b is in the step: layers 1 and 2 will still be written
    assert plane.fences == []
    w.save_layer(1)
    w.save_layer(2)
    w.end_step()
    assert len(plane.fences) == 3 + 1 and not ended.is_set()
    for f in plane.fences[:-1]:  # the step's own completions, then the abort's fence, in order
        f.gate.set()
    assert not ended.wait(0.2)
    plane.fences[-1].gate.set()
    assert ended.wait(5)
    # outside a step the fence is taken at once
    again = threading.Event()
    w.after_writes("x", "peer1", lambda _: again.set())
    plane.fences[-1].gate.set()
    assert again.wait(5)
    w.close()


def test_completion_thread_keeps_order_and_survives_a_failing_callback():
    t = CompletionThread()
    seen, done = [], threading.Event()
    gate = GateFence()
    t.after(gate, lambda _: seen.append(1))
    t.after(Fence(), lambda _: 1 / 0)
    t.after(Fence(), lambda _: (seen.append(3), done.set()))
    assert seen == []
    gate.gate.set()
    assert done.wait(5) and seen == [1, 3]
    t.close()


def test_an_abort_while_the_step_is_being_planned_waits_for_the_step_too():
    """The abort lands after the producer published the step's candidates but before the writes were staged:
    it must still end after them (else the consumer would free blocks the step then writes)."""
    plane = RecordingPlane()
    w = ProducerWorker(plane, on_landed=lambda *landed: None, on_first_write=lambda rid: None)
    order = []
    w.begin_planning(["a", "b"])
    w.after_writes("b", "peer1", lambda _: order.append("ended"))
    w.start_step(plans())
    for layer in range(3):
        w.save_layer(layer)
    order.append("written")
    w.end_step()
    for f in plane.fences:
        f.gate.set()
    done = threading.Event()
    w.completions.after(Fence(), lambda _: done.set())
    assert done.wait(5) and order == ["written", "ended"]
    w.close()


def test_a_failed_forward_completes_nobody():
    plane = RecordingPlane()
    landed = []
    w = ProducerWorker(
        plane, on_landed=lambda rid, exposed, last_layer: landed.append(rid), on_first_write=lambda rid: None
    )
    w.begin_planning(p.request_id for p in plans())
    w.start_step(plans())
    w.save_layer(0)  # the forward raises in layer 1
    w.end_step(ok=False)
    assert plane.fences == [] and w.step_plans == []
    done = threading.Event()
    w.completions.after(Fence(), lambda _: done.set())
    assert done.wait(5) and landed == []
    w.close()
