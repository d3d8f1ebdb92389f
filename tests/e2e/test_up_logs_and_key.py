"""`pdserve up` over a reused --log-dir whose logs hold a previous run's ready lines (pointing at dead ports):
it reads only its own run's lines and comes up; and the API key reaches the proxy through its environment,
never its argv."""

from __future__ import annotations

import httpx
import pytest

from tests.harness.servers import UpCluster, free_port, needs_nodes

pytestmark = [pytest.mark.slow, needs_nodes]


def test_reused_log_dir_and_api_key_off_argv(tmp_path, model_dir):
    logs = tmp_path / "c" / "logs"
    logs.mkdir(parents=True)
    dead = free_port()
    for name in ("prefill-0", "decode-0"):
        (logs / f"{name}.log").write_text(
            f"pdserve node {name} ready: rpc tcp://127.0.0.1:{dead} events tcp://127.0.0.1:{dead} "
            f"http http://127.0.0.1:{dead}\n"
        )
    key = "key-that-must-not-show-in-argv"
    cluster = UpCluster(tmp_path / "c", model_dir, 1, 1, ("--api-key", key, "--startup-timeout", "90"))
    try:
        assert all(str(dead) not in n["http"] for n in cluster.info["nodes"])
        assert (logs / "decode-0.log.prev").read_text().startswith("pdserve node decode-0 ready")
        with open(f"/proc/{cluster.info['proxy']['pid']}/cmdline", "rb") as f:
            assert key.encode() not in f.read()
        body = {"prompt": "Hello", "max_tokens": 2}
        assert httpx.post(cluster.url + "/v1/completions", json=body, timeout=60).status_code == 401
        r = httpx.post(
            cluster.url + "/v1/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {key}"}
        )
        assert r.status_code == 200, r.text
    finally:
        cluster.stop()
