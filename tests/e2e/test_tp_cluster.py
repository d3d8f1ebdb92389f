"""Tensor parallelism on CPU, with real processes (a node's ranks 1..N-1 are processes it spawns).

 - `pdserve up` 1P1D with prefill TP 2 -> decode TP 1 and prefill TP 1 -> decode TP 2 (KV over tcp, every head
   of a block shipped whatever the TP sizes): the official openai client's greedy completions equal, to the
   token, those of a colocated TP 1 engine (the LLM class), and the decode node received the prompt's whole KV
   from the prefill node (its byte counter against the bytes the prompts' blocks hold).
 - A rank of a TP 2 node killed (SIGKILL) mid-stream, behind a proxy with a second (TP 1) node: the stream
   ends at once with an error naming the rank, the node answers /health 503 with that error, refuses new work
   (retryable 503), holds no block (free + cached == total), and the proxy routes new requests to the other
   node.
 - `pdserve up --prefill-tp 2 --decode-tp 1` starts (the prefill node has its rank-1 process) and serves; the
   placement refuses too few GPUs and gives each rank a GPU of its own.
Every process started here, the ranks' processes included, is checked gone after.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pdserve.wire.errors import ConfigError
from tests.e2e.test_families_cluster import GREEDY, RECEIVED, client_of, expected_kv_bytes, metric
from tests.harness.nodes import FakeProxy, assert_blocks_balanced, start_node, wait_healthy
from tests.harness.servers import SECRET, UpCluster, _alive, needs_nodes, wait_for

pytestmark = [pytest.mark.slow, needs_nodes]

MAX_TOKENS = 12
SENT = 'pdserve_kv_bytes_sent_total{role="producer",transport="tcp"}'
# Distinct from their first words (no shared prefix blocks, so nothing is served from a cache): one short
# prompt (prefilled on the decode node itself), three long enough for several blocks (disaggregated).
PROMPTS = [
    "Hello there",
    "Alpha: " + "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 2,
    "Bravo: " + "A tensor parallel node splits every attention head and every MLP column. " * 4,
    "Charlie: " + "Key value blocks travel from the prefill node to the decode node over tcp. " * 7,
]
UP_PROMPT = "Delta: " + "One completion served by a cluster whose prefill node has two ranks. " * 3
TP_PAIRS = {"p2-d1": (2, 1), "p1-d2": (1, 2)}


# ---------------------------------------------------------------------------------------------------- helpers


def children(pid: int) -> list[int]:
    """The live child processes of pid (from /proc: psutil is not in the venv)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and _alive(int(entry)):
            found.append(int(entry))
    return found


