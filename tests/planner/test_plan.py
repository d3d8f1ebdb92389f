"""The planner's arithmetic on a recorded profile whose figures make every prediction computable by hand,
the profile's reading and checks, and `pdserve profile` -> `pdserve plan` as a user runs them (real
processes, the tiny model on CPU)."""

import json
import math

import pytest

from pdserve.planner.plan import Workload, capacity, evaluate, plan
from pdserve.planner.profile import Profile
from pdserve.wire.errors import ConfigError
from tests.launch.test_cli_errors import assert_one_line_error, pdserve

# Prefill 0.1 ms per token; a decode step 10 ms at batch 1 plus 0.1 ms per further request, any context.
RECORDED = {
    "schema": 1,
    "model": "recorded",
    "device": "test",
    "kv_cache_tokens": 1_000_000,
    "max_num_batched_tokens": 512,
    "prefill": [{"input_len": 100, "ms": 10.0}, {"input_len": 1000, "ms": 100.0}],
    "decode": [
        {"batch": 1, "context": 1000, "itl_ms": 10.0},
        {"batch": 101, "context": 1000, "itl_ms": 20.0},
    ],
}


@pytest.fixture
def profile() -> Profile:
    return Profile.from_dict(RECORDED)


def test_profile_interpolates_and_extrapolates(profile):
    assert profile.prefill_ms(550) == pytest.approx(55.0)
    assert profile.prefill_ms(2000) == pytest.approx(200.0)  # beyond the last point, along the last two
    assert profile.itl_ms(51, 5000) == pytest.approx(15.0)  # one measured context: the same at any
    assert profile.prefill_ms(10) == pytest.approx(10.0)  # below the first point: the first
    falling = Profile.from_dict(
        {**RECORDED, "prefill": [{"input_len": 1, "ms": 5.0}, {"input_len": 2, "ms": 3.0}]}
    )
    assert falling.prefill_ms(100) == pytest.approx(3.0)  # a noisy falling tail never extrapolates below
    two = Profile.from_dict(
        {**RECORDED, "decode": RECORDED["decode"] + [{"batch": 1, "context": 3000, "itl_ms": 30.0}]}
    )
    assert two.itl_ms(1, 2000) == pytest.approx(20.0)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"schema": 2}, "schema"),
        ({"prefill": []}, "at least one"),
        ({"decode": [{"batch": 1}]}, "not a pdserve profile"),
        ({"kv_cache_tokens": "many"}, "not a pdserve profile"),
        ({"prefill": [{"input_len": 10, "ms": 0.0}]}, "positive"),
    ],
)
def test_profile_refuses_what_it_cannot_read(change, needle):
    with pytest.raises(ConfigError, match=needle):
        Profile.from_dict({**RECORDED, **change})


def test_disaggregated_by_hand(profile):
    """2 prefill nodes at 10 req/s of 1000 tokens: s = 100 ms, rho = 0.5, M/D/1 wait 50 ms. One decode node
    of 100-token outputs: B = 10 * 100 * itl(B) / 1000 = itl(B) = 10 + 0.1 (B - 1), so B = 11, ITL 11 ms, and
    TTFT = 100 + 50 + 11."""
    out = evaluate(profile, Workload(10, 1000, 100, 1000, 50), prefill=2, decode=1, rate=10)
    assert out.decode_batch == pytest.approx(11.0)
    assert out.itl_ms == pytest.approx(11.0)
    assert out.ttft_ms == pytest.approx(161.0)
    assert out.broken is None
    one = evaluate(profile, Workload(10, 1000, 100, 1000, 50), prefill=1, decode=1, rate=10)
    assert one.broken == "prefill throughput"  # rho = 1


def test_colocated_by_hand(profile):
    """One colocated node at 0.5 req/s of 100-token prompts, 1000-token outputs: one 100-token chunk every 2 s
    rides as a mixed step of itl(B) + 10 ms. Pure steps fill the rest of the time, so steps/s S = 0.5 +
    (1 - 0.5 (itl + 10)/1000) / (itl/1000), B = 0.5 * 1000 / S, and the mean ITL is 1000 / S ms."""
    out = evaluate(profile, Workload(0.5, 100, 1000, 1000, 50), prefill=0, decode=1, rate=0.5)
    b = out.decode_batch
    itl = 10 + 0.1 * (b - 1)
    steps = 0.5 + (1 - 0.5 * (itl + 10) / 1e3) / (itl / 1e3)
    assert b == pytest.approx(0.5 * 1000 / steps, rel=1e-6)
    assert out.itl_ms == pytest.approx(itl)  # 0.5 mixed steps in ~200 a second: under 1 %, p99 is pure
    quiet = out.ttft_ms
    out = evaluate(profile, Workload(5, 100, 1000, 1000, 50), prefill=0, decode=1, rate=5)
    assert out.itl_ms == pytest.approx(10 + 0.1 * (out.decode_batch - 1) + 10)  # ~5 % mixed: p99 is mixed
    assert out.ttft_ms > quiet


