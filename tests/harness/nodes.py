"""Helpers for the node tests (no tests here): real node processes on free loopback ports, and a tiny ZMQ
DEALER client that plays the proxy. Used by tests/node/ and tests/faults/."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

import pytest
import zmq

from pdserve.node_runtime.node_cli import READY_LINE

SECRET = "node-test-secret"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class NodeProcess:
    role: str  # prefill | decode
    proc: subprocess.Popen
    rpc: str
    http: str
    events: str
    log_path: str

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.http + "/health", timeout=2) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.http + "/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def blocks(self) -> dict[str, int]:
        m = self.metrics()
        return {k: int(m[f"pdserve_node_kv_blocks_{k}"]) for k in ("free", "used", "cached", "total")}

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_node(
    role: str,
    model: str,
    log_dir: str,
    kv_role: str | None = None,
    extra: list[str] = (),
    kv_timeout: float = 5.0,
    node_id: str = "",
    ports: dict[str, int] | None = None,
) -> NodeProcess:
    """ports: {"rpc", "events", "http", "kv"} to bind (a restart on the same address); by default port 0
    everywhere: the node reports what it bound (wait_healthy reads it), so no port can be raced for."""
    ports = {"rpc": 0, "events": 0, "http": 0, "kv": 0, **(ports or {})}
    kvt = {"kv_connector": "tcp", "kv_port": ports["kv"]}
    name = node_id or f"{role}-{uuid.uuid4().hex[:8]}"
    if kv_role:
        kvt["kv_role"] = kv_role
    args = [
        sys.executable,
        "-m",
        "pdserve.launch.cli",
        "--log-level",
        "INFO",
        role,
        "--model",
        model,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--block-size",
        "16",
        "--kv-cache-memory",
        str(16 << 20),
        "--rpc-port",
        str(ports["rpc"]),
        "--http-port",
        str(ports["http"]),
        "--events-port",
        str(ports["events"]),
        "--node-id",
        name,
        "--kv-transfer-config",
        json.dumps(kvt),
        "--kv-secret",
        SECRET,
        "--kv-timeout",
        str(kv_timeout),
        *extra,
    ]
    log_path, n = os.path.join(log_dir, f"{name}.log"), 1
    while os.path.exists(log_path):  # a restarted node (same id): a log of its own beside its predecessor's
        log_path, n = os.path.join(log_dir, f"{name}.{n}.log"), n + 1
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(args, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, env=env)
    return NodeProcess(role, proc, "", "", "", log_path)


@contextlib.contextmanager
def prefill_decode_pair(model: str, log_dir: str, kv_timeout: float = 5.0, prefill_extra: list[str] = ()):
    """A healthy prefill node and decode node; both stopped after (the prefill node woken first, in case a
    test froze it with SIGSTOP)."""
    prefill = start_node("prefill", model, log_dir, extra=prefill_extra, kv_timeout=kv_timeout)
    decode = start_node("decode", model, log_dir, kv_timeout=kv_timeout)
    try:
        wait_healthy(prefill, decode)
        yield prefill, decode
    finally:
        if prefill.proc.poll() is None:
            prefill.proc.send_signal(signal.SIGCONT)
        prefill.stop()
        decode.stop()


def wait_healthy(*nodes: NodeProcess, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    for node in nodes:
        while True:
            if node.proc.poll() is not None:
                raise RuntimeError(
                    f"{node.role} node exited with {node.proc.returncode}:\n{node.log()[-3000:]}"
                )
            ready = READY_LINE.search(node.log())
            if ready and not node.rpc:
                node.rpc, node.events, node.http = ready.groups()
            health = node.health() if node.rpc else None
            if health and health.get("status") == "ok":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.role} node not healthy in {timeout}s:\n{node.log()[-3000:]}")
            time.sleep(0.2)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@dataclass
class Result:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    messages: list = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    timings: dict | None = None
    error: object = None  # the Error message, if one came

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class FakeProxy:
    """A DEALER per node, signing frames like the proxy does."""

    def __init__(self, secret: str = SECRET):
        from pdserve.wire.node_messages import make_codec

        self.secret = secret.encode()
        self.codec = make_codec(self.secret)
        self.ctx = zmq.Context()
        self.sockets: dict[str, zmq.Socket] = {}
        self.results: dict[str, Result] = {}
        self.identities: dict[zmq.Socket, bytes] = {}

    def socket(self, endpoint: str) -> zmq.Socket:
        sock = self.sockets.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            from pdserve.wire import curve

            curve.client(sock, self.secret)  # a node under $PDSERVE_CURVE=1 takes CURVE clients only
            identity = f"proxy-{uuid.uuid4().hex[:8]}".encode()
            sock.setsockopt(zmq.IDENTITY, identity)
            self.identities[sock] = identity  # frames are signed over it
            sock.connect(endpoint)
            self.sockets[endpoint] = sock
        return sock

    def generate(
        self,
        node: NodeProcess,
        prompt: list[int],
        mode: str = "colocated",
        prefill: NodeProcess = None,
        request_id: str | None = None,
        deadline_s: float = 0.0,
        **params,
    ) -> str:
        from pdserve.wire.node_messages import Generate
        from pdserve.wire.sampling_params import SamplingParams

        rid = request_id or uuid.uuid4().hex
        sp = SamplingParams(**{"temperature": 0.0, "max_tokens": 8, "ignore_eos": True, **params})
        self.results[rid] = Result(rid)
        self.send(
            node,
            Generate(
                request_id=rid,
                prompt_token_ids=list(prompt),
                params=sp.to_dict(),
                mode=mode,
                prefill_rpc=prefill.rpc if prefill else "",
                deadline_s=deadline_s,
            ),
        )
        return rid

    def track(self, request_id: str) -> str:
        self.results[request_id] = Result(request_id)
        return request_id

    def abort(self, node: NodeProcess, request_id: str) -> None:
        from pdserve.wire.node_messages import Abort

        self.send(node, Abort(request_id=request_id))

    def send(self, node: NodeProcess, msg) -> None:
        sock = self.socket(node.rpc)
        sock.send(self.codec.encode_bytes(msg, context=b"from:" + self.identities[sock]))

    def send_raw(self, node: NodeProcess, data: bytes) -> None:
        self.socket(node.rpc).send(data)

    def pump(self, timeout: float = 0.1) -> None:
        poller = zmq.Poller()
        for sock in self.sockets.values():
            poller.register(sock, zmq.POLLIN)
        for sock, _ in poller.poll(int(timeout * 1000)):
            while True:
                try:
                    payload = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg, _ = self.codec.decode_bytes(payload, context=b"to:" + self.identities[sock])
                self._record(msg)

    def _record(self, msg) -> None:
        result = self.results.setdefault(msg.request_id, Result(msg.request_id))
        result.messages.append(msg)
        kind = type(msg).__name__
        if kind == "Tokens":
            result.token_ids += msg.token_ids
            if msg.logprobs:
                result.logprobs += msg.logprobs
            result.num_cached_tokens = msg.num_cached_tokens
            if msg.finished:
                result.finish_reason, result.timings = msg.finish_reason, msg.timings
        elif kind == "Error":
            result.error = msg

    def wait(self, *request_ids: str, timeout: float = 60.0) -> list[Result]:
        deadline = time.monotonic() + timeout
        while not all(self.results[r].done for r in request_ids):
            if time.monotonic() > deadline:
                pending = [r for r in request_ids if not self.results[r].done]
                raise TimeoutError(f"requests {pending} not done in {timeout}s")
            self.pump(0.1)
        return [self.results[r] for r in request_ids]

    def wait_tokens(self, request_id: str, n: int, timeout: float = 30.0) -> Result:
        deadline = time.monotonic() + timeout
        result = self.results[request_id]
        while len(result.token_ids) < n and not result.done:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{request_id}: {len(result.token_ids)} of {n} tokens in {timeout}s")
            self.pump(0.1)
        return result

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(0)
        self.ctx.term()


def hf_greedy(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Transformers' own greedy continuation (manual loop, its KV cache, never stops early)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            step = model(input_ids=torch.tensor([prompt]), use_cache=True)
            generated = []
            for _ in range(max_tokens):
                token = int(step.logits[0, -1].argmax())
                generated.append(token)
                step = model(
                    input_ids=torch.tensor([[token]]), past_key_values=step.past_key_values, use_cache=True
                )
            out.append(generated)
    return out


def assert_blocks_balanced(node: NodeProcess, used: int | None = 0) -> dict:
    b = node.blocks()
    assert b["free"] + b["used"] + b["cached"] == b["total"], b
    if used is not None:
        assert b["used"] == used, b
    return b


@pytest.fixture
def proxy():
    """A FakeProxy for one test (import this fixture into the test module)."""
    p = FakeProxy()
    yield p
    p.close()


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 500) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def nodes(model_dir, tmp_path_factory):
    """A prefill node (chunked prefill: 32 tokens a step) and a decode node, KV over tcp; one pair per
    module."""
    logs = str(tmp_path_factory.mktemp("node-logs"))
    with prefill_decode_pair(model_dir, logs, prefill_extra=["--max-num-batched-tokens", "32"]) as pair:
        yield pair
