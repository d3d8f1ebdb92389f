"""Node faults with real processes: a prefill node frozen or killed before the first token, a decode node
killed mid-request, malformed and unsigned frames on both nodes' sockets. Every case ends within --kv-timeout
and leaves free + used + cached == total with nothing used."""

from __future__ import annotations

import random
import signal
import struct
import time

import pytest

from tests.harness.nodes import (
    assert_blocks_balanced,
    prefill_decode_pair,
    start_node,
    wait_for,
    wait_healthy,
)

pytestmark = pytest.mark.slow
KV_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return str(tmp_path_factory.mktemp("node-logs"))


@pytest.fixture
def pair(model_dir, logs):
    with prefill_decode_pair(model_dir, logs, KV_TIMEOUT) as nodes:
        yield nodes


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


def warm_up(proxy, prefill, decode) -> None:
    """One full request, so the decode node's DEALER and KV link to the prefill node exist."""
    (result,) = proxy.wait(proxy.generate(decode, prompt(20, 1), mode="disaggregated", prefill=prefill))
    assert result.error is None


def test_prefill_node_frozen_before_first_token_gives_retryable_error(pair, proxy):
    prefill, decode = pair
    warm_up(proxy, prefill, decode)
    prefill.proc.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    rid = proxy.generate(decode, prompt(60, 2), mode="disaggregated", prefill=prefill, max_tokens=50)
    assert wait_for(lambda: decode.blocks()["used"] > 0, timeout=5)  # the reservation is held meanwhile
    (result,) = proxy.wait(rid, timeout=KV_TIMEOUT + 10)
    assert result.error is not None and result.error.retryable and result.token_ids == []
    assert result.error.status in (503, 504)
    assert time.monotonic() - started < KV_TIMEOUT + 3
    # the frozen prefill node may still write into the reserved blocks when it wakes: they stay in quarantine
    # until it confirms or 3 x --kv-timeout passes, never handed to another request meanwhile
    assert decode.blocks()["used"] > 0
    assert wait_for(lambda: decode.blocks()["used"] == 0, timeout=3 * KV_TIMEOUT + 5)
    assert_blocks_balanced(decode)


def test_prefill_node_killed_before_first_token_gives_retryable_error(pair, proxy):
    prefill, decode = pair
    warm_up(proxy, prefill, decode)
    prefill.proc.send_signal(signal.SIGSTOP)  # holds the request before its first token...
    rid = proxy.generate(decode, prompt(60, 3), mode="disaggregated", prefill=prefill, max_tokens=50)
    assert wait_for(lambda: decode.blocks()["used"] > 0, timeout=5)
    started = time.monotonic()
    prefill.kill9()  # ...then it dies with the request in flight
    (result,) = proxy.wait(rid, timeout=KV_TIMEOUT + 10)
    assert result.error is not None and result.error.retryable and result.token_ids == []
    assert time.monotonic() - started < KV_TIMEOUT + 2
    assert wait_for(lambda: decode.blocks()["used"] == 0)
    assert_blocks_balanced(decode)
    # The decode node still serves: colocated, and disaggregated requests to the dead node fail retryably.
    (ok,) = proxy.wait(proxy.generate(decode, prompt(10, 4)))
    assert ok.finish_reason == "length"
    (dead,) = proxy.wait(
        proxy.generate(decode, prompt(10, 5), mode="disaggregated", prefill=prefill), timeout=KV_TIMEOUT + 10
    )
    assert dead.error is not None and dead.error.retryable
    assert wait_for(lambda: decode.blocks()["used"] == 0)
    assert_blocks_balanced(decode)


def test_decode_node_killed_mid_request_frees_the_prefill_nodes_blocks(pair, proxy):
    prefill, decode = pair
    rid = proxy.generate(decode, prompt(80, 6), mode="disaggregated", prefill=prefill, max_tokens=1000)
    proxy.wait_tokens(rid, 2)
    decode.kill9()
    assert wait_for(lambda: prefill.blocks()["used"] == 0, timeout=KV_TIMEOUT + 5)
    assert_blocks_balanced(prefill)
    assert prefill.health()["status"] == "ok"


def _bad_frames(proxy) -> dict[str, bytes]:
    from pdserve.wire.node_messages import Generate, make_codec
    from pdserve.wire.sampling_params import SamplingParams

    msg = Generate(
        request_id="evil", prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=2).to_dict()
    )
    good = proxy.codec.encode_bytes(msg)
    wrong_version = bytearray(good)
    wrong_version[4] = 99  # the frame version byte after the magic
    bad_schema = bytearray(good)
    struct.pack_into("!H", bad_schema, 6, 42)  # the schema version
    return {
        "garbage": b"\x00not a frame at all" * 3,
        "hmac": make_codec(b"some other secret").encode_bytes(msg),
        "truncated": good[:-10],
        "version": bytes(wrong_version),
        "schema": bytes(bad_schema),
        "empty": b"",
    }


@pytest.mark.parametrize("target", ["decode", "prefill"])
def test_malformed_and_unsigned_frames_are_dropped_and_the_node_keeps_serving(pair, proxy, target):
    prefill, decode = pair
    node = decode if target == "decode" else prefill
    for _name, frame in _bad_frames(proxy).items():
        proxy.send_raw(node, frame)
    proxy.socket(node.rpc).send_multipart([b"a", b"b", b"c"])  # stray parts
    proxy.pump(0.5)
    assert "evil" not in proxy.results  # nothing answered a bad frame
    (result,) = proxy.wait(proxy.generate(node, prompt(12, 7)))
    assert result.finish_reason == "length" and len(result.token_ids) == 8
    if target == "decode":
        (result,) = proxy.wait(proxy.generate(decode, prompt(12, 8), mode="disaggregated", prefill=prefill))
        assert result.finish_reason == "length"
    dropped = sum(v for k, v in node.metrics().items() if k.startswith("pdserve_node_dropped_frames_total"))
    assert dropped >= 6
    assert wait_for(lambda: node.blocks()["used"] == 0)
    assert_blocks_balanced(node)


def test_prefill_door_rejection_frees_the_decode_nodes_blocks_at_once(model_dir, logs, proxy):
    """A prefill node that refuses at its door (queue full: 429) writes nothing, says so with prefill_done,
    and the decode node frees the reserved blocks then, not after its quarantine (3 x --kv-timeout)."""
    prefill = start_node("prefill", model_dir, logs, kv_timeout=KV_TIMEOUT, extra=["--max-num-waiting", "0"])
    decode = start_node("decode", model_dir, logs, kv_timeout=KV_TIMEOUT)
    try:
        wait_healthy(prefill, decode)
        started = time.monotonic()
        (result,) = proxy.wait(
            proxy.generate(decode, prompt(60, 2), mode="disaggregated", prefill=prefill, max_tokens=5),
            timeout=10,
        )
        assert result.error is not None and result.error.status == 429 and result.error.retryable
        assert wait_for(lambda: decode.blocks()["used"] == 0, timeout=KV_TIMEOUT)
        assert time.monotonic() - started < KV_TIMEOUT
        assert_blocks_balanced(decode)
    finally:
        prefill.stop()
        decode.stop()
