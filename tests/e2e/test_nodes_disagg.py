"""A prefill node and a decode node as real processes, KV over tcp: greedy tokens equal transformers' greedy,
prefix hits on both sides, seeded sampling equals colocated, abort frees blocks on both nodes."""

from __future__ import annotations

import pytest

from tests.e2e.test_nodes_harness import (
    assert_blocks_balanced,
    hf_greedy,
    prompts,
    proxy,  # noqa: F401 - a fixture
    start_node,
    wait_for,
    wait_healthy,
)  # noqa: F401 (proxy: a fixture)

pytestmark = pytest.mark.slow
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def nodes(model_dir, tmp_path_factory):
    logs = str(tmp_path_factory.mktemp("node-logs"))
    prefill = start_node(
        "prefill", model_dir, logs, extra=["--max-num-batched-tokens", "32"]
    )  # chunked prefill
    decode = start_node("decode", model_dir, logs)
    try:
        wait_healthy(prefill, decode)
        yield prefill, decode
    finally:
        prefill.stop()
        decode.stop()


def both_idle(prefill, decode) -> bool:
    return prefill.blocks()["used"] == 0 and decode.blocks()["used"] == 0


def test_disaggregated_greedy_matches_transformers(nodes, proxy, model_dir):
    prefill, decode = nodes
    batch = prompts(11, [5, 16, 40, 75])
    rids = [
        proxy.generate(
            decode,
            p,
            mode="disaggregated",
            prefill=prefill,
            max_tokens=MAX_TOKENS,
            logprobs=1 if i == 1 else None,
        )
        for i, p in enumerate(batch)
    ]
    results = proxy.wait(*rids)
    assert [r.error for r in results] == [None] * 4
    assert [r.token_ids for r in results] == hf_greedy(model_dir, batch, MAX_TOKENS)
    for r in results:
        assert r.finish_reason == "length"
        assert (
            len(r.messages[0].token_ids) == 1
        )  # the first token is forwarded on its own, before the KV lands
        assert r.timings["prefill"] > 0 and r.timings["transfer"] > 0
    assert len(results[1].logprobs) == MAX_TOKENS
    assert wait_for(lambda: both_idle(prefill, decode))
    assert_blocks_balanced(prefill)
    assert_blocks_balanced(decode)
    m = decode.metrics()
    assert m['pdserve_kv_bytes_received_total{role="consumer",transport="tcp"}'] > 0
    assert prefill.metrics()['pdserve_kv_bytes_sent_total{role="producer",transport="tcp"}'] > 0


def test_repeated_prompt_hits_both_prefix_caches(nodes, proxy):
    prefill, decode = nodes
    prompt = prompts(12, [70])[0]
    (first,) = proxy.wait(proxy.generate(decode, prompt, mode="disaggregated", prefill=prefill))
    received = decode.metrics()['pdserve_kv_bytes_received_total{role="consumer",transport="tcp"}']
    (second,) = proxy.wait(proxy.generate(decode, prompt, mode="disaggregated", prefill=prefill))
    assert first.token_ids == second.token_ids
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 64  # hits on the prefill node
    # The decode node held 4 of the 5 prompt blocks itself, so only the last one moved the second time.
    moved = decode.metrics()['pdserve_kv_bytes_received_total{role="consumer",transport="tcp"}'] - received
    assert 0 < moved <= received / 4
    assert wait_for(lambda: both_idle(prefill, decode))


def test_seeded_sampling_equals_colocated(nodes, proxy):
    prefill, decode = nodes
    prompt = prompts(13, [21])[0]
    params = dict(temperature=0.9, top_p=0.95, seed=1234, max_tokens=10)
    (colocated,) = proxy.wait(proxy.generate(decode, prompt, **params))
    (disagg,) = proxy.wait(proxy.generate(decode, prompt, mode="disaggregated", prefill=prefill, **params))
    assert disagg.token_ids == colocated.token_ids


def test_abort_during_decode_frees_blocks_on_both_nodes(nodes, proxy):
    prefill, decode = nodes
    rid = proxy.generate(decode, prompts(14, [50])[0], mode="disaggregated", prefill=prefill, max_tokens=1000)
    proxy.wait_tokens(rid, 4)
    proxy.abort(decode, rid)
    (result,) = proxy.wait(rid)
    assert result.finish_reason == "abort"
    assert wait_for(lambda: both_idle(prefill, decode))
    assert_blocks_balanced(prefill)
    assert_blocks_balanced(decode)


def test_first_token_that_finishes_ends_without_decoding(nodes, proxy):
    prefill, decode = nodes
    (result,) = proxy.wait(
        proxy.generate(decode, prompts(15, [30])[0], mode="disaggregated", prefill=prefill, max_tokens=1)
    )
    assert len(result.token_ids) == 1 and result.finish_reason == "length"
    assert len(result.messages) == 1  # one message: the first token, already final
    assert wait_for(lambda: both_idle(prefill, decode))
    assert_blocks_balanced(decode)


def test_small_decode_node_batches_preempts_and_still_matches(nodes, proxy, model_dir, tmp_path):
    """A decode node with 12 blocks and 2 sequences: remote requests queue for a batch slot, grow, get preempted
    (recomputed on the decode node) and still produce transformers' greedy tokens."""
    prefill, _ = nodes
    small = start_node(
        "decode", model_dir, str(tmp_path), extra=["--num-gpu-blocks-override", "12", "--max-num-seqs", "2"]
    )
    try:
        wait_healthy(small)
        batch = prompts(16, [30, 31, 29, 33])
        rids = [proxy.generate(small, p, mode="disaggregated", prefill=prefill, max_tokens=40) for p in batch]
        results = proxy.wait(*rids, timeout=120)
        retried = [i for i, r in enumerate(results) if r.error is not None]
        assert all(results[i].error.status == 429 and results[i].error.retryable for i in retried)
        for i in retried:  # a full cache refuses with a retryable 429, as the proxy would retry it
            (results[i],) = proxy.wait(
                proxy.generate(small, batch[i], mode="disaggregated", prefill=prefill, max_tokens=40),
                timeout=120,
            )
        assert [r.token_ids for r in results] == hf_greedy(model_dir, batch, 40)
        assert small.metrics()["pdserve_node_preemptions_total"] > 0
        assert wait_for(lambda: small.blocks()["used"] == 0)
        assert_blocks_balanced(small)
    finally:
        small.stop()
