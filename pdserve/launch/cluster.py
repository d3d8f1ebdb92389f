"""`pdserve up`: a whole local cluster (N prefill nodes, M decode nodes, one proxy) as separate processes.

    pdserve up --prefill 1 --decode 1 [--model DIR|ORG/NAME] [--redis-url URL] [--port 8000] [--host HOST]

Steps:
 1. Without --model, write the tiny random-weight Llama (tools.make_model) into a temporary folder. A hub id
    (org/name) is resolved here, once, to its folder in the local Hugging Face cache; children get the folder.
 2. Place the nodes: CPU when no GPU is visible; on one GPU every node shares it (--gpu-memory-utilization
    split between them); with several GPUs nodes get their own, round robin. On GPUs KV moves over cuda_ipc
    (one-sided writes into the decode node's mapped cache): each node's CUDA_VISIBLE_DEVICES lists its own GPU
    first (it is cuda:0 there) and then every other GPU of the cluster, so a prefill node can map a decode
    node's memory. With --prefill-tp / --decode-tp N a node's N ranks get N GPUs of their own (its first N
    visible ones), and too few GPUs is refused (unless PDSERVE_TP_BACKEND=gloo, which runs a node's ranks on
    one GPU, for tests); on CPU its ranks are processes.
 3. Make one frame-signing secret (handed to children in $PDSERVE_KV_SECRET, never on a command line), start
    the nodes on port 0 (each reports what it bound in its ready line: picking "free" ports here and binding
    them there raced with other processes' ephemeral ports), then the proxy pointing at every node's events
    port.
 4. Wait until every node's /health and the proxy's /health (all nodes live) answer 200, then print the URL
    (and, with --state-file, write a JSON description: urls, pids, ports, logs).
 5. Supervise until Ctrl-C or SIGTERM, then drain: SIGTERM the proxy (it stops accepting, lets open
    streams finish), then the nodes (each finishes what it holds, frees every block), each within
    --shutdown-timeout, SIGKILL only after that. A node that exits, or whose /health says its engine broke
    (a tensor-parallel rank died), is reported and started again on the same ports after a doubling backoff,
    at most --max-restarts times (launch/node_restarts.py); meanwhile the proxy routes around it. Children get
    PR_SET_PDEATHSIG, so even a `kill -9` of `pdserve up` takes them down.
Each process logs to its own file under --log-dir (default: a temporary folder, printed), fresh each run (the
previous run's file is kept as *.log.prev), so only this run's ready lines are ever read. The API key reaches
the proxy in $PDSERVE_API_KEY, never on its command line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

from pdserve.launch.gpus import own_gpus_first, visible_gpus
from pdserve.launch.node_restarts import NodeRestarts, failed_health, health_due, pinned_ports
from pdserve.node_runtime.node_cli import READY_LINE
from pdserve.wire.errors import ConfigError, PdserveError
from pdserve.wire.model_source import resolve_model_flag
from pdserve.wire.node_messages import NodeRole


@dataclass
class Child:
    name: str  # prefill-0, decode-1, proxy
    role: str  # prefill | decode | proxy
    argv: list[str]
    env: dict
    log_path: str
    http: str  # base URL of /health
    events: str = ""  # nodes: events endpoint
    rpc: str = ""
    gpu: str = ""
    restarts: int = 0
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)

    def describe(self) -> dict:
        keys = ("name", "role", "log_path", "http", "events", "rpc", "gpu", "restarts")
        d = {k: getattr(self, k) for k in keys}
        d["pid"] = self.proc.pid if self.proc else None
        return d


def read_ready_line(child: Child) -> bool:
    """Fill a node's endpoints from the ready line in its log; False until it has printed one."""
    try:
        with open(child.log_path, errors="replace") as f:
            match = READY_LINE.search(f.read())
    except OSError:
        return False
    if match:
        child.rpc, child.events, child.http = match.groups()
    return bool(match)


