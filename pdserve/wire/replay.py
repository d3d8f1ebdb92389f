"""Replay protection for whole-frame transports (ZMQ): per sender, sequence numbers must rise.

Senders number frames with `FrameCodec.next_seq()`, nanoseconds since the epoch (strictly increasing), so a
restarted sender still counts upward. A receiver refuses a frame whose number is not above the last one from
that sender (replayed or reordered), or is further than the window from its own clock (a replay after the
receiver forgot the sender, or clocks out of sync). The sender is whatever the frame's MAC binds (its ZMQ
identity), so a captured frame sent again under another identity fails its MAC first.
"""

from __future__ import annotations

import time

from pdserve.wire.frames import ReplayedFrame

REPLAY_WINDOW_S = 300.0


class ReplayGuard:
    """Per sender, sequence numbers must rise, and lie within REPLAY_WINDOW_S of our clock (time-based ns).

    Senders silent for longer than the window are forgotten: their old frames are refused by age anyway."""

    def __init__(self, window_s: float = REPLAY_WINDOW_S):
        self.window_ns = int(window_s * 1e9)
        self._last: dict[bytes, int] = {}

    def check(self, sender: bytes, seq: int, now_ns: int | None = None) -> None:
        now_ns = time.time_ns() if now_ns is None else now_ns
        if abs(now_ns - seq) > self.window_ns:
            raise ReplayedFrame(
                f"frame sequence {seq} is {abs(now_ns - seq) / 1e9:.0f}s off this node's clock "
                f"(window {self.window_ns / 1e9:.0f}s): replayed, or clocks out of sync"
            )
        last = self._last.get(sender)
        if last is not None and seq <= last:
            raise ReplayedFrame(
                f"frame sequence {seq} not above the last one seen from this sender ({last}): "
                "replayed or reordered"
            )
        self._last[sender] = seq
        if len(self._last) > 4096:
            self._last = {k: v for k, v in self._last.items() if now_ns - v <= self.window_ns}
