"""Ties the KV producer to the engine's step: which blocks become final before the forward, each layer's KV as
soon as that layer has written it, and the end of the step.

It is an `EngineCore.step_observer`: `before_forward` gives the producer a StepProgress for every scheduled
request that is transferring (start_step) and sets the runner's `on_layer_done`, so each layer's KV is pushed
while later layers compute; `after_forward` ends the step. The hook is set only for steps that move KV, since
a set hook keeps the runner off its CUDA graphs. Runs on the engine loop thread, inside `core.step()`.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from pdserve.kvconnector.producer import StepProgress

log = logging.getLogger(__name__)


class TransferStepHooks:
    def __init__(self, core, producer, transfer_id: Callable[[str], Optional[str]]):
        """transfer_id(engine request id) -> the connector's request id when that request is transferring."""
        self.core, self.producer, self.transfer_id = core, producer, transfer_id
        self._planned = False
        core.step_observers.append(self)

    def before_forward(self, plan) -> None:
        self.producer.begin_step()  # every step: it may reuse blocks whose copies to a peer are still queued
        scheduler = self.core.scheduler
        progress = []
        for item in plan.scheduled:
            rid = self.transfer_id(item.request_id)
            request = scheduler.get_request(item.request_id) if rid is not None else None
            if request is None:
                continue
            computed = item.num_computed_tokens + item.num_new_tokens
            progress.append(
                StepProgress(rid, computed, list(item.block_ids), computed >= request.num_prompt_tokens)
            )
        plans = self.producer.start_step(progress) if progress else []
        self._planned = bool(plans)
        if not plans and progress:
            self.producer.end_step()
        self.core.runner.on_layer_done = self._layer_done if self._planned else None

    def _layer_done(self, layer: int) -> None:
        self.producer.save_layer(layer)

    def after_forward(self, ok: bool) -> None:
        self.core.runner.on_layer_done = None
        if self._planned:
            self._planned = False
            self.producer.end_step(ok)
