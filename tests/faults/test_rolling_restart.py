"""Rolling restart of one decode node under load (the second half of the drain: tests/faults/test_drain.py is
the first): a 1P2D cluster of node processes on fixed ports behind a `pdserve proxy` process, a stream of
greedy requests through the official client; SIGTERM decode-1, wait for it to exit, start it again with the
same flags on the same address, as systemd or Kubernetes would. Every request sent during the whole window
succeeds with the output the same prompt had before the restart (none lost, none a retryable error: the proxy
re-routes what a draining node refuses); the proxy routes nothing to decode-1 from the moment it knows it is
draining until it is back, and routes to the replacement once its heartbeats arrive; every node's blocks come
back (free + used + cached == total, used == 0)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.harness.nodes import REPO, SECRET, NodeProcess, start_node, wait_healthy
from tests.harness.servers import PY, free_port, needs_nodes, stop_process, wait_for

pytestmark = [pytest.mark.slow, needs_nodes]

SHUTDOWN_S = 20
MAX_TOKENS = 24
LOAD_THREADS = 4
MODEL = "tiny-llama"
# Short prompts run colocated on a decode node, long ones (>= 32 tokens to compute) disaggregated.
PROMPTS = [
    "Tell me a story",
    "The capital of France is",
    " ".join(f"w{i}" for i in range(60)),
    " ".join(f"item {i} of the list" for i in range(12)),
]


def fixed_port() -> int:
    """A free port below the ephemeral range, as an operator's fixed ports are: while the node is down, the
    proxy's reconnecting sockets take ephemeral source ports, and one could land on (connect to itself on) a
    port of that range, which the replacement then could not bind."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def _health(url: str) -> dict | None:
    try:
        return httpx.get(url + "/health", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None


def _proxy_node(proxy_url: str, node_id: str) -> dict | None:
    h = _health(proxy_url)
    return next((n for n in (h or {}).get("nodes", []) if n["node_id"] == node_id), None)


def _accounting_holds(node: NodeProcess) -> bool:
    h = node.health()
    if not h:
        return False
    total = h["num_free_blocks"] + h["num_used_blocks"] + h["num_cached_blocks"]
    return total == h["num_total_blocks"] and h["num_used_blocks"] == 0


def _served(node: NodeProcess) -> float:
    """Requests this node process finished (vLLM's counter, every finished_reason)."""
    m = node.metrics()
    return sum(v for k, v in m.items() if k.startswith("vllm:request_success_total{"))


@dataclass
class Outcome:
    prompt: str
    started: float  # monotonic
    ended: float
    kind: str  # ok | error | lost | stream_error
    route: str = ""
    text: str = ""
    detail: str = ""


def test_rolling_restart_of_a_decode_node_under_load_loses_no_request(model_dir, tmp_path):
    from openai import APIConnectionError, APIStatusError, APITimeoutError, OpenAI

    logs = str(tmp_path)
    flags = ["--served-model-name", MODEL, "--shutdown-timeout", str(SHUTDOWN_S)]
    d1_ports = {k: fixed_port() for k in ("rpc", "events", "http", "kv")}

    def start_decode_1() -> NodeProcess:
        return start_node("decode", model_dir, logs, extra=flags, node_id="decode-1", ports=d1_ports)

    nodes = [
        start_node("prefill", model_dir, logs, extra=flags, node_id="prefill-0"),
        start_node("decode", model_dir, logs, extra=flags, node_id="decode-0"),
        start_decode_1(),
    ]
    proxy_proc = None
    proxy_log = open(os.path.join(logs, "proxy.log"), "wb")
    try:
        wait_healthy(*nodes)
        port = fixed_port()
        proxy_proc = subprocess.Popen(
            [PY, "-m", "pdserve", "--log-level", "INFO", "proxy", "--model", model_dir]
            + ["--port", str(port), "--routing", "round_robin", "--log-routing", "--served-model-name", MODEL]
            + [arg for n in nodes for arg in ("--node", n.events)],
            cwd=REPO,
            env={**os.environ, "PDSERVE_KV_SECRET": SECRET, "PYTHONPATH": REPO},
            stdout=proxy_log,
            stderr=subprocess.STDOUT,
        )
        proxy_url = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: (_health(proxy_url) or {}).get("live_nodes") == 3, 60, what="the proxy to see 3 nodes"
        )
        client = OpenAI(base_url=proxy_url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(prompt: str, stream: bool) -> tuple[str, str]:
            """-> (text, route); raises what the client raises."""
            raw = client.completions.with_raw_response.create(
                model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=stream
            )
            route = raw.headers.get("x-pdserve-route", "")
            if not stream:
                reply = raw.parse()
                assert reply.choices[0].finish_reason, reply
                return reply.choices[0].text, route
            chunks = [c.choices[0] for c in raw.parse() if c.choices]
            assert chunks and chunks[-1].finish_reason, chunks
            return "".join(c.text for c in chunks), route

        # The outputs before the restart, one request at a time.
        expected = {p: ask(p, stream=False)[0] for p in PROMPTS}

        outcomes: list[Outcome] = []
        lock = threading.Lock()
        stop = threading.Event()

        def worker(k: int) -> None:
            i = k
            while not stop.is_set():
                prompt, stream = PROMPTS[i % len(PROMPTS)], bool((i // len(PROMPTS)) % 2)
                i += 1
                o = Outcome(prompt, time.monotonic(), 0.0, "ok")
                try:
                    o.text, o.route = ask(prompt, stream)
                except APIStatusError as exc:
                    o.kind, o.detail = "error", f"{exc.status_code} {exc.message}"
                except (APITimeoutError, APIConnectionError) as exc:
                    o.kind, o.detail = "lost", repr(exc)
                except Exception as exc:  # noqa: BLE001 - an error event mid-stream, a missing finish
                    o.kind, o.detail = "stream_error", repr(exc)
                o.ended = time.monotonic()
                with lock:
                    outcomes.append(o)

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(LOAD_THREADS)]
        for t in threads:
            t.start()
        wait_for(lambda: len(outcomes) >= 2 * LOAD_THREADS, 60, what="the load to be under way")
        wait_for(lambda: nodes[2].health()["num_running"] > 0, 30, what="decode-1 to hold requests")

        # 1. SIGTERM decode-1: it drains; the proxy stops routing there.
        old = nodes[2]
        old.proc.send_signal(signal.SIGTERM)
        wait_for(
            lambda: (_proxy_node(proxy_url, "decode-1") or {}).get("draining"),
            10,
            interval=0.02,
            what="the proxy to see decode-1 draining",
        )
        draining_at = time.monotonic()
        assert old.proc.wait(SHUTDOWN_S + 15) == 0, old.log()[-3000:]

        # 2. Start it again: same flags, same address, same node id.
        spawned_at = time.monotonic()
        nodes[2] = new = start_decode_1()
        wait_healthy(new)
        assert (new.rpc, new.events, new.http) == (old.rpc, old.events, old.http)

        def back_in_proxy() -> bool:
            n = _proxy_node(proxy_url, "decode-1")
            return bool(n and n["alive"] and not n["draining"])

        wait_for(back_in_proxy, 30, what="the proxy to route to decode-1 again")
        joined_at = time.monotonic()
        served_before = len(outcomes)
        wait_for(lambda: _served(new) >= 4, 60, what="the replacement to serve requests")
        wait_for(lambda: len(outcomes) >= served_before + 2 * LOAD_THREADS, 60, what="more load after")
        stop.set()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "a request hung"

        # Every request succeeded, with the output it had before the restart.
        failed = [o for o in outcomes if o.kind != "ok"]
        assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:5]}"
        wrong = [o for o in outcomes if o.text != expected[o.prompt]]
        assert not wrong, f"{len(wrong)} of {len(outcomes)} outputs differ from before: {wrong[:3]}"
        # Nothing went to decode-1 while it drained or was down; the replacement took its share after.
        away = [o for o in outcomes if draining_at < o.started and o.ended < spawned_at]
        assert away and not [o for o in away if "decode-1" in o.route], away
        after = [o for o in outcomes if o.started > joined_at]
        assert any("->decode-1" in o.route for o in after), [o.route for o in after]
        assert _served(new) >= 4

        # Every node's blocks came back.
        for node in nodes:
            wait_for(lambda node=node: _accounting_holds(node), 15, what=f"{node.log_path}: blocks back")
        assert (_health(proxy_url) or {}).get("live_nodes") == 3
        retries = [
            line for line in httpx.get(proxy_url + "/metrics").text.splitlines() if "retries_total{" in line
        ]
        print(
            f"{len(outcomes)} requests ok; {len(away)} while decode-1 drained or was down, "
            f"{sum('decode-1' in o.route for o in after)} of {len(after)} after it joined went to it; "
            f"proxy retries: {retries or 'none'}"
        )
    finally:
        if proxy_proc is not None:
            stop_process(proxy_proc, 15)
        proxy_log.close()
        for node in nodes:
            node.stop()
