"""bench/kv_transfer.py's --smoke mode (CPU, tcp, tiny shape) runs and writes the result format of
docs/architecture.md."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_smoke_mode_writes_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "kv_transfer.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("kv_transfer-cpu-*.json")
    doc = json.loads(path.read_text())
    assert {"bench", "device", "date", "commit", "command", "records"} <= set(doc)
    by_metric = {r["metric"]: r for r in doc["records"]}
    assert {"device_copy_ms", "push_all_layers_ms", "exposed_transfer_ms"} <= set(by_metric)
    for rec in doc["records"]:
        assert set(rec) == {"metric", "value", "unit", "ceiling", "ratio", "baseline", "params"}
        assert rec["value"] > 0
    push = by_metric["push_all_layers_ms"]
    assert push["ceiling"] > 0 and push["ratio"] > 0 and push["params"]["transport"] == "tcp"
