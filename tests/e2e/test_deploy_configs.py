"""deploy/: the Grafana dashboard, the Prometheus config, the Kubernetes manifests and the launch scripts,
checked against the real thing: metric names against the /metrics of a real prefill node, a real decode node
and the real proxy app; every flag against the real `pdserve` argument parser. (Nothing here applies the
manifests to a cluster or loads the dashboard into Grafana.)"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import tempfile
import urllib.request

import pytest

from tests.harness.nodes import start_node, wait_healthy
from tests.harness.servers import ROOT, free_port, needs_nodes

yaml = pytest.importorskip("yaml")

DEPLOY = os.path.join(ROOT, "deploy")
DASHBOARD = os.path.join(DEPLOY, "grafana", "pdserve-transfer.json")
PROMETHEUS = os.path.join(DEPLOY, "prometheus", "prometheus.yml")
K8S = os.path.join(DEPLOY, "k8s")
SCRIPTS = {"prefill": "prefill.sh", "decode": "decode.sh", "proxy": "proxy.sh"}

# What the dashboard must show (the brief of deploy/): if a panel loses one of these, this fails.
REQUIRED_SERIES = {
    "pdserve_kv_bytes_sent_total",
    "pdserve_kv_bytes_received_total",
    "pdserve_kv_achieved_gbps",
    "pdserve_kv_transfer_seconds_bucket",
    "pdserve_kv_exposed_transfer_seconds_bucket",
    "pdserve_kv_inflight_transfers",
    "pdserve_kv_failures_total",
    "pdserve_kv_dropped_frames_total",
    "pdserve_node_dropped_frames_total",
    "pdserve_proxy_dropped_frames_total",
    "pdserve_node_kv_blocks_free",
    "pdserve_node_kv_blocks_used",
    "pdserve_node_kv_blocks_cached",
    "pdserve_node_kv_blocks_total",
    "pdserve_node_requests_waiting",
    "pdserve_node_requests_running",
    "pdserve_node_preemptions_total",
    "pdserve_proxy_requests_total",
    "pdserve_proxy_request_seconds_bucket",
    "pdserve_proxy_redis_up",
    "pdserve_proxy_routing_decisions_total",
    "pdserve_kv_request_bytes_bucket",
    # vLLM's names (the serving row): what its own dashboard and autoscalers read.
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:request_time_per_output_token_seconds_bucket",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:num_preemptions_total",
}


# ------------------------------------------------------------------------------------------------ helpers


def series_names(text: str) -> set[str]:
    """Every series name a Prometheus text exposition offers, including families with no sample yet (a
    labelled counter nobody has incremented shows only its # TYPE line)."""
    names: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\w+)", line)
        if m:
            name, kind = m.groups()
            if kind == "histogram":
                names.update(name + s for s in ("_bucket", "_sum", "_count"))
            elif kind == "summary":
                names.update((name, name + "_sum", name + "_count"))
            elif kind == "counter":
                names.add(name if name.endswith("_total") else name + "_total")
            else:
                names.add(name)
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{.*\})? \S+", line)
        if m:
            names.add(m.group(1))
    return names


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def load_manifests() -> list[dict]:
    docs = []
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        if os.path.basename(path) == "kustomization.yaml":
            continue
        with open(path) as f:
            docs += [dict(d, _file=os.path.basename(path)) for d in yaml.safe_load_all(f) if d]
    return docs


def workloads(docs) -> dict[str, dict]:
    """role (prefill | decode | proxy, from the launch script a container runs) -> its workload document."""
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            (c,) = d["spec"]["template"]["spec"]["containers"]
            script = os.path.basename(c["command"][0])
            role = {v: k for k, v in SCRIPTS.items()}[script]
            assert role not in out, f"two workloads run {script}"
            out[role] = d
    return out


def flag(args: list[str], name: str) -> str:
    i = args.index(name)
    return args[i + 1]


def parse_role_args(role: str, args: list[str]):
    """Parse with the real CLI: unknown flags, bad choices and missing required flags all fail."""
    from pdserve.launch.cli import build_parser

    parser = build_parser()
    try:
        ns = parser.parse_args(["--log-level", "INFO", role, *args])
    except SystemExit as exc:
        raise AssertionError(f"`pdserve {role}` rejects {args}") from exc
    assert ns.command == role
    if role in ("prefill", "decode") and ns.kv_transfer_config:
        from pdserve.engine.config import KVTransferConfig

        KVTransferConfig.from_json(ns.kv_transfer_config)  # raises ConfigError when invalid
    return ns


# --------------------------------------------------------------------------------------------- exported names