def test_capacity_and_its_binding_limit(profile):
    """With 2 prefill nodes the prompts allow up to 20 req/s; the decode node holds ITL <= 12 ms only up to
    B = 21, i.e. 21 / (100 * 0.012) = 17.5 req/s: the ITL goal binds there."""
    cap, binding = capacity(profile, Workload(1, 1000, 100, 1e9, 12), prefill=2, decode=1)
    assert cap == pytest.approx(17.5, rel=1e-6) and binding == "ITL goal"
    cap, binding = capacity(profile, Workload(1, 1000, 100, math.inf, math.inf), prefill=2, decode=1)
    assert cap == pytest.approx(20.0, rel=1e-6) and binding == "prefill throughput"
    cap, binding = capacity(profile, Workload(1, 1000, 100, 300, 1e9), prefill=2, decode=1)
    assert binding == "TTFT goal" and cap < 20
    at = evaluate(profile, Workload(1, 1000, 100, 300, 1e9), 2, 1, cap)
    assert at.ttft_ms == pytest.approx(300, rel=1e-4)


def test_plan_picks_by_goodput(profile):
    # decode-heavy: colocated serving holds about 15 req/s on two nodes, 1P1D's single decode node 8
    best, splits = plan(profile, Workload(10, 100, 1000, 1000, 50), gpus=2)
    assert (best.prefill_nodes, best.decode_nodes) == (0, 2)
    assert best.goodput_req_s == pytest.approx(10)
    other = next(s for s in splits if s.prefill_nodes == 1)
    assert other.goodput_req_s == pytest.approx(401 / 50, rel=1e-4) and other.binding == "ITL goal"
    # prompt-heavy: 1000-token prompts at 15 req/s need prefill nodes of their own
    best, _ = plan(profile, Workload(15, 1000, 10, 500, 50), gpus=4)
    assert best.prefill_nodes >= 2 and best.goodput_req_s == pytest.approx(15)
    # more than any split holds: the goodput is the best capacity, and says what binds
    best, splits = plan(profile, Workload(1000, 1000, 100, 500, 50), gpus=4)
    assert best.goodput_req_s == max(s.capacity_req_s for s in splits) < 1000
    assert best.binding in ("TTFT goal", "ITL goal", "prefill throughput", "decode KV cache")


def test_plan_refuses_bad_workloads(profile):
    with pytest.raises(ConfigError, match="--rate"):
        plan(profile, Workload(0, 100, 10, 100, 10), gpus=2)
    tp2 = Profile.from_dict({**RECORDED, "tensor_parallel_size": 2})
    with pytest.raises(ConfigError, match="no node"):
        plan(tp2, Workload(1, 100, 10, 100, 10), gpus=1)


def test_profile_then_plan_from_the_command_line(tmp_path, model_dir):
    out = tmp_path / "profile.json"
    result = pdserve(
        "profile",
        "--model",
        model_dir,
        "--device",
        "cpu",
        "--input-lens",
        "16",
        "64",
        "--batches",
        "1",
        "4",
        "--contexts",
        "32",
        "--reps",
        "1",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(out.read_text())
    assert [p["input_len"] for p in measured["prefill"]] == [16, 64]
    assert [(p["batch"], p["context"]) for p in measured["decode"]] == [(1, 32), (4, 32)]
    assert all(p["ms"] > 0 for p in measured["prefill"]) and all(p["itl_ms"] > 0 for p in measured["decode"])
    assert measured["kv_cache_tokens"] > 0 and measured["device"] == "cpu"
    args = ["--rate", "5", "--input-len", "64", "--output-len", "16", "--ttft-ms", "5000", "--itl-ms", "2000"]
    result = pdserve("plan", "--profile", str(out), *args, "--gpus", "3", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["plan"]["prefill_nodes"] + answer["plan"]["decode_nodes"] == 3
    assert len(answer["splits"]) == 3 and answer["plan"]["goodput_req_s"] == pytest.approx(5)
    assert not math.isnan(answer["plan"]["at_rate"]["ttft_ms"])
    assert_one_line_error(
        pdserve("plan", "--profile", str(tmp_path / "nope.json"), *args, "--gpus", "2"), "cannot read"
    )
