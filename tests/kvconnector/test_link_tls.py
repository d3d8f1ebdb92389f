"""Encrypted KV control links ($PDSERVE_CURVE=1): frames still arrive and authenticate, and a tap between the
two sides sees none of their contents (a request id and a chunk's bytes travel in clear with it off, not with
it on). A peer without the secret still gets no session: TLS gives confidentiality, the channel-bound session
keys authenticate."""

from __future__ import annotations

import pytest

from pdserve.kvconnector.link import Listener, connect
from pdserve.wire import curve
from pdserve.wire.frames import Abort, KVChunk, SignedCodec, TensorMeta
from tests.kvconnector.test_link_session import SECRET, Tap, wait

MARK = "request-7f3a-visible-only-in-clear"
BODY = bytes(range(256)) * 4  # a chunk's "KV bytes": 1 KiB with a recognisable pattern


def exchange(monkeypatch, encrypted: bool, client_secret: bytes = SECRET):
    monkeypatch.setenv(curve.ENV, "1" if encrypted else "0")
    got = []
    listener = Listener(
        "127.0.0.1", 0, SignedCodec(SECRET), lambda link, msg, body: got.append((msg, bytes(body)))
    )
    tap = Tap(listener.address)
    link = connect(tap.address, SignedCodec(client_secret), lambda *a: None)
    try:
        link.send(Abort(request_id=MARK, reason="tap test"))
        link.send(
            KVChunk(
                request_id=MARK,
                seq=0,
                first_layer=0,
                num_layers=1,
                block_ids=[0, 1, 2, 3],
                tensor=TensorMeta("float16", [1, 2, 4, 64]),
            ),
            BODY,
        )
        wait(lambda: len(got) == 2, timeout=3)
    except ConnectionError:
        pass
    finally:
        link.close()
        listener.close()
    return got, bytes(tap.sent)


@pytest.mark.parametrize("encrypted", [False, True])
def test_what_a_tap_sees(monkeypatch, encrypted):
    got, seen = exchange(monkeypatch, encrypted)
    assert [type(m).__name__ for m, _ in got] == ["Abort", "KVChunk"] and got[1][1] == BODY
    visible = MARK.encode() in seen or BODY[:64] in seen
    assert visible is not encrypted


def test_a_peer_without_the_secret_gets_no_session_over_tls(monkeypatch):
    got, _ = exchange(monkeypatch, True, client_secret=b"not-the-secret")
    assert got == []
