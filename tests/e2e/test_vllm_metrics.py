"""vLLM's metric names on a real CPU cluster (`pdserve up`, 1 prefill + 1 decode node), driven by the official
`openai` client: every series vLLM's Grafana dashboard queries (tests/e2e/vllm_dashboard_series.txt) exists
with the served model's name, so that dashboard, its alerts and autoscalers on vllm:num_requests_waiting work
as is.

Which endpoint carries what:
- the proxy's /metrics is the cluster seen as one vLLM server: it carries every dashboard series
  (engine="proxy");
- each node's /metrics carries the engine's state series (running, waiting, KV usage, prefix cache,
  preemptions); the decode node, which serves the proxy's requests, also carries the per-request series.
"""

from __future__ import annotations

import os
import re

import httpx
import pytest

from tests.harness.servers import UpCluster, needs_nodes, running, wait_for

pytestmark = [pytest.mark.slow, needs_nodes]

SERIES_FILE = os.path.join(os.path.dirname(__file__), "vllm_dashboard_series.txt")
NODE_STATE = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
)
MODEL = "served-tiny"


def dashboard_series() -> list[tuple[str, str]]:
    with open(SERIES_FILE) as f:
        rows = [line.split() for line in f if line.strip() and not line.startswith("#")]
    return [(name, kind) for name, kind in rows]


def samples(text: str, name: str) -> list[str]:
    """The sample lines of one series (a histogram's is its _count line), with model_name set to MODEL."""
    sample = name + "_count" if not name.endswith(("_total", "_perc")) and _is_hist(text, name) else name
    pat = re.compile(rf"^{re.escape(sample)}\{{[^}}]*model_name=\"{MODEL}\"[^}}]*\}} ", re.M)
    return pat.findall(text)


def _is_hist(text: str, name: str) -> bool:
    return f"# TYPE {name} histogram" in text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    args = ("--served-model-name", MODEL, "alias-name")
    with running(UpCluster(tmp_path_factory.mktemp("vllm-metrics"), tiny_model, 1, 1, args)) as c:
        yield c


def test_every_dashboard_series_exists(cluster):
    from openai import OpenAI

    client = OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)
    long_prompt = " ".join(f"word{i}" for i in range(80))  # long enough to be disaggregated
    for prompt in ("Hello there", long_prompt):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    stream = client.chat.completions.create(
        model="alias-name",
        messages=[{"role": "user", "content": long_prompt}],
        max_tokens=5,
        stream=True,
        n=2,
    )
    assert sum(1 for _ in stream) > 0

    proxy_text = httpx.get(cluster.url + "/metrics", timeout=10).text
    decode_text = cluster.node_metrics("decode-0")
    prefill_text = cluster.node_metrics("prefill-0")
    missing = [name for name, _ in dashboard_series() if not samples(proxy_text, name)]
    assert not missing, f"the proxy's /metrics lacks {missing}"
    missing = [name for name, _ in dashboard_series() if not samples(decode_text, name)]
    assert not missing, f"the decode node's /metrics lacks {missing}"
    for text, who in ((decode_text, "decode"), (prefill_text, "prefill")):
        missing = [name for name in NODE_STATE if not samples(text, name)]
        assert not missing, f"the {who} node's /metrics lacks {missing}"

    # Meanings: 3 requests, 4 choices (n=2): four finished, each with 5 or 6 tokens.
    finished = sum(float(line.split()[-1]) for line in _lines(proxy_text, "vllm:request_success_total"))
    assert finished == 4
    generated = float(_lines(proxy_text, "vllm:generation_tokens_total")[0].split()[-1])
    assert generated == 6 + 6 + 5 + 5
    assert _lines(proxy_text, 'vllm:request_success_total{engine="proxy",finished_reason="length"')
    # ITL: one observation per token after each choice's first.
    itl = float(_lines(proxy_text, "vllm:inter_token_latency_seconds_count")[0].split()[-1])
    assert itl == generated - 4


def test_proxy_shows_blocks_return_after_requests_end(cluster):
    """KV usage at the proxy (summed from heartbeats) comes back to 0 once nothing runs."""

    def usage() -> float:
        text = httpx.get(cluster.url + "/metrics", timeout=10).text
        return float(_lines(text, "vllm:kv_cache_usage_perc")[0].split()[-1])

    wait_for(lambda: usage() == 0.0, 10, what="KV usage back to 0 at the proxy")
    text = httpx.get(cluster.url + "/metrics", timeout=10).text
    assert "pdserve_proxy_node_kv_cache_usage_perc" in text


def test_models_lists_every_served_name(cluster):
    data = httpx.get(cluster.base_url + "/models", timeout=10).json()["data"]
    assert [m["id"] for m in data] == [MODEL, "alias-name"]


def _lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]
