"""CI keeps bench/serving.py working: its routing section on CPU with the tiny model and toy sizes (two
`pdserve up` clusters, cache_aware then round_robin) writes the JSON and Markdown reports, with the LRU oracle
as the hit fraction's ceiling and round_robin's figures as cache_aware's baselines."""

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.harness.servers import ROOT, needs_nodes

pytestmark = [pytest.mark.slow, needs_nodes]


def test_routing_section_writes_reports_with_oracle_and_baselines(tiny_model, tmp_path):
    argv = [
        sys.executable,
        os.path.join(ROOT, "bench", "serving.py"),
        "--sections",
        "routing",
        "--model",
        tiny_model,
        "--output-len",
        "4",
        "--duration-per-rate",
        "2",
        "--routing-rate",
        "4",
        "--routing-groups",
        "4",
        "--routing-prefix-len",
        "64",
        "--routing-unique-len",
        "16",
        "--warmups",
        "1",
        "--out",
        str(tmp_path),
        "--work-dir",
        str(tmp_path / "work"),
        "--disable-tqdm",
    ]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (path,) = glob.glob(str(tmp_path / "serving-cpu-*.json"))
    with open(path) as f:
        doc = json.load(f)
    assert os.path.exists(path[:-5] + ".md")
    recs = doc["records"]
    hits = {r["params"]["run"]: r for r in recs if r["metric"] == "prefix_hit_fraction"}
    assert set(hits) == {"cache_aware", "round_robin"}
    (oracle,) = [r["value"] for r in recs if r["metric"] == "prefix_hit_oracle_lru"]
    (upper,) = [r["value"] for r in recs if r["metric"] == "prefix_hit_upper_bound"]
    assert 0 < oracle <= upper < 1
    assert (
        hits["cache_aware"]["ceiling"] == oracle
        and hits["cache_aware"]["baseline"] == hits["round_robin"]["value"]
    )
    throughput = [
        r for r in recs if r["metric"] == "request_throughput" and r["params"]["run"] == "cache_aware"
    ]
    assert throughput and all(r["baseline"] is not None for r in throughput)
    with open(path[:-5] + ".md") as f:
        report = f.read()
    assert "## routing" in report and "cache_aware" in report and "round_robin" in report
