"""Where a KV push's time goes: every hop of one request, timestamped in both processes (one GPU, ucx; diagnostic).

Wraps the connector's methods in the producer and consumer processes of bench/kv_transfer.py (save_layer, the
sender's take/send/completion, the consumer's header arrival, receive post, landing, scatter, finish) and prints
each request's events on one clock (perf_counter is CLOCK_MONOTONIC, shared by the processes), for a one-block
push (the fixed cost) and a 2048-token push of Llama-8B-shape KV, both back to back.

  python bench/kv_transfer_trace.py [thread-polling|thread ...]   # ucxx progress modes to try
  KVTRACE_QUIET=1 prints one line per request; KVTRACE_SWITCH=s sets sys.setswitchinterval(s) in both processes;
  KVTRACE_DEVICE=cpu runs it on CPU (with UCX_TLS=tcp UCX_NET_DEVICES=lo).
Logged: bench/results/kv_transfer_trace-h100-20261123.log
"""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench.kv_transfer as kt

EV = []
def mark(name, **kw):
    EV.append((time.perf_counter(), name, threading.current_thread().name, kw))

def patch():
    import kvconnector.worker_side as ws, kvconnector.transport_ucx as tu, kvconnector.consumer as kc
    import kvconnector.producer as kp
    def wrap(cls, attr, name, before=True, after=True, kwf=None):
        orig = getattr(cls, attr)
        def f(*a, **k):
            info = kwf(*a, **k) if kwf else {}
            if before: mark(name + ">", **info)
            r = orig(*a, **k)
            if after: mark(name + "<", **info)
            return r
        setattr(cls, attr, f)
    wrap(ws.ProducerWorker, "save_layer", "P.save", kwf=lambda s, l: {"l": l})
    wrap(ws._Sender, "_take_group", "P.take")
    wrap(ws._Sender, "_completed", "P.completed", kwf=lambda s, job, k, *a: {"k": k})
    wrap(tu.UcxDataPlane, "send", "P.ucxsend", kwf=lambda s, link, h, t: {"seq": h.seq, "a": h.first_layer, "k": h.num_layers})
    wrap(tu.UcxDataPlane, "receive", "C.ucxrecv", kwf=lambda s, link, h, *a, **k: {"seq": h.seq, "k": h.num_layers})
    wrap(kc.KVConsumer, "_on_message", "C.msg", after=False, kwf=lambda s, link, m, b: {"t": type(m).__name__})
    wrap(kp.KVProducer, "_on_message", "P.msg", after=False, kwf=lambda s, link, m, b: {"t": type(m).__name__})
    wrap(ws.ConsumerWorker, "scatter", "C.scatter", kwf=lambda s, h, t: {"a": h.first_layer, "k": h.num_layers})
    wrap(kc.KVConsumer, "_finish", "C.finish", after=False)
    orig_dwl = tu.deliver_when_landed
    def dwl(future, dest, deliver, fail, pool, deliveries):
        future.add_done_callback(lambda f: mark("C.recvdone"))
        return orig_dwl(future, dest, deliver, fail, pool, deliveries)
    tu.deliver_when_landed = dwl

class TNode(kt.Node):
    def trace(self):
        out = list(EV); EV.clear(); return out

def serve(pipe, device, env):
    os.environ.update(env)
    if env.get("KVTRACE_SWITCH"): sys.setswitchinterval(float(env["KVTRACE_SWITCH"]))
    patch()
    kt.Node = TNode
    kt._serve(pipe, device, env)

def run(tokens_list, progress):
    env = {"UCX_WARN_UNUSED_ENV_VARS": "n", "KVTRACE_SWITCH": os.environ.get("KVTRACE_SWITCH", "")}
    if progress:
        env["UCXPY_PROGRESS_MODE"] = progress
    device = "cuda:0" if os.environ.get("KVTRACE_DEVICE", "cuda") == "cuda" else "cpu"
    prod, cons = kt.Proc(device, env, serve), kt.Proc(device, env, serve)
    layout = kt.LLAMA8B
    try:
        n_blocks = 2 * 512 + 8
        addr = cons.call("open", role="consumer", transport="ucx", layout=layout, num_blocks=n_blocks)
        prod.call("open", role="producer", transport="ucx", layout=layout, num_blocks=n_blocks, address=addr)
        prod.call("calibrate", layer_ms=0, tokens=16)
        for tokens in tokens_list:
            spans = []
            for i in range(6):
                rid = f"t{tokens}-{i}"
                prod.call("trace"); cons.call("trace")
                t0, tl = prod.call("push", rid=rid, tokens=tokens, overlapped=False)
                tland = cons.call("wait_landed", rid=rid)
                pe, ce = prod.call("trace"), cons.call("trace")
                spans.append((tland - t0) * 1e3)
                saves = [t for t, n, th, kw in pe if n == "P.save<"]
                print(f"  iter {i}: span {spans[-1]:.2f} ms, last save_layer returned at {1e3*(max(saves)-t0):.2f} ms" if saves else "")
                if i >= 5 and not os.environ.get("KVTRACE_QUIET"):
                    evs = sorted([(t, "P", n, th, kw) for t, n, th, kw in pe] + [(t, "C", n, th, kw) for t, n, th, kw in ce])
                    print(f"--- {progress} tokens={tokens} iter {i}: span {spans[-1]:.2f} ms; t0 = first save_layer")
                    for t, side, n, th, kw in evs:
                        print(f"  {1e3*(t - t0):8.3f} ms  {n:16s} {th:22s} {kw}")
                    print(f"  landed at {1e3*(tland-t0):8.3f} ms")
            print(f"=== {progress} tokens={tokens} spans ms: {[round(s,2) for s in spans]}")
    finally:
        prod.close(); cons.close()

if __name__ == "__main__":
    for mode in sys.argv[1:] or ["thread-polling"]:
        run([16, 2048], mode if mode != "default" else None)
