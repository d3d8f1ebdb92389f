"""KV links open before the first request: once `pdserve up` 1P1D is ready, the proxy has told the prefill
node of the decode node's KV listener and the prefill node has handshaken with it, while no request was ever
sent (each side's `pdserve_kv_links` gauge reads 1). Without that, the first disaggregated request paid the
handshake (and on GPUs the mapping of the decode node's cache) on its way to the first token."""

from __future__ import annotations

import re
import time

import pytest

from tests.harness.servers import module_cluster, needs_nodes

pytestmark = [pytest.mark.slow, needs_nodes]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    yield from module_cluster(tmp_path_factory, tiny_model, "cluster-preconnect")


def open_links(metrics: str, role: str) -> float:
    m = re.search(rf'^pdserve_kv_links\{{[^}}]*role="{role}"[^}}]*\}} (\S+)$', metrics, re.M)
    return float(m.group(1)) if m else -1.0


def test_prefill_node_links_to_the_decode_node_before_any_request(cluster):
    deadline = time.monotonic() + 20
    while open_links(cluster.node_metrics("prefill-0"), "producer") < 1:
        assert time.monotonic() < deadline, "the prefill node never opened its KV link ahead of a request"
        time.sleep(0.2)
    assert open_links(cluster.node_metrics("decode-0"), "consumer") == 1
    served = re.search(r"^vllm:request_success_total\{[^}]*\} [1-9]", cluster.node_metrics("decode-0"), re.M)
    assert served is None, "a request was served: the links could have come from it"
