"""`pdserve up` brings a failed node back: when to, how often, and on which ports (torch-free).

A node has failed when its process exited with an error or a signal, or when its /health says
"unhealthy" with an error (its engine can run no step: a tensor-parallel rank died, the engine loop
stopped); a node that drains, or exits 0 (SIGTERM drains a node, then it exits 0), has not. A failed node is
started again after a backoff that doubles from 1 s up to 30 s, at most --max-restarts times, then left dead
and reported. It comes back on the ports it bound the first time, so proxies, which subscribe to its events
port, reconnect by themselves and tell the restart by its new incarnation.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
HEALTH_EVERY_S = 1.0
PORT_FLAGS = {"--rpc-port": "rpc", "--events-port": "events", "--http-port": "http"}


def backoff_s(attempt: int) -> float:
    """Delay before restart number `attempt` (1-based)."""
    return min(FIRST_BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S)


@dataclass
class NodeRestarts:
    """One node's restart state."""

    limit: int
    restarts: int = 0
    due: Optional[float] = None  # monotonic time of the pending restart
    next_health: float = 0.0
    given_up: bool = False

    def schedule(self, now: float) -> Optional[float]:
        """Plan the next restart; its delay, or None once the limit is spent (then given_up)."""
        if self.restarts >= self.limit:
            self.given_up = True
            return None
        self.restarts += 1
        delay = backoff_s(self.restarts)
        self.due = now + delay
        return delay


def failed_health(http: str) -> Optional[str]:
    """The error a node's /health reports when its engine is broken; None when it is fine, draining,
    warming up or not answering (a process that is gone is caught by its exit)."""
    try:
        with urllib.request.urlopen(http + "/health", timeout=2) as r:
            r.read()
            return None
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read() or b"{}")
        except ValueError:
            return None
        if body.get("status") == "unhealthy":
            return str(body.get("error") or "unhealthy")
        return None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def pinned_ports(argv: list[str], endpoints: dict[str, str]) -> list[str]:
    """argv with each port flag set to the port the node bound the first time (endpoints: rpc, events, http
    URLs as its ready line gave them)."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        name = PORT_FLAGS.get(arg)
        if name and endpoints.get(name):
            out[i + 1] = endpoints[name].rsplit(":", 1)[1].strip("/")
    return out


def health_due(state: NodeRestarts) -> bool:
    now = time.monotonic()
    if now < state.next_health:
        return False
    state.next_health = now + HEALTH_EVERY_S
    return True
