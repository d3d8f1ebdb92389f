"""The serving benchmark's pure parts: workloads (exact lengths, shared prefixes, growing conversations, JSONL
errors), arrival gaps, percentiles and SLOs, and the prefix-cache oracle."""

import json
import math
import statistics

import pytest

from bench.prefix_oracle import lru_oracle_hit_fraction, upper_bound_hit_fraction
from pdserve.benchmarks.serving_client import RequestResult, arrival_gaps
from pdserve.benchmarks.serving_metrics import compute_figures, meets_slos, parse_slos, percentile
from pdserve.benchmarks.workloads import (
    TokenSource,
    WorkloadError,
    conversation_workload,
    jsonl_workload,
    prefix_workload,
    random_workload,
)


def test_random_prompts_have_exact_lengths_and_are_reproducible():
    a = random_workload(5, 37, 9, TokenSource(3))
    b = random_workload(5, 37, 9, TokenSource(3))
    assert [r.prompt_ids for r in a] == [r.prompt_ids for r in b]
    assert all(len(r.prompt_ids) == 37 and r.output_len == 9 for r in a)
    assert random_workload(1, 37, 9, TokenSource(4))[0].prompt_ids != a[0].prompt_ids


def test_prefix_requests_share_their_group_prefix():
    reqs = prefix_workload(20, groups=3, prefix_len=32, unique_len=8, output_len=4, tokens=TokenSource(0))
    by_group = {}
    for r in reqs:
        assert len(r.prompt_ids) == 40
        by_group.setdefault(r.group, set()).add(tuple(r.prompt_ids[:32]))
    assert all(len(prefixes) == 1 for prefixes in by_group.values())
    assert len({next(iter(p)) for p in by_group.values()}) == len(by_group)