def _set_pdeathsig() -> None:
    """In the child, before exec: die with SIGTERM when the parent dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the parent's own cleanup still runs
        pass


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Cluster:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.children: list[Child] = []
        self.tmp_model: Optional[str] = None
        self.log_dir = args.log_dir or tempfile.mkdtemp(prefix="pdserve-up-")
        os.makedirs(self.log_dir, exist_ok=True)
        self.secret = args.kv_secret or os.environ.get("PDSERVE_KV_SECRET") or secrets.token_hex(32)
        self.stopping = False

    # ---- 1. model ------------------------------------------------------------------------------------------
    def model(self) -> str:
        if self.args.model:
            # Resolved once, here: every child gets the snapshot folder (the same one, even if the cache's
            # refs move meanwhile), and a hub id is the served name unless --served-model-name gives one.
            resolve_model_flag(self.args)
            if not os.path.isdir(self.args.model):
                raise ConfigError(f"--model {self.args.model!r} is not a folder")
            return self.args.model
        from pdserve.tools.make_model import make_model

        self.tmp_model = tempfile.mkdtemp(prefix="pdserve-tiny-llama-")
        print(
            f"pdserve up: no --model given; writing the tiny random-weight llama to {self.tmp_model}",
            flush=True,
        )
        make_model(self.tmp_model, family="llama", preset="tiny")
        return self.tmp_model

    # ---- 2. placement --------------------------------------------------------------------------------------
    def placement(self, sizes: list[int]) -> tuple[list[list[str]], str, float]:
        """sizes: each node's TP size -> (GPUs per node, [] on CPU), kv connector, gpu memory utilization
        per node."""
        a = self.args
        gpus = [] if a.device == "cpu" else visible_gpus()
        # a node's ranks on GPUs of their own, unless gloo is asked for (it lets ranks share one GPU)
        parallel = max(sizes, default=1) > 1 and os.environ.get("PDSERVE_TP_BACKEND") != "gloo"
        if not gpus:
            if a.device.startswith("cuda"):
                raise ConfigError("--device cuda asked for, but no GPU is visible")
            return [[] for _ in sizes], a.kv_connector if a.kv_connector != "auto" else "tcp", 0.0
        if parallel:
            need = sum(sizes)
            if need > len(gpus):
                raise ConfigError(
                    f"--prefill {a.prefill} --prefill-tp {a.prefill_tp} --decode {a.decode} --decode-tp "
                    f"{a.decode_tp} needs {need} GPUs (one per rank), {len(gpus)} visible"
                )
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            assigned = [gpus[start : start + n] for start, n in zip(starts, sizes, strict=True)]
        else:
            assigned = [[gpus[i % len(gpus)]] for i in range(len(sizes))]
        # processes per GPU: a node's ranks share its GPU when they do not get GPUs of their own
        per_gpu = max(
            sum(
                n if not parallel and own[0] == g else own.count(g)
                for own, n in zip(assigned, sizes, strict=True)
            )
            for g in gpus
        )
        connector = a.kv_connector if a.kv_connector != "auto" else "cuda_ipc"
        util = a.gpu_memory_utilization or round(0.85 / max(per_gpu, 1), 3)
        return assigned, connector, util

    # ---- 3. processes --------------------------------------------------------------------------------------
    def plan(self, model: str) -> None:
        a, host = self.args, self.args.host
        prefill, decode = NodeRole.PREFILL.value, NodeRole.DECODE.value
        roles = [prefill] * a.prefill + [decode] * a.decode
        sizes = [a.prefill_tp if role == prefill else a.decode_tp for role in roles]
        placed, connector, util = self.placement(sizes)
        gpus = [g for node in placed for g in node]
        self.connector = connector
        base_env = dict(os.environ, PDSERVE_KV_SECRET=self.secret, PYTHONUNBUFFERED="1")
        base_env.pop("PDSERVE_API_KEY", None)  # only the proxy gets it
        if a.curve:
            base_env["PDSERVE_CURVE"] = "1"  # wire/curve.py: every ZMQ socket encrypted
        counts = {prefill: 0, decode: 0}
        # The tiny model lives in a temporary folder; give it a stable name clients can use.
        served_names = list(a.served_model_name) or (["tiny-llama"] if self.tmp_model else [])
        for role, own, tp in zip(roles, placed, sizes, strict=True):
            name = f"{role}-{counts[role]}"
            counts[role] += 1
            kv_role = "kv_producer" if role == prefill else "kv_consumer"
            argv = [
                sys.executable,
                "-m",
                "pdserve.launch.cli",
                "--log-level",
                a.log_level_children,
                role,
                "--model",
                model,
                "--host",
                host,
                "--rpc-port",
                "0",
                "--events-port",
                "0",
                "--http-port",
                "0",
                "--node-id",
                name,
                "--block-size",
                str(a.block_size),
                "--tensor-parallel-size",
                str(tp),
                "--kv-transfer-config",
                json.dumps({"kv_connector": connector, "kv_role": kv_role, "kv_ip": host}),
            ]
            env = dict(base_env)
            gpu = ",".join(own)
            if own:
                env["CUDA_VISIBLE_DEVICES"] = own_gpus_first(own, gpus)
                argv += ["--device", "cuda:0", "--gpu-memory-utilization", str(util)]
            else:
                argv += ["--device", "cpu"]
                env.setdefault("CUDA_VISIBLE_DEVICES", "")
            if a.max_model_len:
                argv += ["--max-model-len", str(a.max_model_len)]
            if served_names:
                argv += ["--served-model-name", *served_names]
            argv += ["--shutdown-timeout", str(a.shutdown_timeout)]
            argv += a.node_arg
            self.children.append(
                Child(name, role, argv, env, os.path.join(self.log_dir, f"{name}.log"), http="", gpu=gpu)
            )  # endpoints come from its ready line
        proxy_argv = [
            sys.executable,
            "-m",
            "pdserve.launch.cli",
            "--log-level",
            a.log_level_children,
            "proxy",
            "--model",
            model,
            "--host",
            host,
            "--port",
            str(a.port),
            "--routing",
            a.routing,
        ]
        if a.redis_url:
            proxy_argv += ["--redis-url", a.redis_url]
        if served_names:
            proxy_argv += ["--served-model-name", *served_names]
        proxy_argv += ["--shutdown-timeout", str(a.shutdown_timeout)]
        if a.max_model_len:
            proxy_argv += ["--max-model-len", str(a.max_model_len)]
        if a.log_routing:
            proxy_argv.append("--log-routing")
        proxy_argv += a.proxy_arg
        # The API key goes in the proxy's environment: an argv is readable by every user (ps,
        # /proc/*/cmdline).
        proxy_env = dict(base_env, CUDA_VISIBLE_DEVICES="", PDSERVE_API_KEY=a.api_key)
        self.children.append(
            Child(
                "proxy",
                "proxy",
                proxy_argv,
                proxy_env,
                os.path.join(self.log_dir, "proxy.log"),
                f"http://{host}:{a.port}",
            )
        )

    def spawn(self, child: Child) -> None:
        # A fresh log per run: a reused --log-dir held the last run's ready line, which was read first and
        # pointed at ports nobody listens on any more. The previous run's log is kept beside it as *.log.prev.
        if os.path.exists(child.log_path):
            os.replace(child.log_path, child.log_path + ".prev")
        log = open(child.log_path, "wb", buffering=0)
        child.proc = subprocess.Popen(
            child.argv,
            env=child.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_set_pdeathsig,
        )
        log.close()

    # ---- 4. readiness --------------------------------------------------------------------------------------
    def wait_healthy(self, children: list[Child], timeout_s: float, proxy: bool = False) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(children)
        while pending:
            for c in list(pending):
                if c.proc.poll() is not None:
                    raise PdserveError(
                        f"{c.name} exited with status {c.proc.returncode} while starting; its log "
                        f"({c.log_path}) ends with:\n{tail(c.log_path)}"
                    )
                if not c.http and not read_ready_line(c):
                    continue
                if _healthy(c.http + "/health") and (not proxy or self._proxy_sees_all(c)):
                    pending.remove(c)
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise PdserveError(f"{names} not healthy after {timeout_s:g}s; logs are in {self.log_dir}")
            if pending:
                time.sleep(0.2)

    def _proxy_sees_all(self, proxy: Child) -> bool:
        try:
            with urllib.request.urlopen(proxy.http + "/health", timeout=2) as r:
                return json.load(r).get("live_nodes", 0) >= len(self.children) - 1
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def describe(self) -> dict:
        proxy = self.children[-1]
        return {
            "url": proxy.http,
            "openai_base_url": proxy.http + "/v1",
            "log_dir": self.log_dir,
            "model": self.model_dir,
            "kv_connector": self.connector,
            "pid": os.getpid(),
            "nodes": [c.describe() for c in self.children[:-1]],
            "proxy": proxy.describe(),
        }

    # ---- 5. run and stop -----------------------------------------------------------------------------------
    def run(self) -> int:
        self.model_dir = self.model()
        self.plan(self.model_dir)
        nodes, proxy = self.children[:-1], self.children[-1]
        print(
            f"pdserve up: starting {self.args.prefill} prefill + {self.args.decode} decode node(s) "
            f"(kv over {self.connector}); logs in {self.log_dir}",
            flush=True,
        )
        for c in nodes:
            self.spawn(c)
        self.wait_healthy(nodes, self.args.startup_timeout)
        for c in nodes:  # known only now: each node reported what it bound
            proxy.argv += ["--node", c.events]
        self.spawn(proxy)
        self.wait_healthy([proxy], self.args.startup_timeout, proxy=True)
        self.write_state()
        for c in nodes:
            print(
                f"  {c.name:<10} rpc {c.rpc}  events {c.events}  http {c.http}"
                + (f"  gpu {c.gpu}" if c.gpu else ""),
                flush=True,
            )
        name = (
            self.args.served_model_name
            or ["tiny-llama" if self.tmp_model else os.path.basename(self.model_dir)]
        )[0]
        print(
            f"pdserve up: ready. OpenAI API at {proxy.http}/v1 (model {name}); Ctrl-C stops everything",
            flush=True,
        )
        self.supervise()
        return 0

    def write_state(self) -> None:
        if self.args.state_file:
            tmp = self.args.state_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.describe(), f, indent=2)
            os.replace(tmp, self.args.state_file)

    def supervise(self) -> None:
        nodes, proxy = self.children[:-1], self.children[-1]
        watch = {c.name: NodeRestarts(self.args.max_restarts) for c in nodes}
        while not self.stopping:
            if proxy.proc.poll() is not None:
                print(
                    f"pdserve up: the proxy exited with status {proxy.proc.returncode}; stopping the cluster",
                    flush=True,
                )
                return
            for c in nodes:
                self._watch_node(c, watch[c.name])
            time.sleep(0.2)

    def _watch_node(self, c: Child, state: NodeRestarts) -> None:
        """Restart a failed node when its backoff is over; find out whether it failed."""
        if state.given_up:
            return
        if state.due is not None:
            if time.monotonic() >= state.due:
                state.due = None
                c.restarts = state.restarts
                c.argv = pinned_ports(c.argv, {"rpc": c.rpc, "events": c.events, "http": c.http})
                self.spawn(c)
                print(
                    f"pdserve up: {c.name} restarted (pid {c.proc.pid}, restart {state.restarts} of "
                    f"{state.limit})",
                    flush=True,
                )
                self.write_state()
            return
        why = None
        if c.proc.poll() == 0:  # it stopped as asked (SIGTERM drains a node, then it exits 0): leave it
            state.given_up = True
            print(f"pdserve up: {c.name} (pid {c.proc.pid}) exited with status 0; not restarted", flush=True)
            return
        if c.proc.poll() is not None:
            why = f"exited with status {c.proc.returncode}"
        elif health_due(state):
            broken = failed_health(c.http)
            if broken:
                why = f"is unhealthy ({broken})"
                c.proc.kill()
                c.proc.wait()
        if why is None:
            return
        delay = state.schedule(time.monotonic())
        if delay is None:
            print(
                f"pdserve up: {c.name} (pid {c.proc.pid}) {why}; left dead after {state.limit} restart(s)",
                flush=True,
            )
        else:
            print(f"pdserve up: {c.name} (pid {c.proc.pid}) {why}; restarting it in {delay:g} s", flush=True)

    def stop(self) -> None:
        """Drain, then stop: the proxy first (no new work reaches the nodes; its open streams finish), then
        the nodes (each finishes what it still holds); each stage gets --shutdown-timeout plus a margin, then
        SIGKILL."""
        self.stopping = True
        grace = self.args.shutdown_timeout + 5.0
        proxy = [c for c in self.children if c.role == "proxy"]
        nodes = [c for c in self.children if c.role != "proxy"]
        for stage in (proxy, nodes):
            live = [c for c in stage if c.proc is not None and c.proc.poll() is None]
            for c in live:
                try:
                    c.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            for c in live:
                try:
                    c.proc.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    print(f"pdserve up: {c.name} did not stop within {grace:g}s; killing it", flush=True)
                    c.proc.kill()
                    c.proc.wait()
        if self.tmp_model:
            shutil.rmtree(self.tmp_model, ignore_errors=True)
        if self.args.state_file and os.path.exists(self.args.state_file):
            os.remove(self.args.state_file)


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def run(args: argparse.Namespace) -> int:
    if args.prefill < 0 or args.decode < 1:
        raise ConfigError("--decode must be >= 1 and --prefill >= 0")
    if args.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.prefill_tp < 1 or args.decode_tp < 1:
        raise ConfigError("--prefill-tp and --decode-tp must be >= 1")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    cluster = Cluster(args)

    def on_signal(signum, frame):
        cluster.stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return cluster.run()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("pdserve up: stopping", flush=True)
        cluster.stop()
        print("pdserve up: stopped", flush=True)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "up",
        help="start a local cluster: proxy + prefill and decode nodes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--prefill", type=int, default=1, help="prefill nodes (0: decode nodes prefill themselves)"
    )
    p.add_argument("--decode", type=int, default=1, help="decode nodes")
    p.add_argument("--prefill-tp", type=int, default=1, help="tensor-parallel ranks (GPUs) per prefill node")
    p.add_argument("--decode-tp", type=int, default=1, help="tensor-parallel ranks (GPUs) per decode node")
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="times a failed node is started again (doubling backoff from 1 s); 0: leave it dead",
    )
    p.add_argument(
        "--model",
        default=None,
        help="the checkpoint: a folder or a Hugging Face hub id in the local cache (org/name; offline); "
        "default: write the tiny llama",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="the proxy's port")
    p.add_argument("--redis-url", default="", help="keep the proxy's prefix index in Redis")
    p.add_argument("--routing", default="cache_aware", choices=["cache_aware", "round_robin"])
    p.add_argument("--log-routing", action="store_true")
    p.add_argument(
        "--api-key",
        default=os.environ.get("PDSERVE_API_KEY", ""),
        help="the proxy's API key (default: $PDSERVE_API_KEY; the proxy gets it in its environment)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=[],
        metavar="NAME",
        help="the model's name(s), for every process (default: the --model folder's name, or the hub id "
        "as given)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on stop, seconds the proxy and then each node get to finish what they hold (drain)",
    )
    p.add_argument("--max-model-len", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto (GPUs when visible), cpu or cuda")
    p.add_argument(
        "--kv-connector",
        default="auto",
        choices=["auto", "tcp", "cuda_ipc", "nixl"],
        help="auto: cuda_ipc on GPUs (one host; nixl for NIXL/UCX, e.g. RDMA across hosts), tcp on CPU",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.0,
        help="per node (default: 0.85 split among the nodes sharing a GPU)",
    )
    p.add_argument(
        "--kv-secret", default=None, help="frame-signing secret (default: $PDSERVE_KV_SECRET or random)"
    )
    p.add_argument(
        "--node-arg",
        action="append",
        default=[],
        help="extra flag for every node (repeatable), e.g. --node-arg=--max-num-seqs=64",
    )
    p.add_argument("--proxy-arg", action="append", default=[], help="extra flag for the proxy (repeatable)")
    p.add_argument(
        "--curve",
        action="store_true",
        help="encrypt node RPC and events sockets with ZMQ CURVE (keys derived from the secret)",
    )
    p.add_argument("--log-dir", default="", help="per-process logs (default: a temporary folder)")
    p.add_argument("--log-level-children", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--state-file", default="", help="write the cluster's description (JSON) here once ready")
    p.set_defaults(func=run)