@pytest.fixture
def exported(tiny_model, proxy_factory) -> set[str]:
    """Series names the code really exports: /metrics of a real prefill node (kv_producer), a real decode node
    (kv_consumer) and the real proxy app with a Redis URL (redis_up only exists then; nothing listens there,
    the index falls back to its local view)."""
    logs = tempfile.mkdtemp(prefix="deploy-cfg-")
    nodes = [
        start_node("prefill", tiny_model, logs, kv_role="kv_producer"),
        start_node("decode", tiny_model, logs, kv_role="kv_consumer"),
    ]
    try:
        wait_healthy(*nodes, timeout=60)
        proxy = proxy_factory(redis_url=f"redis://127.0.0.1:{free_port()}/0")
        texts = {n.role: get(n.http + "/metrics") for n in nodes}
        texts["proxy"] = get(proxy.url + "/metrics")
    finally:
        for n in nodes:
            n.stop()
    names = set().union(*(series_names(t) for t in texts.values()))
    # The harness is what it claims to be: each source contributed its own families.
    assert "pdserve_node_requests_prefilling" in series_names(texts["prefill"])
    assert "pdserve_node_requests_pending_kv" in series_names(texts["decode"])
    assert {"pdserve_kv_transfer_seconds_bucket", "pdserve_kv_failures_total"} <= series_names(
        texts["decode"]
    )
    assert "pdserve_proxy_redis_up" in series_names(texts["proxy"])
    return names


def test_series_names_parser():
    text = (
        '# TYPE a_seconds histogram\na_seconds_bucket{le="1"} 0\n# TYPE b_total counter\n'
        '# TYPE c counter\n# TYPE d gauge\nd{x="1"} 2\n'
    )
    assert series_names(text) == {
        "a_seconds_bucket",
        "a_seconds_sum",
        "a_seconds_count",
        "b_total",
        "c_total",
        "d",
    }


# ------------------------------------------------------------------------------------------------ Grafana


def dashboard_exprs(dash: dict) -> list[str]:
    exprs = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            exprs.append(t["expr"])
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def test_dashboard_shape():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p[
            "title"
        ]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["expr"].count("{") == t["expr"].count("}"), t["expr"]
        if "repeat" in p:
            assert p["repeat"] in variables and variables[p["repeat"]].get("multi"), p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"
    for e in dashboard_exprs(dash):
        for var in re.findall(r"\$(\w+)", e):
            assert var in variables or var.startswith("__"), f"{e}: ${var} is no dashboard variable"
        if "histogram_quantile" in e:
            assert "_bucket" in e and re.search(r"by \([^)]*\ble\b", e), f"{e}: quantile needs _bucket by le"


@needs_nodes
def test_dashboard_metrics_are_exported(exported):
    with open(DASHBOARD) as f:
        dash = json.load(f)
    referenced: set[str] = set()
    for e in dashboard_exprs(dash):
        # A selector `name{...}` or `name[...]` must be one of ours (pdserve_* or vLLM's vllm:*); then every
        # such name must be exported.
        for name in re.findall(r"([a-zA-Z_:][\w:]*)\s*[{\[]", e):
            assert name.startswith(("pdserve_", "vllm:")), f"{e}: {name} is not a pdserve or vllm series"
        names = set(re.findall(r"\bpdserve_\w+|\bvllm:[\w:]+", e))
        assert names, f"{e}: references no pdserve series"
        referenced |= names
    missing = referenced - exported
    assert not missing, f"the dashboard references series nothing exports: {sorted(missing)}"
    assert REQUIRED_SERIES <= referenced, f"panels missing: {sorted(REQUIRED_SERIES - referenced)}"
    assert REQUIRED_SERIES <= exported


# ------------------------------------------------------------------------------------------------ Prometheus