def rank_processes(pid: int) -> list[int]:
    """A node's tensor-parallel ranks 1..N-1: its children started by multiprocessing's spawn (not its
    resource tracker)."""
    ranks = []
    for child in children(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    ranks.append(child)
    return ranks


def assert_gone(pids: list[int], what: str) -> None:
    """Wait for pids to exit; SIGKILL and fail on any left."""
    try:
        wait_for(lambda: not [p for p in pids if _alive(p)], 15, what=f"{what} to exit")
    except AssertionError:
        left = [p for p in pids if _alive(p)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"{what} left running: {left}") from None


def greedy_reference(model_dir: str, prompts: list[str]) -> dict[str, list[int]]:
    """The token ids a colocated TP 1 engine (the LLM class, in this process) continues each prompt with."""
    from pdserve.engine.llm import LLM
    from pdserve.wire.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(model_dir, device="cpu", dtype="float32", block_size=16, kv_cache_memory=16 << 20) as llm:
        outputs = llm.generate(list(prompts), params)
    return {p: list(o.outputs[0].token_ids) for p, o in zip(prompts, outputs, strict=True)}


# -------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference(model_dir):
    return greedy_reference(model_dir, [*PROMPTS, UP_PROMPT])


@pytest.fixture(scope="module")
def tp_clusters(model_dir, tmp_path_factory):
    """Both 1P1D clusters, started side by side: name -> (UpCluster, pids of its nodes' rank processes)."""
    root = tmp_path_factory.mktemp("tp-clusters")

    def start(name: str) -> UpCluster:
        p, d = TP_PAIRS[name]
        args = ("--device", "cpu", "--prefill-tp", str(p), "--decode-tp", str(d), "--startup-timeout", "120")
        return UpCluster(root / name, model_dir, 1, 1, args, timeout_s=150)

    made: dict[str, UpCluster] = {}
    with ThreadPoolExecutor(len(TP_PAIRS)) as pool:
        futures = {name: pool.submit(start, name) for name in TP_PAIRS}
        errors = []
        for name, future in futures.items():
            try:
                made[name] = future.result()
            except Exception as exc:  # noqa: BLE001 - stop what did start, then fail
                errors.append(exc)
    ranks = {name: [r for n in c.info["nodes"] for r in rank_processes(n["pid"])] for name, c in made.items()}
    try:
        if errors:
            raise errors[0]
        yield {name: (made[name], ranks[name]) for name in made}
    finally:
        for cluster in made.values():
            cluster.stop()
        assert_gone([r for pids in ranks.values() for r in pids], "tensor-parallel rank processes")


# --------------------------------------------------------------------------------- 1. TP 2 <-> TP 1 over P/D


@pytest.mark.parametrize("name", list(TP_PAIRS))
def test_pd_across_tp_sizes_equals_colocated_tp1(tp_clusters, reference, model_dir, name):
    cluster, ranks = tp_clusters[name]
    prefill_tp, decode_tp = TP_PAIRS[name]
    prefill, decode = (
        next(n for n in cluster.info["nodes"] if n["role"] == r) for r in ("prefill", "decode")
    )
    # Each TP 2 node runs its rank 1 in a process of its own; a TP 1 node has none.
    assert len(rank_processes(prefill["pid"])) == prefill_tp - 1
    assert len(rank_processes(decode["pid"])) == decode_tp - 1
    assert len(ranks) == 1 and cluster.info["kv_connector"] == "tcp"

    from pdserve.wire.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    client = client_of(cluster)
    model = client.models.list().data[0].id
    received_before = metric(cluster.node_metrics(decode["name"]), RECEIVED)
    sent_before = metric(cluster.node_metrics(prefill["name"]), SENT)
    shipped = 0
    for prompt in PROMPTS:
        raw = client.completions.with_raw_response.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, **GREEDY
        )
        route = raw.headers["x-pdserve-route"]
        choice = raw.parse().choices[0]
        assert choice.token_ids == reference[prompt], (name, prompt, route)
        assert choice.text == tok.decode(reference[prompt])
        n_prompt = len(tok.encode(prompt))
        if n_prompt >= 32:  # the router's disagg_min_tokens
            assert route == f"disaggregated:{prefill['name']}->{decode['name']}", route
            shipped += expected_kv_bytes(model_dir, n_prompt)
        else:
            assert route == f"colocated:{decode['name']}->{decode['name']}", route
    assert shipped > 0
    # Every head of every block (all the prefill node's ranks hold), whatever the split on either side.
    assert metric(cluster.node_metrics(decode["name"]), RECEIVED) - received_before == shipped
    assert metric(cluster.node_metrics(prefill["name"]), SENT) - sent_before == shipped
    for node in (prefill, decode):
        health = cluster.node_health(node["name"])
        assert health["status"] == "ok" and health["num_used_blocks"] == 0, health


# ------------------------------------------------------------------------------ 2. a rank killed mid-request


def test_rank_killed_mid_stream_fails_the_request_and_the_proxy_routes_around(
    model_dir, tmp_path, proxy_factory
):
    from openai import APIConnectionError, APIError

    logs = str(tmp_path)
    secret = ["--kv-secret", SECRET.decode()]  # the in-process proxy's (proxy_factory); the last flag wins
    tp2 = start_node("decode", model_dir, logs, node_id="decode-tp2", extra=["-tp", "2", *secret])
    tp1 = start_node("decode", model_dir, logs, node_id="decode-tp1", extra=secret)
    ranks: list[int] = []
    fake = None
    try:
        wait_healthy(tp2, tp1)
        ranks = rank_processes(tp2.proc.pid)
        assert len(ranks) == 1 and rank_processes(tp1.proc.pid) == []
        proxy = proxy_factory([tp2, tp1], model=model_dir, router={"policy": "round_robin"})
        proxy.wait_nodes(2)
        from openai import OpenAI

        client = OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        model = client.models.list().data[0].id

        got, error, killed_at = "", None, None
        for attempt in range(4):  # round robin: the TP 2 node gets one of any two requests
            with client.completions.with_streaming_response.create(
                model=model,
                prompt=f"Stream {attempt}: tell me a very long story",
                max_tokens=1500,
                stream=True,
                temperature=0,
                extra_body={"ignore_eos": True},
            ) as response:
                if "decode-tp2" not in response.headers["x-pdserve-route"]:
                    continue
                chunks = 0
                try:
                    for chunk in response.parse():
                        if chunk.choices:
                            got += chunk.choices[0].text
                            chunks += 1
                        if chunks == 3 and killed_at is None:
                            os.kill(ranks[0], signal.SIGKILL)
                            killed_at = time.monotonic()
                except APIError as exc:
                    error = exc
                break
        assert killed_at is not None, "no stream reached the TP 2 node"
        elapsed = time.monotonic() - killed_at
        # A clear error from the node, not the client's timeout or a dropped connection, and soon.
        assert error is not None and not isinstance(error, APIConnectionError), (error, got)
        assert "rank 1" in str(error), error
        assert elapsed < 15, elapsed
        assert got  # it had streamed before the rank died

        r = httpx.get(tp2.http + "/health", timeout=5)
        assert r.status_code == 503, r.text
        health = r.json()
        assert health["status"] == "unhealthy" and "rank 1" in health["error"], health
        assert tp2.proc.poll() is None  # rank 0 (the node) lives on, saying why it cannot serve
        # Every block back: nothing used, whatever is not free is cached.
        blocks = assert_blocks_balanced(tp2)
        assert blocks["free"] + blocks["cached"] == blocks["total"], blocks
        assert health["num_used_blocks"] == 0
        assert health["num_free_blocks"] + health["num_cached_blocks"] == health["num_total_blocks"]

        # Asked directly, the node refuses new work with a retryable 503 naming the rank.
        fake = FakeProxy(SECRET.decode())
        (refused,) = fake.wait(fake.generate(tp2, [11, 12, 13, 14]), timeout=10)
        assert refused.error is not None and refused.error.status == 503 and refused.error.retryable
        assert "rank 1" in refused.error.message, refused.error

        # Its heartbeats say draining, so the proxy routes around it; new requests succeed, on the other node.
        def proxy_sees_draining() -> bool:
            nodes = httpx.get(proxy.url + "/health", timeout=5).json()["nodes"]
            return any(n["node_id"] == "decode-tp2" and n["draining"] for n in nodes)

        wait_for(proxy_sees_draining, 10, what="the proxy to see decode-tp2 draining")
        for i in range(4):
            raw = client.completions.with_raw_response.create(
                model=model, prompt=f"After the failure {i}", max_tokens=4, temperature=0
            )
            assert raw.headers["x-pdserve-route"] == "colocated:decode-tp1->decode-tp1"
            reply = raw.parse()
            assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
        assert_blocks_balanced(tp1)
    finally:
        if fake is not None:
            fake.close()
        for node in (tp2, tp1):
            node.stop()
        assert tp2.proc.poll() is not None and tp1.proc.poll() is not None
        assert_gone(ranks, "the TP 2 node's rank process")


