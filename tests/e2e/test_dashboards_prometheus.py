"""deploy/'s Grafana dashboard against a real Prometheus: Debian's `prometheus` (installed by `make`, as
Redis is) scrapes a CPU cluster (`pdserve up`, one prefill and one decode node, a real Redis behind the proxy)
with the scrape config of deploy/prometheus/prometheus.yml, its static targets pointed at the cluster's ports.
After traffic from the official `openai` client, every PromQL expression of every panel is evaluated through
Prometheus's HTTP API, and each must return series: a typo, a metric that does not exist, or a label a series
does not carry fails here instead of leaving a panel blank in production."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from tests.harness.servers import (
    RedisServer,
    UpCluster,
    free_port,
    needs_nodes,
    running,
    stop_process,
    wait_for,
)

pytestmark = [pytest.mark.slow, needs_nodes]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(REPO, "deploy", "grafana", "pdserve-transfer.json")
SCRAPE_CONFIG = os.path.join(REPO, "deploy", "prometheus", "prometheus.yml")
# Grafana's variables as a dashboard opened with every variable on "All" expands them.
VARIABLES = {"$__rate_interval": "5m", "$model_name": ".+", "$instance": ".+", "$proxy": ".+"}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, rows' children included."""
    with open(DASHBOARD) as f:
        panels = json.load(f)["panels"]
    queries = []
    for panel in panels + [p for row in panels for p in row.get("panels", [])]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    return queries


def host_port(url: str) -> str:
    return urlparse(url).netloc


def scrape_config(cluster: UpCluster, interval: str = "1s") -> dict:
    """deploy's config with its static jobs aimed at the cluster (the Kubernetes job dropped)."""
    with open(SCRAPE_CONFIG) as f:
        config = yaml.safe_load(f)
    config["global"]["scrape_interval"] = interval
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    nodes = cluster.info["nodes"]
    jobs["pdserve-proxy"]["static_configs"][0]["targets"] = [host_port(cluster.url)]
    for static in jobs["pdserve-nodes"]["static_configs"]:
        role = static["labels"]["component"]
        static["targets"] = [host_port(n["http"]) for n in nodes if n["role"] == role]
    config["scrape_configs"] = [jobs["pdserve-proxy"], jobs["pdserve-nodes"]]
    return config


class Prometheus:
    def __init__(self, tmp, config: dict):
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.skip("prometheus is not installed (make prometheus / apt-get install prometheus)")
        tmp.mkdir(parents=True, exist_ok=True)
        config_path = tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                exe,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address={host_port(self.url)}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, 30, what="prometheus ready")

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def targets_up(self) -> bool:
        active = httpx.get(self.url + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def query(self, expr: str) -> list:
        reply = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
        assert reply["status"] == "success", f"{expr}: {reply}"
        return reply["data"]["result"]

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.log.close()


@pytest.fixture(scope="module")
def scraped(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("dashboards")
    redis = RedisServer(free_port()).start()
    try:
        with running(UpCluster(tmp / "cluster", tiny_model, 1, 1, ("--redis-url", redis.url))) as cluster:
            prometheus = Prometheus(tmp / "prometheus", scrape_config(cluster))
            try:
                wait_for(prometheus.targets_up, 30, what="every target up")
                drive(cluster)
                time.sleep(3)  # two more scrapes after the last request
                yield prometheus
            finally:
                prometheus.stop()
    finally:
        redis.stop()


def drive(cluster: UpCluster) -> None:
    """Traffic that touches every panel's series: disaggregated requests (KV transfer), a streamed one (ITL),
    a repeated prompt (prefix hits), a bad request (an error status)."""
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    prompt = "The quick brown fox jumps over the lazy dog " * 8
    for i in range(3):
        client.completions.create(model=model, prompt=prompt + str(i), max_tokens=8, temperature=0)
    for _ in client.completions.create(model=model, prompt=prompt, max_tokens=8, stream=True):
        pass
    with pytest.raises(BadRequestError):
        client.completions.create(model=model, prompt=prompt, max_tokens=-1)


def test_every_panel_query_returns_series(scraped):
    empty = []
    for title, expr in panel_queries():
        for name, value in VARIABLES.items():
            expr = expr.replace(name, value)
        if not scraped.query(expr):
            empty.append(f"{title}: {expr}")
    assert not empty, "panels with no series:\n" + "\n".join(empty)


def test_a_misspelt_metric_returns_nothing(scraped):
    """What makes the check above able to fail: Prometheus answers an unknown name with no series, not an
    error and not a zero."""
    assert scraped.query('pdserve_kv_bytes_sent_totl{instance=~".+"}') == []


@pytest.mark.parametrize(
    "title,roles",
    [
        ("KV bytes per request", {"producer", "consumer"}),
        ("KV transfer time p50 / p99", {"producer", "consumer"}),
        # measured where the last layer is computed: the decode side never learns when that was
        ("Exposed transfer p50 / p99", {"producer"}),
    ],
)
def test_transfer_panels_show_the_requests_transfers(scraped, title, roles):
    """The transfer panels show the disaggregated requests' KV bytes, transfer time and exposed time: real,
    positive values, not NaN (a histogram with no observations in the window)."""
    expr = next(e for t, e in panel_queries() if t == title)  # its p50 line
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    values = {s["metric"]["role"]: float(s["value"][1]) for s in scraped.query(expr)}
    assert roles <= set(values) and all(values[r] > 0 for r in roles), (expr, values)