def test_prometheus_config():
    with open(PROMETHEUS) as f:
        cfg = yaml.safe_load(f)
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert len(jobs) == len(cfg["scrape_configs"]), "duplicate job_name"
    # Static targets: the ports the launch scripts' examples use.
    ports = {}
    for role, script in SCRIPTS.items():
        args = script_example(script)
        ports[role] = int(flag(args, "--port" if role == "proxy" else "--http-port"))
    static = {}
    for job in jobs.values():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                static.setdefault(sc["labels"]["component"], set()).add(int(target.rsplit(":", 1)[1]))
    assert static == {role: {port} for role, port in ports.items()}
    # Kubernetes discovery: what it keeps is what the manifests carry.
    (k8s,) = [j for j in jobs.values() if "kubernetes_sd_configs" in j]
    assert k8s["kubernetes_sd_configs"][0]["role"] == "pod"
    keep = {
        tuple(r["source_labels"]): r["regex"] for r in k8s["relabel_configs"] if r.get("action") == "keep"
    }
    for r in k8s["relabel_configs"]:
        assert not re.search(r"\\\d", r.get("regex", "")), "Prometheus regexes are RE2: no backreferences"
        re.compile(r.get("regex", "(.*)"))
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_part_of",)] == "pdserve"
    assert keep[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"
    port_name = keep[("__meta_kubernetes_pod_container_port_name",)]
    targets = {r["target_label"] for r in k8s["relabel_configs"] if "target_label" in r}
    assert {"__address__", "__metrics_path__", "component"} <= targets
    for role, d in workloads(load_manifests()).items():
        tmpl = d["spec"]["template"]
        assert tmpl["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pdserve"
        assert tmpl["metadata"]["labels"]["app.kubernetes.io/component"] == role
        assert tmpl["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        (c,) = tmpl["spec"]["containers"]
        assert any(p["name"] == port_name for p in c["ports"]), f"{role}: no container port named {port_name}"


# ------------------------------------------------------------------------------------------------ Kubernetes


def test_k8s_manifests_parse_and_agree():
    docs = load_manifests()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        kust = yaml.safe_load(f)
    assert sorted(kust["resources"]) == sorted({d["_file"] for d in docs})
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    roles = workloads(docs)
    assert set(roles) == {"prefill", "decode", "proxy"}
    assert roles["proxy"]["kind"] == "Deployment"
    parsed = {}
    for role, d in roles.items():
        spec = d["spec"]
        tmpl = spec["template"]
        assert spec["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items(), role
        (c,) = tmpl["spec"]["containers"]
        args = [str(a) for a in c["args"]]
        ns = parsed[role] = parse_role_args(role, args)
        http = int(ns.port if role == "proxy" else ns.http_port)
        assert ns.host == "0.0.0.0", f"{role}: must bind all interfaces in a pod"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == http == int(tmpl["metadata"]["annotations"]["prometheus.io/port"]), role
        assert tmpl["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["port"] in ("http", http), (role, probe)
        env = {e["name"]: e for e in c["env"]}
        ref = env["PDSERVE_KV_SECRET"]["valueFrom"]["secretKeyRef"]
        assert "PDSERVE_KV_SECRET" in secrets[ref["name"]]["stringData"] and ref["key"] == "PDSERVE_KV_SECRET"
        assert ns.kv_secret is None, f"{role}: the secret comes from the Secret, not the command line"
        if role == "proxy":
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
            continue
        assert spec["serviceName"] in services, role
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        for part in ("requests", "limits"):
            assert int(c["resources"][part]["nvidia.com/gpu"]) == 1, role
        assert ports["rpc"] == ns.rpc_port and ports["events"] == ns.events_port, role
        assert ns.device.startswith("cuda")
    # Disaggregated roles, and the decode node's KV listener reachable from other pods on its declared port.
    from pdserve.engine.config import KVTransferConfig

    kvt = {r: KVTransferConfig.from_json(parsed[r].kv_transfer_config) for r in ("prefill", "decode")}
    assert kvt["prefill"].kv_role == "kv_producer" and kvt["decode"].kv_role == "kv_consumer"
    assert kvt["decode"].kv_ip == "0.0.0.0" and kvt["decode"].kv_port in {
        p["containerPort"] for p in roles["decode"]["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    # The headless Service gives every node pod the DNS name the proxy's --node flags use, and lists every
    # replica.
    expected = set()
    for role in ("prefill", "decode"):
        d = roles[role]
        svc = services[d["spec"]["serviceName"]]
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        expected |= {
            f"tcp://{d['metadata']['name']}-{i}.{d['spec']['serviceName']}:{parsed[role].events_port}"
            for i in range(d["spec"]["replicas"])
        }
    assert set(parsed["proxy"].node) == expected
    proxy_svc = services["pdserve-proxy"]
    assert (
        proxy_svc["spec"]["selector"].items()
        <= roles["proxy"]["spec"]["template"]["metadata"]["labels"].items()
    )
    assert ("Secret", "pdserve-kv-secret") in kinds


# --------------------------------------------------------------------------------------------- launch scripts


def script_example(script: str) -> list[str]:
    """The flags of the `deploy/X.sh --flag ...` example in the script's header ([optional] parts
    included)."""
    with open(os.path.join(DEPLOY, script)) as f:
        text = f.read()
    m = re.search(rf"^#\s+deploy/{re.escape(script)} (.+)$", text, re.M)
    assert m, f"{script}: no example line"
    return shlex.split(m.group(1).replace("[", " ").replace("]", " "))


@pytest.mark.parametrize("role", sorted(SCRIPTS))
def test_launch_script_flags(role):
    script = SCRIPTS[role]
    with open(os.path.join(DEPLOY, script)) as f:
        text = f.read()
    exec_line = [ln for ln in text.splitlines() if ln.startswith("exec ")][0]
    assert shlex.split(exec_line)[-2:] == [role, "$@"], exec_line
    assert "--log-level" in exec_line
    ns = parse_role_args(role, script_example(script))
    if role != "proxy":
        assert ns.rpc_port and ns.events_port and ns.http_port
