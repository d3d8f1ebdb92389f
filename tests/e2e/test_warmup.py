"""Warm before ready. CPU: a node warms up before /health answers at all, and the warm-up leaves nothing
behind (every block free, no cached prefix the proxies' index never heard of, no warm-up in the vllm:*
counters). GPU (marked `gpu`): once /health says 200, the first request takes no longer than 1.5x the tenth of
the same shape; the timings are printed and, with $PDSERVE_RESULTS_DIR set, written there as JSON (httpx: the
GPU machines have no openai package)."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.harness.nodes import start_node, wait_healthy
from tests.harness.servers import UpCluster, needs_nodes

pytestmark = [pytest.mark.slow, needs_nodes]


def test_warm_up_leaves_every_block_free(model_dir, tmp_path):
    node = start_node("decode", model_dir, str(tmp_path), kv_role="kv_both")
    try:
        wait_healthy(node)
        assert "warm-up: 6 requests" in node.log()
        h = node.health()
        assert h["num_used_blocks"] == 0 and h["num_cached_blocks"] == 0
        assert h["num_free_blocks"] == h["num_total_blocks"]
        m = node.metrics()
        for name in (
            "vllm:prefix_cache_queries_total",
            "vllm:generation_tokens_total",
            "vllm:num_preemptions_total",
        ):
            values = [v for k, v in m.items() if k.startswith(name + "{")]
            assert values == [0.0], (name, values)
    finally:
        node.stop()


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_first_request_after_ready_is_warm(tmp_path_factory):
    import httpx

    from pdserve.tools.make_model import make_model

    model = str(tmp_path_factory.mktemp("gpu-warm") / "qwen-0.5b")
    make_model(model, family="qwen2", preset="qwen2.5-0.5b")
    cluster = UpCluster(tmp_path_factory.mktemp("warm-1p1d"), model, 1, 1)
    try:
        seconds, phases = [], []
        with httpx.Client(base_url=cluster.base_url, timeout=300) as client:
            name = client.get("/models").json()["data"][0]["id"]
            for i in range(10):  # the same shape each time, different tokens: no prefix hits
                prompt = [(31 * i + 7 * j) % 5000 + 100 for j in range(512)]
                body = {
                    "model": name,
                    "prompt": prompt,
                    "max_tokens": 32,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                started = time.perf_counter()
                r = client.post("/completions", json=body)
                seconds.append(time.perf_counter() - started)
                assert r.status_code == 200, r.text
                phases.append(json.loads(r.headers.get("x-pdserve-timings", "{}")))  # where time went
        record = {
            "test": "first request after /health 200 vs the tenth",
            "seconds": [round(s, 4) for s in seconds],
            "first_over_tenth": round(seconds[0] / seconds[9], 3),
            "server_phases_first_and_tenth": [phases[0], phases[9]],
        }
        print(json.dumps(record))
        if os.environ.get("PDSERVE_RESULTS_DIR"):
            write_warmup_results(os.environ["PDSERVE_RESULTS_DIR"], seconds, phases)
        assert seconds[0] <= 1.5 * seconds[9], record
    finally:
        cluster.stop()


def write_warmup_results(out: str, seconds: list[float], phases: list[dict]) -> None:
    """In bench/results' format (bench/common.py): warmup-<gpu>-<date>.json."""
    from bench.common import device_results

    results = device_results("warmup", "cuda", out)
    shape = {"config": "1P1D", "model": "qwen2.5-0.5b shape", "prompt_tokens": 512, "output_tokens": 32}
    results.add("first_over_tenth", round(seconds[0] / seconds[9], 3), "x", params={**shape, "goal_max": 1.5})
    for i, (took, phase) in enumerate(zip(seconds, phases, strict=True), start=1):
        results.add("request_seconds", round(took, 4), "s", params={"request": i}, quiet=True)
        for key, value in phase.items():
            if isinstance(value, (int, float)):
                params = {"request": i, "phase": key}
                results.add("server_phase_seconds", value, "s", params=params, quiet=True)
