"""The planner's wish for autoscalers: the proxy follows the traffic it answered over a window and exports the
planner's split as pdserve:desired_prefill_nodes / pdserve:desired_decode_nodes. Units on a recorded profile
and a fake clock; then a real CPU cluster (`pdserve up` with --proxy-arg), the official openai client, and
the proxy's /metrics."""

import json

import pytest

from pdserve.planner.plan import Workload, plan
from pdserve.planner.profile import Profile
from pdserve.proxy.config import PlannerGoals
from pdserve.proxy.planner_wish import PlannerCollector, PlannerWish
from tests.harness.servers import needs_nodes
from tests.launch.test_cli_errors import assert_one_line_error, pdserve
from tests.planner.test_plan import RECORDED


@pytest.fixture
def profile_path(tmp_path) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(RECORDED))
    return str(path)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_wish_follows_the_window(profile_path):
    clock = Clock()
    wish = PlannerWish(PlannerGoals(profile_path, ttft_ms=500, itl_ms=50, window_s=10), clock=clock)
    assert wish.wish(live_nodes=4) is None  # no traffic seen: no wish
    for _ in range(100):  # 10 req/s of 1000-token prompts, 10-token outputs: prompt-heavy
        wish.record(1000, 10)
    got = wish.workload()
    assert (got.rate, got.input_len, got.output_len) == (10.0, 1000, 10)
    want, _ = plan(Profile.from_dict(RECORDED), Workload(10.0, 1000, 10, 500, 50), gpus=4)
    assert wish.wish(live_nodes=4) == (want.prefill_nodes, want.decode_nodes)
    assert want.prefill_nodes >= 2  # 10 req/s x 100 ms of prefill: more than one prefill node's worth
    clock.now += 11  # the window passes: decode-heavy traffic now
    for _ in range(10):
        wish.record(100, 1000)
    assert wish.workload().rate == 1.0 and wish.workload().output_len == 1000
    assert wish.wish(live_nodes=4)[0] < want.prefill_nodes
    assert wish.wish(live_nodes=0) is None  # no live node: nothing to plan for


def test_collector_exports_both_series(profile_path):
    wish = PlannerWish(PlannerGoals(profile_path, gpus=3), clock=Clock())
    assert list(PlannerCollector(wish, lambda: 1).collect()) == []
    wish.record(200, 20)
    families = {f.name: f.samples[0].value for f in PlannerCollector(wish, lambda: 1).collect()}
    assert set(families) == {"pdserve:desired_prefill_nodes", "pdserve:desired_decode_nodes"}
    assert sum(families.values()) == 3  # --planner-gpus 3, one GPU per node


@needs_nodes
@pytest.mark.slow
def test_cluster_proxy_exports_the_wish(up_cluster, profile_path):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from tests.e2e.test_families_cluster import client_of

    cluster = up_cluster(
        1,
        1,
        f"--proxy-arg=--planner-profile={profile_path}",
        "--proxy-arg=--planner-window=600",
        "--proxy-arg=--planner-ttft-ms=2000",
        "--proxy-arg=--planner-itl-ms=100",
    )
    client = client_of(cluster)
    usage = []
    for i in range(4):
        out = client.completions.create(
            model=client.models.list().data[0].id, prompt=f"request {i} " * (5 + 10 * i), max_tokens=6
        )
        usage.append((out.usage.prompt_tokens, out.usage.completion_tokens))
    text = httpx.get(cluster.url + "/metrics", timeout=10).text
    got = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("pdserve:desired_")
    }
    prompt = round(sum(p for p, _ in usage) / 4)
    output = round(sum(o for _, o in usage) / 4)
    want, _ = plan(Profile.from_dict(RECORDED), Workload(4 / 600, prompt, output, 2000, 100), gpus=2)
    assert got == {
        "pdserve:desired_prefill_nodes": want.prefill_nodes,
        "pdserve:desired_decode_nodes": want.decode_nodes,
    }


def test_proxy_refuses_a_bad_planner_flag(tmp_path, model_dir, profile_path):
    assert_one_line_error(
        pdserve("proxy", "--model", model_dir, "--planner-profile", str(tmp_path / "nope.json")),
        "cannot read",
    )
    assert_one_line_error(
        pdserve("proxy", "--model", model_dir, "--planner-profile", profile_path, "--planner-window", "0"),
        "--planner-window",
    )