def test_each_conversation_turn_resends_the_history():
    reqs = conversation_workload(7, turns=3, turn_len=10, output_len=4, tokens=TokenSource(0))
    assert [(r.session, r.turn) for r in reqs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    first, second = reqs[0].prompt_ids, reqs[1].prompt_ids
    assert second[: len(first)] == first and len(second) == len(first) + 4 + 10


def test_a_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(WorkloadError, match=r"trace.jsonl:3: expected an object with a 'prompt' key"):
        jsonl_workload(str(path), None, 16, TokenSource(0))
    path.write_text(json.dumps({"prompt": [5, 6], "output_len": 3}) + "\n")
    assert jsonl_workload(str(path), 2, 16, TokenSource(0))[1].prompt_ids == [5, 6]


def test_arrival_gaps_have_the_asked_mean_and_burstiness():
    poisson = arrival_gaps(20000, rate=4.0, burstiness=1.0, seed=1)
    bursty = arrival_gaps(20000, rate=4.0, burstiness=0.25, seed=1)
    assert statistics.fmean(poisson) == pytest.approx(0.25, rel=0.05)
    assert statistics.fmean(bursty) == pytest.approx(0.25, rel=0.1)
    assert statistics.pstdev(bursty) > 1.5 * statistics.pstdev(poisson)  # CV 2 vs 1
    assert arrival_gaps(3, math.inf, 1.0, 0) == [0.0, 0.0, 0.0]


def test_percentile_interpolates_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([0, 10], 99) == pytest.approx(9.9)


def test_goodput_counts_only_requests_within_every_slo():
    slos = parse_slos(["ttft:100", "itl:20"])
    assert slos == {"ttft": 0.1, "itl": 0.02}
    fast = RequestResult(ok=True, ttft=0.05, itls=[0.01] * 9, e2e=0.14, output_tokens=10)
    stalled = RequestResult(ok=True, ttft=0.05, itls=[0.01] * 8 + [0.2], e2e=0.33, output_tokens=10)
    failed = RequestResult(ok=False, error_kind="http_400")
    assert meets_slos(fast, slos) and not meets_slos(stalled, slos) and not meets_slos(failed, slos)
    fig = compute_figures([fast, stalled, failed], 1.0, slos)
    assert fig["goodput"] == 1.0 and fig["request_throughput"] == 2.0 and fig["errors"] == {"http_400": 1}
    assert fig["slo_attainment"] == pytest.approx(1 / 3)
    for bad in (["ttft"], ["ttft:x"], ["speed:3"], ["ttft:-1"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_slos(bad)


def test_oracle_needs_both_caches_when_the_working_set_exceeds_one():
    prefixes = [[g * 1000 + i for i in range(64)] for g in range(4)]  # 4 groups x 4 blocks of 16
    prompts = [prefixes[i % 4] + [9000 + i] * 16 for i in range(40)]
    upper = upper_bound_hit_fraction(prompts, 16)
    assert upper == pytest.approx(36 * 64 / (40 * 80))  # every prefix after its group's first request
    one_node = lru_oracle_hit_fraction(prompts, 16, nodes=1, blocks_per_node=12)
    two_nodes = lru_oracle_hit_fraction(prompts, 16, nodes=2, blocks_per_node=12)
    assert one_node < two_nodes == pytest.approx(upper)


def _bench_run(argv):
    import argparse

    from pdserve.benchmarks.serving_cli import BenchRun, add_arguments, slo_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--base-url", "http://127.0.0.1:9", *argv])
    return BenchRun(args, "stub", slo_from_args(args))


def test_a_sweep_climbs_until_every_slo_broke(monkeypatch):
    bench = _bench_run(
        [
            "--request-rate",
            "sweep",
            "--sweep-start",
            "1",
            "--sweep-factor",
            "2",
            "--sweep-max-rates",
            "8",
            "--goodput",
            "ttft:100",
        ]
    )
    attainment = {1.0: 1.0, 2.0: 0.95, 4.0: 0.5, 8.0: 0.1}  # the SLO breaks at 4 req/s

    def fake_rate(rate, index):
        bench.figures.append((rate, {"slo": {"slo_attainment": attainment[rate]}}))

    monkeypatch.setattr(bench, "run_rate", fake_rate)
    bench.run()
    assert [rate for rate, _ in bench.figures] == [1.0, 2.0, 4.0]


def test_rate_lists_and_bad_rates():
    from pdserve.benchmarks.serving_cli import parse_rates
    from pdserve.wire.errors import ConfigError

    assert parse_rates("1,2, 4") == [1.0, 2.0, 4.0] and parse_rates("inf") == [math.inf]
    assert parse_rates("sweep") is None
    for bad in ("0", "x", "", "-1"):
        with pytest.raises(ConfigError, match="--request-rate"):
            parse_rates(bad)
    with pytest.raises(ConfigError, match="sweep needs --goodput"):
        _bench_run(["--request-rate", "sweep"])


def test_token_ids_avoid_special_tokens_and_chat_text_keeps_the_length(tmp_path):
    from pdserve.benchmarks.serving_client import ClientConfig, prompt_text
    from pdserve.benchmarks.workloads import BenchRequest, load_tokenizer
    from pdserve.tools.make_tokenizer import write_tokenizer_files

    write_tokenizer_files(str(tmp_path), vocab_size=1024, family="llama", model_max_length=256)
    tok = load_tokenizer(str(tmp_path))
    ids = TokenSource(0, tok).ids(2000)
    assert min(ids) >= 5 and max(ids) < 1024  # ids 0..4 are the special tokens
    cfg = ClientConfig("http://x", endpoint="/v1/chat/completions", tokenizer=tok)
    for n in (16, 100):
        text = prompt_text(cfg, BenchRequest(TokenSource(n, tok).ids(n), None, 4))
        assert n - 8 <= len(tok.encode(text, add_special_tokens=False).ids) <= n
    with pytest.raises(WorkloadError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "missing"))


def test_the_client_imports_no_torch():
    """`pdserve bench` runs on any client machine, as the proxy does; bench/serving.py must not open a CUDA
    context on a GPU its nodes use."""
    import subprocess
    import sys

    code = (
        "import sys, bench.serving, bench.serving_summary, pdserve.benchmarks.serving_cli, "
        "pdserve.benchmarks.serving_plots; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
