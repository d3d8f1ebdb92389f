"""A node's RPC socket against replay and oversized frames: a captured, signed Generate sent again (on the
same connection, or under another identity) is refused, counted and logged, and never runs twice; a 4 MB
message is cut off by ZMQ (MAXMSGSIZE) before the node reads it; the node keeps serving throughout."""

from __future__ import annotations

import uuid

import pytest
import zmq

from tests.harness.nodes import prompts, start_node, wait_for, wait_healthy

pytestmark = pytest.mark.slow


@pytest.fixture
def decode(model_dir, tmp_path):
    node = start_node("decode", model_dir, str(tmp_path), kv_role="kv_both")
    try:
        wait_healthy(node)
        yield node
    finally:
        node.stop()


def dropped(node, reason: str) -> float:
    return node.metrics().get(f'pdserve_node_dropped_frames_total{{reason="{reason}"}}', 0.0)


def test_a_replayed_generate_runs_once(decode, proxy):
    from pdserve.wire.node_messages import Generate
    from pdserve.wire.sampling_params import SamplingParams

    sock = proxy.socket(decode.rpc)
    identity = proxy.identities[sock]
    rid = proxy.track(uuid.uuid4().hex)
    msg = Generate(
        request_id=rid,
        prompt_token_ids=prompts(1, [12])[0],
        params=SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True).to_dict(),
    )
    captured = proxy.codec.encode_bytes(msg, context=b"from:" + identity)
    sock.send(captured)
    (first,) = proxy.wait(rid)
    assert first.finish_reason == "length" and len(first.token_ids) == 4
    # 1. the same bytes again, same connection: the sequence number is spent
    sock.send(captured)
    # 2. the same bytes under another identity: the MAC was over the original sender's identity
    other = proxy.ctx.socket(zmq.DEALER)
    other.setsockopt(zmq.LINGER, 0)
    other.setsockopt(zmq.IDENTITY, b"replayer")
    other.connect(decode.rpc)
    other.send(captured)
    assert wait_for(lambda: dropped(decode, "replay") >= 1 and dropped(decode, "hmac") >= 1)
    proxy.pump(0.5)
    assert sum(1 for m in first.messages if getattr(m, "finished", False)) == 1  # ran once
    assert "dropped a frame" in decode.log() and "replayed" in decode.log()
    # 3. a 4 MB message: ZMQ refuses it at the transport (the peer is disconnected), nothing is answered
    big = proxy.ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(decode.rpc)
    big.send(b"\x00" * (4 << 20))
    other.close(0)
    big.close(0)
    # the node keeps serving
    (ok,) = proxy.wait(proxy.generate(decode, prompts(2, [10])[0]))
    assert ok.finish_reason == "length" and len(ok.token_ids) == 8
    assert dropped(decode, "garbage") == 0  # the 4 MB message never reached the node's decoder
