"""The planner's wish, for autoscalers: how many prefill and decode nodes the traffic this proxy sees would
want, exported as `pdserve:desired_prefill_nodes` and `pdserve:desired_decode_nodes` beside vLLM's series.

The proxy keeps the requests it answered over the last `window_s` seconds (arrival rate, mean prompt and
output lengths) and, at each scrape, asks the planner (pdserve/planner/plan.py) for the best split of the
fleet's GPUs under the configured goals. The fleet is `gpus` when given, else the live nodes times the
profile's GPUs per node. Nothing is exported before a request has been answered in the window, nor while no
node is live: no wish rather than a made-up one.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Optional

from prometheus_client.core import GaugeMetricFamily

from pdserve.planner.plan import Workload, plan
from pdserve.planner.profile import Profile
from pdserve.proxy.config import PlannerGoals


class PlannerWish:
    def __init__(self, goals: PlannerGoals, clock: Callable[[], float] = time.monotonic):
        self.goals = goals
        self.profile = Profile.load(goals.profile_path)
        self.clock = clock
        self._done: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, prompt, output)

    def record(self, prompt_tokens: int, output_tokens: int) -> None:
        """An answered request (event loop thread)."""
        self._done.append((self.clock(), prompt_tokens, output_tokens))

    def workload(self) -> Optional[Workload]:
        """The window's traffic as a planner workload, None when the window holds no request."""
        cutoff = self.clock() - self.goals.window_s
        while self._done and self._done[0][0] < cutoff:
            self._done.popleft()
        n = len(self._done)
        if not n:
            return None
        prompt = sum(p for _, p, _ in self._done) / n
        output = sum(o for _, _, o in self._done) / n
        return Workload(
            rate=n / self.goals.window_s,
            input_len=max(round(prompt), 1),
            output_len=max(round(output), 1),
            ttft_ms=self.goals.ttft_ms,
            itl_ms=self.goals.itl_ms,
        )

    def wish(self, live_nodes: int) -> Optional[tuple[int, int]]:
        """(prefill nodes, decode nodes) the planner would run for the window's traffic."""
        workload = self.workload()
        gpus = self.goals.gpus or live_nodes * self.profile.tensor_parallel_size
        if workload is None or gpus < self.profile.tensor_parallel_size:
            return None
        best, _ = plan(self.profile, workload, gpus)
        return best.prefill_nodes, best.decode_nodes


class PlannerCollector:
    """Prometheus collector of the wish, computed at scrape time."""

    def __init__(self, wish: PlannerWish, live_nodes: Callable[[], int]):
        self.wish, self.live_nodes = wish, live_nodes

    def collect(self):
        got = self.wish.wish(self.live_nodes())
        if got is None:
            return
        for role, value in zip(("prefill", "decode"), got, strict=True):
            yield GaugeMetricFamily(
                f"pdserve:desired_{role}_nodes",
                f"{role.capitalize()} nodes the planner would run for the last window's traffic",
                value=float(value),
            )
