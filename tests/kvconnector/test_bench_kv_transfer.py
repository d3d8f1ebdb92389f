"""bench/kv_transfer.py's --smoke mode (CPU, tcp, tiny shape) runs and writes the result format of
docs/architecture.md."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_smoke(tmp_path, *args: str) -> list[dict]:
    """bench/kv_transfer.py --smoke with `args`; it must exit 0. -> the result file's records."""
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "bench", "kv_transfer.py"),
            "--smoke",
            *args,
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("kv_transfer-cpu-*.json")
    doc = json.loads(path.read_text())
    assert {"bench", "device", "date", "commit", "command", "records"} <= set(doc)
    return doc["records"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_smoke_mode_writes_results(tmp_path):
    records = run_smoke(tmp_path)
    by_metric = {r["metric"]: r for r in records}
    assert {"device_copy_ms", "push_all_layers_ms", "exposed_transfer_ms"} <= set(by_metric)
    for rec in records:
        assert set(rec) == {"metric", "value", "unit", "ceiling", "ratio", "baseline", "params"}
        assert rec["value"] > 0
    push = by_metric["push_all_layers_ms"]
    assert push["ceiling"] > 0 and push["ratio"] > 0 and push["params"]["transport"] == "tcp"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_smoke_window_shape_ships_fewer_bytes_and_lands(tmp_path):
    """--shape gemma-2-9b runs each figure with sliding layers shipping their window only, and in full: the
    window's pushes land (the consumer expects exactly the pieces sent, or they would time out) with fewer
    bytes, by the arithmetic of sliding_window.py (100 tokens, window 24, block 16: a sliding layer ships 3 of
    7 blocks; two of four layers slide -> 20 of 28 pieces)."""
    records = run_smoke(tmp_path, "--shape", "gemma-2-9b", "--tokens", "100", "--iters", "2")
    shipped = {r["params"]["case"]: r for r in records if r["metric"] == "kv_shipped_MiB"}
    assert set(shipped) == {"cpu-window", "cpu-full"}
    assert shipped["cpu-window"]["params"]["saved"] == round(1 - 20 / 28, 4)
    assert shipped["cpu-full"]["params"]["saved"] == 0.0
    pushes = {r["params"]["case"]: r for r in records if r["metric"] == "push_all_layers_ms"}
    assert pushes["tcp-cpu-window"]["params"]["bytes"] * 28 == pushes["tcp-cpu-full"]["params"]["bytes"] * 20
