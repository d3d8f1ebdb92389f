"""Host time of the KV producer's per-layer calls (block gather launch, event record) beside plain torch ops, in a
fresh process and again with ucxx initialised in it (diagnostic; GPU only). Argument: the ucxx progress mode.
Logged in bench/results/kv_transfer_trace-h100-20261123.log."""
import os, sys, time, threading
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
print("nproc", os.cpu_count(), "affinity", len(os.sched_getaffinity(0)), "python", sys.version.split()[0])
for f in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
    if os.path.exists(f):
        print(f, open(f).read().strip())
from kernels.dispatch import gather_blocks
import torch.nn.functional as F
dev = torch.device("cuda:0")
cache = torch.randn(2, 1000, 16, 8, 128, device=dev, dtype=torch.bfloat16)
ids1 = torch.tensor([5], device=dev)
ids128 = torch.arange(128, device=dev)
out1 = torch.empty(2, 1, 16, 8, 128, device=dev, dtype=torch.bfloat16)
out128 = torch.empty(2, 128, 16, 8, 128, device=dev, dtype=torch.bfloat16)
a = torch.randn(16, 16, device=dev)

def t(name, fn, n=300):
    for _ in range(20): fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    print(f"  {name:40s} {host:8.1f} us/call (host)")

def ev():
    e = torch.cuda.Event(); e.record()

def suite(tag):
    print("==", tag)
    t("gather_blocks 1 block (triton)", lambda: gather_blocks(cache, ids1, out=out1))
    t("gather_blocks 128 blocks (triton)", lambda: gather_blocks(cache, ids128, out=out128))
    t("index_select 128 blocks (torch)", lambda: torch.index_select(cache, 1, ids128, out=out128))
    t("Event()+record", ev)
    t("a @ a (torch op)", lambda: a @ a)
    t("F.linear (torch op)", lambda: F.linear(a, a))

suite("plain process")
from kvconnector.transport_ucx import _ucx_loop
_ucx_loop(sys.argv[1] if len(sys.argv) > 1 else "thread-polling")
time.sleep(0.5)
suite("ucxx initialised, idle")
