"""Fixtures for the proxy's tests and the end-to-end tests: free ports, a real Redis server, a scripted fake
node (real ZMQ sockets, real signed frames: the proxy cannot tell it from a node), the proxy app under a real
uvicorn, and `pdserve up` clusters of real processes.

Every process and thread started here is stopped in the fixture's teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import msgpack
import pytest
import zmq

from wire.hashing import external_block_hash, hash_prompt_blocks
from wire.kv_events import BlockRemoved, BlockStored, KVEventBatch, encode_batch
from wire.node_messages import (
    TOPIC_HEARTBEAT,
    TOPIC_KV_EVENTS,
    Abort,
    Error,
    Generate,
    Tokens,
    make_codec,
)

SECRET = b"pdserve-test-secret"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    pred: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ---------------------------------------------------------------------------------------------------- redis


@dataclass
class RedisServer:
    port: int
    proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (make redis / apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        wait_for(lambda: _ping(client), 10, what=f"redis-server on {self.port}")
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)


def _ping(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture
def redis_server():
    server = RedisServer(free_port()).start()
    try:
        yield server
    finally:
        server.stop()


# -------------------------------------------------------------------------------------------------- fake node


@dataclass
class Script:
    """How a FakeNode answers a Generate."""

    tokens: Optional[list[int]] = None  # None: max_tokens ids counting up from 300
    delay_s: float = 0.0  # between token messages
    error: Optional[tuple[int, str, bool]] = None  # (status, message, retryable) instead of tokens
    hang: bool = False  # never answer
    cached_tokens: int = 0
    finish_reason: str = "length"
    per_message: int = 1  # tokens per Tokens message


class FakeNode:
    """A node on real sockets: ROUTER rpc + PUB events, heartbeats, scripted token streams, recorded
    messages."""

    def __init__(
        self,
        node_id: str,
        role: str = "decode",
        block_size: int = 16,
        total_blocks: int = 1000,
        heartbeat_s: float = 0.1,
        secret: bytes = SECRET,
    ):
        self.node_id, self.role, self.block_size = node_id, role, block_size
        self.total_blocks, self.free_blocks = total_blocks, total_blocks
        self.heartbeat_s = heartbeat_s
        self.codec = make_codec(secret)
        self.script = Script()
        self.scripts: dict[str, Script] = {}  # per request id prefix
        self.received: list = []  # decoded messages, in order
        self.num_waiting = 0
        self.beating = True
        self._stop = threading.Event()
        self._outbox: list = []
        self._lock = threading.Lock()
        self._seq = {TOPIC_HEARTBEAT: 0, TOPIC_KV_EVENTS: 0}
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.rpc_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.events_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.active: dict[str, bool] = {}  # request id -> still streaming
        self.thread = threading.Thread(target=self._run, name=f"fake-{node_id}", daemon=True)

    @property
    def rpc(self) -> str:
        return f"tcp://127.0.0.1:{self.rpc_port}"

    @property
    def events(self) -> str:
        return f"tcp://127.0.0.1:{self.events_port}"

    def start(self) -> "FakeNode":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.router.close(0)
        self.pub.close(0)
        self.ctx.term()

    # ---- test controls -------------------------------------------------------------------------------------
    def store_prompt(self, token_ids: list[int]) -> list[int]:
        """Publish BlockStored for the prompt's full blocks; returns their external hashes."""
        hashes = [external_block_hash(h) for h in hash_prompt_blocks(token_ids, self.block_size)]
        n = len(hashes) * self.block_size
        ev = BlockStored(
            block_hashes=hashes,
            parent_block_hash=None,
            token_ids=list(token_ids[:n]),
            block_size=self.block_size,
        )
        self.publish_events([ev])
        return hashes

    def remove_blocks(self, hashes: list[int]) -> None:
        self.publish_events([BlockRemoved(block_hashes=hashes)])

    def publish_events(self, events: list) -> None:
        with self._lock:
            self._outbox.append(
                ("pub", TOPIC_KV_EVENTS, encode_batch(KVEventBatch(ts=time.time(), events=events)))
            )

    def messages(self, kind) -> list:
        return [m for m in list(self.received) if isinstance(m, kind)]

    # ---- loop ----------------------------------------------------------------------------------------------
    def _heartbeat(self) -> bytes:
        return msgpack.packb(
            {
                "node_id": self.node_id,
                "role": self.role,
                "rpc": self.rpc,
                "http": "http://127.0.0.1:1",
                "num_waiting": self.num_waiting,
                "num_running": sum(self.active.values()),
                "free_blocks": self.free_blocks,
                "total_blocks": self.total_blocks,
                "block_size": self.block_size,
                "ts": time.time(),
            }
        )

    def _publish(self, topic: bytes, payload: bytes) -> None:
        seq = self._seq[topic]
        self._seq[topic] = seq + 1
        self.pub.send_multipart([topic, seq.to_bytes(8, "big"), payload])

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        next_beat = 0.0
        timers: list[tuple[float, bytes, object]] = []  # (due, identity, message)
        while not self._stop.is_set():
            now = time.monotonic()
            if self.beating and now >= next_beat:
                self._publish(TOPIC_HEARTBEAT, self._heartbeat())
                next_beat = now + self.heartbeat_s
            with self._lock:
                out, self._outbox = self._outbox, []
            for _kind, topic, payload in out:
                self._publish(topic, payload)
            due = [t for t in timers if t[0] <= now]
            timers = [t for t in timers if t[0] > now]
            for _, identity, msg in due:
                if isinstance(msg, Tokens) and not self.active.get(msg.request_id, False):
                    continue  # aborted meanwhile
                if isinstance(msg, Tokens) and msg.finished:
                    self.active[msg.request_id] = False
                self.router.send_multipart(
                    [identity, self.codec.encode_bytes(msg, context=b"to:" + identity)]
                )
            if dict(poller.poll(10)):
                while True:
                    try:
                        parts = self.router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    identity, frame = parts[0], parts[-1]
                    try:
                        msg, _ = self.codec.decode_bytes(frame, context=b"from:" + identity)
                    except Exception as exc:  # noqa: BLE001
                        self.received.append(exc)
                        continue
                    self.received.append(msg)
                    timers.extend(self._answer(identity, msg, time.monotonic()))

    def _script_for(self, request_id: str) -> Script:
        for prefix, script in self.scripts.items():
            if request_id.startswith(prefix):
                return script
        return self.script

    def _answer(self, identity: bytes, msg, now: float) -> list:
        if isinstance(msg, Abort):
            if self.active.get(msg.request_id):
                self.active[msg.request_id] = False
                return [
                    (
                        now,
                        identity,
                        Tokens(request_id=msg.request_id, token_ids=[], finished=True, finish_reason="abort"),
                    )
                ]
            return []
        if not isinstance(msg, Generate):
            return []
        script = self._script_for(msg.request_id)
        if script.hang:
            self.active[msg.request_id] = True
            return []
        if script.error is not None:
            status, text, retryable = script.error
            return [
                (
                    now,
                    identity,
                    Error(request_id=msg.request_id, status=status, message=text, retryable=retryable),
                )
            ]
        self.active[msg.request_id] = True
        params = msg.params
        max_tokens = params.get("max_tokens") or 16
        tokens = list(script.tokens) if script.tokens is not None else [300 + i for i in range(max_tokens)]
        tokens = tokens[:max_tokens]
        seed = params.get("seed")
        if seed is not None and script.tokens is None:
            tokens = [300 + (seed * 7 + i) % 200 for i in range(len(tokens))]
        want = params.get("logprobs")
        out, t = [], now
        for start in range(0, len(tokens), script.per_message):
            chunk = tokens[start : start + script.per_message]
            last = start + script.per_message >= len(tokens)
            lps = None
            if want is not None:
                lps = [[[tid, tid + 1][:want], [-0.5, -1.5][:want], -0.5, 1] for tid in chunk]
            t += script.delay_s
            out.append(
                (
                    t,
                    identity,
                    Tokens(
                        request_id=msg.request_id,
                        token_ids=chunk,
                        logprobs=lps,
                        finished=last,
                        finish_reason=(script.finish_reason if len(tokens) < max_tokens else "length")
                        if last
                        else None,
                        num_cached_tokens=script.cached_tokens,
                        timings={
                            "prefill_queue": 0.001,
                            "prefill": 0.002,
                            "transfer": 0.003,
                            "exposed_transfer": 0.0005,
                            "decode_queue": 0.0001,
                        }
                        if last
                        else None,
                    ),
                )
            )
        return out


