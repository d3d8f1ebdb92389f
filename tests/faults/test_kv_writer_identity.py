"""Only the prefill node a decode node asked can end a request's transfer: real nodes (tcp data plane).

Any producer holding the cluster's KV secret can open a link to a decode node's KV listener. Before, such a
producer could send `Done` or `Abort` naming another request's id and end its transfer (the blocks freed or
the request failed while its real writer still wrote). The decode node now gives each request's prefill node a
KV id of its own (`Prefill.kv_request_id`: the request id plus a random part); frames naming the plain request
id, or a guessed suffix, end nothing and are logged, and the request goes on to finish normally.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
import torch

from tests.faults.test_node_faults import prompt, warm_up
from tests.harness.nodes import SECRET, assert_blocks_balanced, prefill_decode_pair, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
KV_TIMEOUT = 8.0  # long enough for the stranger's frames and the checks while the real writer is frozen


@pytest.fixture
def pair(model_dir, tmp_path):
    with prefill_decode_pair(model_dir, str(tmp_path), KV_TIMEOUT) as nodes:
        yield nodes


def stranger(model_dir: str):
    """An authenticated producer of the same layout that no decode node asked for anything."""
    from pdserve.engine.checkpoint import load_arch_config
    from pdserve.kvconnector.connector import ConnectorConfig
    from pdserve.kvconnector.producer import KVProducer

    arch = load_arch_config(model_dir)
    config = ConnectorConfig(
        model=os.path.basename(os.path.normpath(model_dir)),
        dtype="float32",
        block_size=16,
        num_layers=arch.num_hidden_layers,
        num_kv_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        secret=SECRET,
        timeout=KV_TIMEOUT,
    )
    shape = (2, 4, 16, arch.num_key_value_heads, arch.head_dim)
    return KVProducer(config, [torch.zeros(shape) for _ in range(arch.num_hidden_layers)])


def kv_address(decode) -> tuple[str, int]:
    host, port = re.search(r"KV consumer \S+ listening on (\S+):(\d+)", decode.log()).groups()
    return host, int(port)


def test_frames_naming_another_requests_id_end_nothing(pair, proxy, model_dir):
    from pdserve.wire.frames import Abort, Done

    prefill, decode = pair
    warm_up(proxy, prefill, decode)
    prefill.proc.send_signal(signal.SIGSTOP)  # the real writer holds the request...
    rid = proxy.generate(decode, prompt(60, 7), mode="disaggregated", prefill=prefill, max_tokens=6)
    assert wait_for(lambda: decode.blocks()["used"] > 0, timeout=5)
    producer = stranger(model_dir)
    try:
        link = producer.connect(kv_address(decode))  # ...while a stranger that passed the handshake
        link.send(Done(request_id=rid, nbytes=0))  # tries to end it by its id,
        link.send(Abort(request_id=rid, reason="not yours"))
        link.send(Abort(request_id=f"{rid}~kv-{'0' * 16}", reason="a guess"))  # and by a guessed KV id
        assert wait_for(lambda: decode.log().count("KV end for") >= 3, timeout=5), decode.log()[-2000:]
        proxy.pump(0.5)
        result = proxy.results[rid]
        assert result.error is None and not result.done  # still waiting for its own writer
        assert decode.blocks()["used"] > 0
    finally:
        producer.close()
    prefill.proc.send_signal(signal.SIGCONT)
    (result,) = proxy.wait(rid, timeout=KV_TIMEOUT + 10)
    assert result.error is None and result.finish_reason == "length" and len(result.token_ids) == 6
    assert wait_for(lambda: decode.blocks()["used"] == 0)
    assert_blocks_balanced(decode)
    assert_blocks_balanced(prefill)
