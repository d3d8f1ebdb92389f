"""A link closed by another thread (the reaper after a peer's silence) while its reader is between two reads
must not hand its descriptor to the next connection: the old reader would read the new link's bytes.

Seen in the fault campaign (2026-12-04): a prefill node was stopped for 20 s and resumed; the reaper closed
the old KV link, a new one opened 15 ms later, and two seconds after that the new link failed "frame prefix
MAC does not verify", then "bad magic", and two transfers failed. Here the old reader is held in its message
handler (a slow handler, or a thread that lost the GIL) while the reaper closes the link and a new peer
connects; then it is let go while the new peer sends. The reaper only shuts the socket down; the descriptor
stays allocated until the reader itself closes it, so its number cannot go to the new connection."""

from __future__ import annotations

import threading

from pdserve.kvconnector.link import Listener, connect
from pdserve.wire.frames import Heartbeat, SignedCodec
from tests.kvconnector.test_link_session import SECRET, wait

FRAMES = 200


def test_reaped_link_keeps_its_descriptor_until_its_reader_ends():
    held, release = threading.Event(), threading.Event()
    got: dict[int, list] = {}
    drops: list[str] = []
    accepted = []

    def on_message(link, msg, body):
        got.setdefault(accepted.index(link), []).append(msg)
        if link is accepted[0] and not held.is_set():
            held.set()
            release.wait(10)  # the old link's reader, between two reads

    listener = Listener(
        "127.0.0.1",
        0,
        SignedCodec(SECRET),
        on_message,
        on_drop=lambda link, reason: drops.append(reason),
        on_accept=accepted.append,
    )
    try:
        old_client = connect(listener.address, SignedCodec(SECRET), lambda *a: None)
        old_client.send(Heartbeat("old", 1.0))
        assert held.wait(5)
        old = accepted[0]
        old_fd = old.sock.fileno()
        old.close("peer silent for 20.4s")  # the reaper's thread, not the reader
        assert old.closed
        # shut down, but its descriptor stays allocated while its reader may still call recv() on it: the
        # kernel cannot give that number to the next connection accepted
        assert old.sock.fileno() == old_fd
        new_client = connect(listener.address, SignedCodec(SECRET), lambda *a: None)
        assert wait(lambda: len(accepted) == 2)
        new = accepted[1]
        assert new.sock.fileno() != old_fd
        release.set()  # the old reader reads again: end of stream, never the new link's bytes
        for i in range(FRAMES):
            new_client.send(Heartbeat("new", float(i)))
        assert wait(lambda: len(got.get(1, [])) == FRAMES), (len(got.get(1, [])), drops)
        assert [m.ts for m in got[1]] == [float(i) for i in range(FRAMES)]
        assert drops == [] and not new.closed
        assert wait(lambda: not old._thread.is_alive()) and old.sock.fileno() == -1  # closed by its reader
        old_client.close()
        new_client.close()
    finally:
        release.set()
        listener.close()
