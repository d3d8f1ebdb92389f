"""Fixtures for the proxy's tests and the end-to-end tests: free ports, a real Redis server, the proxy app
under a real uvicorn, and `pdserve up` clusters of real processes (the scripted fake node: fake_node.py).

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

import pytest

SECRET = b"pdserve-test-secret"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM, and SIGKILL if it has not exited after grace_s; waits for it either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
        if self.proc is not None:
            stop_process(self.proc, 5)
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


# -------------------------------------------------------------------------------------------------- proxy app


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """A torch-free model folder: the real tokenizer files make-model writes, and a config.json."""
    from pdserve.tools.make_tokenizer import write_tokenizer_files

    path = tmp_path_factory.mktemp("tok-model")
    write_tokenizer_files(str(path), vocab_size=1024, family="llama", model_max_length=256)
    with open(path / "config.json", "w") as f:
        json.dump({"max_position_embeddings": 256, "eos_token_id": 1, "vocab_size": 1024}, f)
    return str(path)


class ProxyServer:
    """The proxy app under a real uvicorn on a free port, in a thread of the test process."""

    def __init__(self, config):
        import uvicorn

        from pdserve.proxy.app import create_app

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
    from pdserve.proxy.config import ProxyConfig, RouterConfig

    made: list[ProxyServer] = []
    monkeypatch.setenv("PDSERVE_KV_SECRET", SECRET.decode())

    def make(nodes=(), **kw) -> ProxyServer:
        router = RouterConfig(**kw.pop("router", {}))
        config = ProxyConfig(
            model=kw.pop("model", tokenizer_dir),
            port=free_port(),
            node_events=tuple(getattr(n, "events", n) for n in nodes),  # a FakeNode, or an endpoint
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

    for name in ("pdserve.prefill_node.cli", "pdserve.decode_node.cli", "pdserve.node_runtime.node_server"):
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
    from pdserve.tools.make_model import make_model

    path = str(tmp_path_factory.mktemp("up-model") / "tiny-llama")
    make_model(path, family="llama", preset="tiny")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    """The tiny model's tokenizer, as the proxy and the nodes load it."""
    from pdserve.wire.tokenizer import load_tokenizer

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

    def __init__(
        self,
        tmp,
        model: str,
        prefill: int,
        decode: int,
        args: tuple = (),
        timeout_s: float = 300,
        pdserve: tuple = (sys.executable, "-m", "pdserve"),
        cwd=ROOT,
    ):
        """pdserve and cwd: the command and folder to run it with (another install's, from outside the
        checkout)."""
        tmp.mkdir(parents=True, exist_ok=True)
        self.state_file = str(tmp / "cluster.json")
        self.log_dir = str(tmp / "logs")
        self.out_path = str(tmp / "up.out")
        port = free_port()
        from pdserve.launch.up_process import up_command

        argv = up_command(
            prefill,
            decode,
            model,
            port,
            self.state_file,
            self.log_dir,
            "--log-routing",
            *args,
            pdserve=pdserve,
        )
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(self.state_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(check=False)
                raise AssertionError(f"pdserve up did not come up:\n{self.output()}")
            time.sleep(0.2)
        self.pids: list[int] = []
        self.reload()

    def reload(self) -> dict:
        """Read the state file again (a restarted node has a new pid); every pid seen is checked at stop."""
        with open(self.state_file) as f:
            self.info = json.load(f)
        self.pids += [n["pid"] for n in self.info["nodes"]] + [self.info["proxy"]["pid"]]
        return self.info

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
        from pdserve.launch.up_process import stop_up_process

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
        """A killed node stays dead here (--max-restarts 0), as the fault tests that use it want to see."""
        args = ("--max-restarts", "0", *args)
        cluster = UpCluster(tmp_path / f"c{len(made)}", tiny_model, prefill, decode, args)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for c in made:
            c.stop()
