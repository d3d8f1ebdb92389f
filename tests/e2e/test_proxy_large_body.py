"""A 10 MB body against a real `pdserve proxy` process: 413 (declared or streamed), /health answers within a
second all the while, an allowed but oversized prompt is refused without being tokenized, and the proxy's
memory returns near where it started."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import httpx
import pytest

from tests.harness.fake_node import FakeNode
from tests.harness.servers import PY, ROOT, SECRET, free_port, stop_process, wait_for

pytestmark = pytest.mark.slow
BIG = 10 << 20


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def proxy_proc(tokenizer_dir, tmp_path, request):
    node = FakeNode("d0", "both").start()
    port = free_port()
    env = {**os.environ, "PDSERVE_KV_SECRET": SECRET.decode(), "PYTHONPATH": ROOT}
    log = open(tmp_path / "proxy.log", "wb")
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "pdserve.launch.cli",
            "proxy",
            "--model",
            tokenizer_dir,
            "--port",
            str(port),
            "--node",
            node.events,
            *getattr(request, "param", []),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url), 60, what="the proxy's /health")
        yield proc, url
    finally:
        stop_process(proc)
        log.close()
        node.stop()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def while_health_answers(url: str, fn) -> object:
    """Run fn() in a thread; meanwhile every /health must answer 200 within a second."""
    out, done = {}, threading.Event()

    def run():
        try:
            out["r"] = fn()
        finally:
            done.set()

    t = threading.Thread(target=run)
    t.start()
    probes = 0
    while not done.is_set():
        assert httpx.get(url + "/health", timeout=1.0).status_code == 200
        probes += 1
    t.join()
    assert probes >= 1
    return out["r"]


def chunks(total: int, size: int = 1 << 16):
    yield b'{"prompt": "'
    sent = 0
    while sent < total:
        yield b"a" * size
        sent += size
    yield b'"}'


def test_ten_megabytes_is_413_while_health_answers_and_memory_returns(proxy_proc):
    proc, url = proxy_proc
    for _ in range(3):
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    start = rss_mib(proc.pid)
    body = json.dumps({"prompt": "a" * BIG}).encode()
    r = while_health_answers(
        url,
        lambda: httpx.post(
            url + "/v1/completions", content=body, timeout=30, headers={"content-type": "application/json"}
        ),
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def streamed():
        try:
            return httpx.post(
                url + "/v1/completions",
                content=chunks(BIG),
                timeout=30,
                headers={"content-type": "application/json"},
            ).status_code
        except httpx.TransportError:
            return "closed"  # the server answered 413 and closed while we were still sending

    assert while_health_answers(url, streamed) in (413, "closed")
    # Under the byte limit but far over the context: refused by its length, never tokenized.
    r = while_health_answers(
        url, lambda: httpx.post(url + "/v1/completions", timeout=30, json={"prompt": "word " * (1 << 20)})
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    wait_for(lambda: rss_mib(proc.pid) < start + 64, 10, what=f"proxy RSS back near {start:.0f} MiB")


@pytest.mark.parametrize("proxy_proc", [["--max-model-len", "300000"]], indirect=True)
def test_a_long_prompt_is_tokenized_off_the_event_loop(proxy_proc):
    proc, url = proxy_proc
    # 1.8 MB of text that the length bound lets through (a huge context): seconds of tokenizing, in a worker
    # thread with the GIL released, so /health keeps answering within a second meanwhile.
    r = while_health_answers(
        url,
        lambda: httpx.post(
            url + "/v1/completions", timeout=60, json={"prompt": "The quick brown fox jumps. " * 70000}
        ),
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("proxy_proc", [["--max-model-len", "1000000"]], indirect=True)
def test_a_prompt_too_big_for_the_node_wire_is_413(proxy_proc):
    proc, url = proxy_proc
    r = httpx.post(url + "/v1/completions", timeout=60, json={"prompt": list(range(300, 1000)) * 600})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