# ------------------------------------------------------------------------------------------ 3. pdserve up -tp


def test_up_with_prefill_tp2_serves(tp_clusters, reference):
    """`pdserve up --prefill-tp 2 --decode-tp 1` on CPU: up, its prefill node has a rank-1 process, serves."""
    cluster, ranks = tp_clusters["p2-d1"]
    prefill = next(n for n in cluster.info["nodes"] if n["role"] == "prefill")
    assert ranks == rank_processes(prefill["pid"]) and len(ranks) == 1
    client = client_of(cluster)
    raw = client.completions.with_raw_response.create(
        model=client.models.list().data[0].id, prompt=UP_PROMPT, max_tokens=MAX_TOKENS, **GREEDY
    )
    assert raw.headers["x-pdserve-route"].startswith("disaggregated:prefill-0->"), raw.headers
    assert raw.parse().choices[0].token_ids == reference[UP_PROMPT]


def up_args(tmp_path, *argv: str) -> argparse.Namespace:
    from pdserve.launch.cluster import register_cli

    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    return parser.parse_args(["up", "--log-dir", str(tmp_path), *argv])


def gpus_visible(monkeypatch, n: int) -> None:
    from pdserve.launch import cluster

    monkeypatch.setattr(cluster, "visible_gpus", lambda: [str(i) for i in range(n)])
    monkeypatch.delenv("PDSERVE_TP_BACKEND", raising=False)  # gloo would let a node's ranks share a GPU


def test_placement_refuses_too_few_gpus(tmp_path, monkeypatch):
    from pdserve.launch.cluster import Cluster

    gpus_visible(monkeypatch, 1)
    args = up_args(tmp_path, "--prefill", "1", "--decode", "1", "--prefill-tp", "2")
    with pytest.raises(ConfigError, match=r"--prefill-tp 2 .* needs 3 GPUs \(one per rank\), 1 visible"):
        Cluster(args).placement([2, 1])


def test_placement_gives_each_rank_its_own_gpu(tmp_path, monkeypatch):
    from pdserve.launch.cluster import Cluster

    gpus_visible(monkeypatch, 4)
    cluster = Cluster(up_args(tmp_path, "--prefill-tp", "2", "--decode-tp", "2"))
    placed, _, util = cluster.placement([2, 2])
    assert placed == [["0", "1"], ["2", "3"]]
    assert util == 0.85  # one process per GPU: none shares its memory
    cluster.plan(str(tmp_path / "model"))
    prefill, decode = cluster.children[:2]
    assert (prefill.gpu, decode.gpu) == ("0,1", "2,3")
    assert prefill.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # its own first: cuda:0 and cuda:1 in the node
    assert decode.env["CUDA_VISIBLE_DEVICES"] == "2,3,0,1"
    for node in (prefill, decode):
        assert node.argv[node.argv.index("--tensor-parallel-size") + 1] == "2"
        assert node.argv[node.argv.index("--device") + 1] == "cuda:0"
