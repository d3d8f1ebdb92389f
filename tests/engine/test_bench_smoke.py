"""CI keeps the engine benchmark's code working: `bench/engine.py --smoke` runs every section at toy sizes on
CPU (tiny model, Triton kernels in the interpreter) and writes a result file in the format of
docs/architecture.md."""

import glob
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORD_KEYS = {"metric", "value", "unit", "ceiling", "ratio", "baseline", "params"}
TOP_KEYS = {"bench", "device", "date", "commit", "command", "records"}


def run_smoke(tmp_path, *args: str) -> None:
    """bench/engine.py --smoke with `args` on CPU (Triton kernels in the interpreter); it must exit 0."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "engine.py"), "--smoke", *args, "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_engine_bench_smoke_writes_a_valid_result_file(tmp_path):
    run_smoke(tmp_path, "--no-plot")
    files = glob.glob(str(tmp_path / "engine-cpu-*.json"))
    assert len(files) == 1, os.listdir(tmp_path)
    with open(files[0]) as f:
        doc = json.load(f)
    assert TOP_KEYS <= doc.keys()
    assert doc["bench"] == "engine" and doc["device"] == "cpu" and "--smoke" in doc["command"]
    for rec in doc["records"]:
        assert RECORD_KEYS <= rec.keys(), rec
        assert isinstance(rec["params"], dict)
    metrics = {r["metric"] for r in doc["records"]}
    for metric in (
        "copy_bandwidth_GBps",
        "matmul_TFLOPs",
        "prefill_ms",
        "decode_step_ms",
        "throughput_tok_s",
        "hf_prefill_ms",
        "hf_decode_step_ms",
        "hf_throughput_tok_s",
        "kernel_ms",
        "kv_block_copy_GBps",
    ):
        assert metric in metrics, f"{metric} missing: {sorted(metrics)}"
    ours = [r for r in doc["records"] if r["metric"] in ("prefill_ms", "decode_step_ms", "throughput_tok_s")]
    assert ours and all(r["value"] > 0 and r["ceiling"] > 0 and r["ratio"] > 0 for r in ours)
    assert all(r["baseline"] is not None for r in ours), "transformers' figures should be linked as baselines"
    kernels = {r["params"]["kernel"] for r in doc["records"] if r["metric"] == "kernel_ms"}
    assert kernels >= {
        "decode_attention",
        "prefill_attention",
        "rms_norm",
        "silu_and_mul",
        "rotary",
        "rotary_and_write_kv",
        "kv_cache_write",
        "skinny_linear",
        "gather_blocks",
        "scatter_blocks",
    }
    assert all(r["params"]["matches_ref"] for r in doc["records"] if r["metric"] == "kernel_ms")


def test_engine_bench_smoke_runs_a_moe_on_dummy_weights(tmp_path):
    """The MoE path of bench/engine.py (qwen3-30b-a3b runs it at full size): a config-only checkpoint, our
    engine on --load-format dummy, transformers on its own initialisation, floors from the active experts."""
    run_smoke(tmp_path, "--models", "tiny-moe", "--sections", "prefill,decode,hf", "--no-plot")
    assert not list((tmp_path / "models" / "tiny-moe").glob("*.safetensors"))
    (path,) = tmp_path.glob("engine-cpu-*.json")
    records = json.loads(path.read_text())["records"]
    ours = [r for r in records if r["metric"] in ("prefill_ms", "decode_step_ms")]
    assert ours and all(r["value"] > 0 and r["ceiling"] > 0 and r["baseline"] is not None for r in ours)