@pytest.fixture
def fake_nodes():
    made: list[FakeNode] = []

    def make(node_id: str, role: str = "decode", **kw) -> FakeNode:
        node = FakeNode(node_id, role, **kw).start()
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            node.stop()


# -------------------------------------------------------------------------------------------------- proxy app


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """A torch-free model folder: the real tokenizer files make-model writes, and a config.json."""
    from tools.make_tokenizer import write_tokenizer_files

    path = tmp_path_factory.mktemp("tok-model")
    write_tokenizer_files(str(path), vocab_size=1024, family="llama", model_max_length=256)
    with open(path / "config.json", "w") as f:
        json.dump({"max_position_embeddings": 256, "eos_token_id": 1, "vocab_size": 1024}, f)
    return str(path)


class ProxyServer:
    """The proxy app under a real uvicorn on a free port, in a thread of the test process."""

    def __init__(self, config):
        import uvicorn

        from proxy.app import create_app

        self.app = create_app(config)
        self.port = config.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                access_log=False,
                lifespan="on",
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="proxy-uvicorn", daemon=True)

    @property
    def state(self):
        return self.app.state.proxy

    def start(self) -> "ProxyServer":
        self.thread.start()
        wait_for(lambda: self.server.started, 15, what="uvicorn start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def call(self, coro_fn, timeout: float = 5.0):
        """Run a coroutine on the server's event loop (to inspect the index, for example)."""
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.state.loop).result(timeout)

    def wait_nodes(self, n: int, timeout: float = 10.0) -> None:
        wait_for(lambda: len(self.state.registry.live()) >= n, timeout, what=f"{n} live nodes")


