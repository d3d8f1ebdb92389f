"""What keeps a request's fixed transfer latency down, checked without timing anything.

- The sender coalesces only layers whose gather has run: a saved-but-not-computed layer must not hold back the
  layers before it (on a GPU the host saves every layer long before the device computes them).
- Staging buffers are reused across chunk shapes, so the data plane sees registered memory again.
- The consumer's per-chunk bookkeeping stays exact (duplicates count once) with per-layer bit masks.
- ucx completion is signalled by a future from UCX's notifier thread, never polled on the event loop (polling
  holds the GIL and costs every other thread up to the 5 ms switch interval at each hand-off).
"""
import os
import subprocess
import sys
import threading

import pytest
import torch

from kvconnector.scheduler_side import ConsumerScheduler, SendPlan
from kvconnector.transport import DataPlane, SendHandle
from kvconnector.worker_side import BufferPool, ProducerWorker, _Job, _Saved

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeEvent:
    """A CUDA event stand-in: query() says whether the gather ran; synchronize() blocks until it has."""

    def __init__(self, ready=False):
        self._ready = threading.Event()
        if ready:
            self._ready.set()

    def query(self):
        return self._ready.is_set()

    def synchronize(self):
        assert self._ready.wait(10), "waited on an event that never completed"

    def fire(self):
        self._ready.set()


class RecordingPlane(DataPlane):
    name = "recording"

    def __init__(self):
        super().__init__(None)
        self.chunks = []
        self.sent = threading.Condition()

    def send(self, link, header, tensor):
        with self.sent:
            self.chunks.append((header.first_layer, header.num_layers))
            self.sent.notify_all()
        return SendHandle()

    def receive(self, *a):
        raise AssertionError

    def wait_chunks(self, n):
        with self.sent:
            assert self.sent.wait_for(lambda: len(self.chunks) >= n, 10), self.chunks
            return list(self.chunks)


def test_sender_coalesces_ready_layers_only():
    layers = 4
    caches = [torch.zeros(2, 8, 4, 1, 2) for _ in range(layers)]
    plane = RecordingPlane()
    done = threading.Event()
    worker = ProducerWorker(caches, plane, link_of=lambda peer: object(), is_active=lambda rid: True,
                            on_progress=lambda *a: None, on_all_sent=lambda rid, n: done.set(), max_inflight=8)
    try:
        plan = SendPlan("r", "peer", [1, 2], [5, 6], last=False)
        stage = torch.zeros(layers, 2, 2, 4, 1, 2)
        job = _Job(plan, stage, torch.tensor([1, 2]), layers)
        events = [FakeEvent(ready=True)] + [FakeEvent() for _ in range(layers - 1)]
        sender = worker._sender("peer")
        for layer in range(layers):  # the host saved every layer; only layer 0 is computed
            sender.put(_Saved(job, layer, events[layer]))
        assert plane.wait_chunks(1) == [(0, 1)]  # layer 0 leaves now, alone
        events[3].fire()
        events[2].fire()
        events[1].fire()  # layers 1-3 all ready by the time the sender sees layer 1: one chunk
        assert plane.wait_chunks(2) == [(0, 1), (1, 3)]
    finally:
        worker.close()


def test_buffer_pool_reuses_memory_across_nearby_shapes():
    pool = BufferPool()
    a = pool.get((3, 2, 100, 16), torch.float32, torch.device("cpu"))
    assert a.shape == (3, 2, 100, 16) and a.is_contiguous()
    ptr = a.data_ptr()
    pool.put(a)
    b = pool.get((2, 2, 100, 16), torch.float32, torch.device("cpu"))  # fewer layers: same buffer
    assert b.data_ptr() == ptr
    c = pool.get((3, 2, 100, 16), torch.bfloat16, torch.device("cpu"))  # in use: a new one
    assert c.data_ptr() != ptr
    pool.put(b)
    pool.put(c)
    pool.put(torch.empty(5))  # not the pool's: ignored
    assert pool.allocations == 2
    d = pool.get((1, 2, 100, 16), torch.float32, torch.device("cpu"))
    assert d.data_ptr() in (ptr, c.data_ptr()) and pool.allocations == 2


def test_consumer_bookkeeping_counts_each_layer_block_once():
    s = ConsumerScheduler(num_layers=3)
    blocks = list(range(100, 170))
    s.reserve("r", "p", blocks)
    assert s.landed("r", 0, 2, blocks[:40]) is None
    assert s.landed("r", 0, 3, blocks[30:]) is None  # overlaps layers 0-1 of blocks 30-39
    assert s.landed("r", 2, 1, blocks[:29]) is None
    f = s.landed("r", 2, 1, blocks[29:31])
    assert f is not None and f.ok


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ucx_completion_is_signalled_not_polled():
    pytest.importorskip("ucxx")
    code = ("from kvconnector.transport import DataPlaneConfig\n"
            "from kvconnector.transport_ucx import UcxDataPlane, ucx_progress\n"
            "dp = UcxDataPlane(DataPlaneConfig(device='cpu'))\n"
            "import ucxx.core\n"
            "ctx = ucxx.core._get_ctx()\n"
            "print(ucx_progress(), ctx.progress_mode, bool(ctx.worker.enable_python_future))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCXPY_")}
    env.update(UCX_TLS="tcp", UCX_NET_DEVICES="lo", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, env=env,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last == "{'progress_mode': 'thread', 'python_future': True} thread True", last


def test_multi_layer_chunk_scatter_matches_per_layer():
    from kvconnector.wire import KVChunk, TensorMeta
    from kvconnector.worker_side import ConsumerWorker
    full = torch.zeros(4, 2, 10, 4, 2, 3)
    plain = torch.zeros_like(full)
    src = torch.randn(3, 2, 3, 4, 2, 3)
    header = KVChunk(request_id="r", seq=0, first_layer=1, num_layers=3, block_ids=[7, 2, 5],
                     tensor=TensorMeta("float32", list(src.shape)))
    ConsumerWorker(list(full.unbind(0)), full=full).scatter(header, src)  # one index_copy_ for the chunk
    ConsumerWorker(list(plain.unbind(0))).scatter(header, src)  # one scatter per layer
    assert torch.equal(full, plain) and torch.equal(full[1:, :, [7, 2, 5]], src) and not full[0].any()
