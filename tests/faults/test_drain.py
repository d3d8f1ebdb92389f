"""Graceful drain: SIGTERM one decode node of a running cluster under a stream of requests (a rolling
restart's first half). Every request completes, or gets a retryable error (429/503) a client may re-send;
none is lost or hangs; the node exits within --shutdown-timeout; the survivors' KV accounting holds and every
block comes back. Also: `pdserve up` itself drains before it stops (its stop returns with every process
gone)."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.harness.servers import UpCluster, needs_nodes, running, wait_for

pytestmark = [pytest.mark.slow, needs_nodes]

SHUTDOWN_S = 20
RETRYABLE = (429, 503)


def _accounting_holds(cluster: UpCluster, name: str) -> bool:
    h = cluster.node_health(name)
    total = h["num_free_blocks"] + h["num_used_blocks"] + h["num_cached_blocks"]
    return total == h["num_total_blocks"] and h["num_used_blocks"] == 0


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_sigterm_one_decode_node_under_load_loses_nothing(tmp_path_factory, model_dir):
    from openai import APIConnectionError, APIStatusError, APITimeoutError, OpenAI

    args = (
        "--shutdown-timeout",
        str(SHUTDOWN_S),
        "--routing",
        "round_robin",
        "--served-model-name",
        "tiny-llama",
    )
    with running(UpCluster(tmp_path_factory.mktemp("drain-1p2d"), model_dir, 1, 2, args)) as cluster:
        client = OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=60)
        outcomes: list[tuple[str, object]] = []
        lock = threading.Lock()
        stop = threading.Event()
        long_prompt = " ".join(f"w{i}" for i in range(60))

        def worker(k: int) -> None:
            i = 0
            while not stop.is_set():
                prompt = (long_prompt if i % 2 else "Tell me a story") + f" {k}-{i}"
                i += 1
                try:
                    stream = client.completions.create(
                        model="tiny-llama", prompt=prompt, max_tokens=48, temperature=0, stream=True
                    )
                    reasons = [c.choices[0].finish_reason for c in stream if c.choices]
                    result = ("ok", reasons[-1]) if reasons and reasons[-1] else ("no_finish", reasons)
                except APIStatusError as exc:
                    result = ("error", exc.status_code)
                except (APITimeoutError, APIConnectionError) as exc:
                    result = ("hung_or_lost", repr(exc))
                except Exception as exc:  # noqa: BLE001 - an error event mid-stream (openai.APIError)
                    result = ("stream_error", str(exc))
                with lock:
                    outcomes.append(result)

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(6)]
        for t in threads:
            t.start()
        wait_for(lambda: len(outcomes) >= 6, 60, what="the load to be under way")
        victim = cluster.node("decode-1")["pid"]
        signalled = time.monotonic()
        cluster.signal("decode-1", signal.SIGTERM)
        wait_for(lambda: not _alive(victim), SHUTDOWN_S + 10, what="the drained decode node to exit")
        drained_in = time.monotonic() - signalled
        time.sleep(2.0)  # load keeps going on the survivor
        stop.set()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "a request hung"

        bad = [o for o in outcomes if o[0] != "ok" and not (o[0] == "error" and o[1] in RETRYABLE)]
        assert not bad, f"requests lost or failed without a retryable status: {bad[:5]} of {len(outcomes)}"
        assert sum(o[0] == "ok" for o in outcomes) >= len(outcomes) - 2, outcomes
        assert drained_in < SHUTDOWN_S + 5
        out = cluster.output()
        assert "decode-1" in out and "exited with status 0" in out, out

        # The survivors: every block back, free + used + cached == total.
        for name in ("decode-0", "prefill-0"):
            wait_for(lambda name=name: _accounting_holds(cluster, name), 15, what=f"{name}'s blocks back")
        health = httpx.get(cluster.url + "/health", timeout=5).json()
        assert health["status"] == "ok"
        # The proxy keeps serving on the survivor.
        reply = client.completions.create(model="tiny-llama", prompt="after", max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason == "length"


def test_draining_node_refuses_new_work_and_says_so(tmp_path_factory, model_dir):
    """Between SIGTERM and exit, /health answers 503 "draining"; the proxy stops routing there at once."""
    args = ("--shutdown-timeout", "15", "--served-model-name", "tiny-llama")
    with running(UpCluster(tmp_path_factory.mktemp("drain-health"), model_dir, 0, 2, args)) as cluster:
        from openai import OpenAI

        client = OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=60)
        # Long requests hold decode-1 in its drain while we look. Four at once, so the router (which spreads
        # load) gives decode-1 some whatever its scores: one at a time could all land on decode-0.
        holders = [
            threading.Thread(
                target=lambda i=i: client.completions.create(
                    model="tiny-llama", prompt=f"hold {i}", max_tokens=400, temperature=0
                ),
                daemon=True,
            )
            for i in range(4)
        ]
        for holder in holders:
            holder.start()
        node = cluster.node("decode-1")
        wait_for(lambda: cluster.node_health("decode-1")["num_running"] > 0, 30, what="decode-1 busy")
        cluster.signal("decode-1", signal.SIGTERM)

        def draining() -> bool:
            try:
                r = httpx.get(node["http"] + "/health", timeout=2)
            except httpx.HTTPError:
                return False
            return r.status_code == 503 and r.json()["status"] == "draining"

        wait_for(draining, 10, what="decode-1's /health to say draining")

        def proxy_sees_draining() -> bool:
            nodes = httpx.get(cluster.url + "/health", timeout=5).json()["nodes"]
            return any(n["node_id"] == "decode-1" and n["draining"] for n in nodes)

        wait_for(proxy_sees_draining, 5, what="the proxy to see decode-1 draining")
        for i in range(4):  # all go to decode-0 now
            r = httpx.post(
                cluster.base_url + "/completions",
                json={"model": "tiny-llama", "prompt": f"new {i}", "max_tokens": 2},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            assert "decode-1" not in r.headers["x-pdserve-route"]
        for holder in holders:
            holder.join(60)
        wait_for(lambda: not _alive(node["pid"]), 20, what="decode-1 to exit after its drain")