@pytest.fixture
def proxy_factory(tokenizer_dir, monkeypatch):
    from proxy.config import ProxyConfig, RouterConfig

    made: list[ProxyServer] = []
    monkeypatch.setenv("PDSERVE_KV_SECRET", SECRET.decode())

    def make(nodes=(), **kw) -> ProxyServer:
        router = RouterConfig(**kw.pop("router", {}))
        config = ProxyConfig(
            model=kw.pop("model", tokenizer_dir),
            port=free_port(),
            node_events=tuple(n.events if isinstance(n, FakeNode) else n for n in nodes),
            kv_secret=SECRET.decode(),
            router=router,
            **kw,
        )
        server = ProxyServer(config).start()
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()


# ---------------------------------------------------------------------------------------------- real clusters


def nodes_missing() -> Optional[str]:
    import importlib.util

    for name in ("prefill_node.cli", "decode_node.cli", "node_runtime.node_server"):
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ModuleNotFoundError:
            return name
    return None


_missing = nodes_missing()
needs_nodes = pytest.mark.skipif(
    _missing is not None, reason=f"the node packages are not there yet ({_missing} is missing)"
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The checkpoint `pdserve up` writes without --model: the tiny random-weight llama."""
    from tools.make_model import make_model

    path = str(tmp_path_factory.mktemp("up-model") / "tiny-llama")
    make_model(path, family="llama", preset="tiny")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    """The tiny model's tokenizer, as the proxy and the nodes load it."""
    from wire.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model)


def module_cluster(tmp_path_factory, tiny_model, name: str, prefill: int = 1, decode: int = 1):
    """A module's own `pdserve up` cluster, for a module-scoped fixture: started, yielded, stopped."""
    c = UpCluster(tmp_path_factory.mktemp(name), tiny_model, prefill, decode)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def hf_reference(tiny_model):
    """greedy(prompt_ids, n) -> the n token ids transformers' greedy decoding continues with (EOS ignored)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    cache: dict = {}

    def greedy(prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in cache:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([prompt]), use_cache=True)
                ids = []
                for _ in range(n):
                    token = int(out.logits[0, -1].argmax())
                    ids.append(token)
                    out = model(
                        input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
                    )
            cache[key] = ids
        return list(cache[key])

    return greedy


class UpCluster:
    """`pdserve up` in a subprocess; `info` is its --state-file. stop() checks that every process is gone."""

    def __init__(self, tmp, model: str, prefill: int, decode: int, args: tuple = (), timeout_s: float = 300):
        tmp.mkdir(parents=True, exist_ok=True)
        self.state_file = str(tmp / "cluster.json")
        self.log_dir = str(tmp / "logs")
        self.out_path = str(tmp / "up.out")
        port = free_port()
        from launch.up_process import up_command

        argv = up_command(prefill, decode, model, port, self.state_file, self.log_dir, "--log-routing", *args)
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(self.state_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(check=False)
                raise AssertionError(f"pdserve up did not come up:\n{self.output()}")
            time.sleep(0.2)
        with open(self.state_file) as f:
            self.info = json.load(f)
        self.pids = [n["pid"] for n in self.info["nodes"]] + [self.info["proxy"]["pid"]]

    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def base_url(self) -> str:
        return self.info["openai_base_url"]

    def node(self, name: str) -> dict:
        return next(n for n in self.info["nodes"] if n["name"] == name)

    def node_health(self, name: str) -> dict:
        import httpx

        return httpx.get(self.node(name)["http"] + "/health", timeout=5).json()

    def node_metrics(self, name: str) -> str:
        import httpx

        return httpx.get(self.node(name)["http"] + "/metrics", timeout=5).text

    def kill9(self, name: str) -> None:
        os.kill(self.node(name)["pid"], signal.SIGKILL)

    def signal(self, name: str, sig) -> None:
        os.kill(self.node(name)["pid"], sig)

    def proxy_log(self) -> str:
        with open(self.info["proxy"]["log_path"], errors="replace") as f:
            return f.read()

    def output(self) -> str:
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def stop(self, check: bool = True) -> None:
        from launch.up_process import stop_up_process

        stop_up_process(self.proc)
        if not check:
            return
        deadline = time.monotonic() + 15
        alive = [p for p in getattr(self, "pids", []) if _alive(p)]
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in alive if _alive(p)]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not alive, f"processes left running after pdserve up stopped: {alive}"


@contextlib.contextmanager
def running(cluster: UpCluster):
    """Yield the cluster, stop it however the block ends (a module-scoped fixture's body)."""
    try:
        yield cluster
    finally:
        cluster.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def up_cluster(tmp_path, tiny_model):
    made: list[UpCluster] = []

    def make(prefill: int = 1, decode: int = 1, *args: str) -> UpCluster:
        cluster = UpCluster(tmp_path / f"c{len(made)}", tiny_model, prefill, decode, args)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for c in made:
            c.stop()
