"""Ties the KV producer to the engine's step: which blocks become final before the forward, each layer's KV as
soon as that layer has written it, and the end of the step.

The engine core has no public step hooks yet, so this adapter wraps two of its parts on this node only:
  - `scheduler.schedule`: after the original returns the step's plan, the producer gets a StepProgress for every
    scheduled request that is transferring (start_step), so the worker knows which blocks to gather;
  - `runner.execute`: the forward pass. When the runner offers `on_layer_done(layer)` (the model calls it after
    each layer's attention wrote its KV), save_layer runs there, so transfer overlaps compute; it is set only for
    steps that move KV, because a set hook keeps the runner off its CUDA graphs. Without the hook, every layer is
    saved right after the forward (correct, but the transfer is then fully exposed).
Both wrappers run on the engine loop thread, inside `core.step()`.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

log = logging.getLogger(__name__)


class TransferStepHooks:
    def __init__(self, core, producer, transfer_id: Callable[[str], Optional[str]]):
        """transfer_id(engine request id) -> the connector's request id when that request is transferring."""
        from kvconnector.producer import StepProgress

        self._progress_type = StepProgress
        self.core, self.producer, self.transfer_id = core, producer, transfer_id
        self.num_layers = core.runner.arch.num_hidden_layers
        self._planned = False
        self._schedule = core.scheduler.schedule
        self._execute = core.runner.execute
        core.scheduler.schedule = self._schedule_and_plan
        core.runner.execute = self._execute_and_save
        self.per_layer = hasattr(core.runner, "on_layer_done")
        if not self.per_layer:
            log.info("the model runner has no on_layer_done hook: KV is pushed after the whole forward")

    def _schedule_and_plan(self):
        plan = self._schedule()
        scheduler = self.core.scheduler
        progress = []
        for item in plan.scheduled:
            rid = self.transfer_id(item.request_id)
            request = scheduler.get_request(item.request_id) if rid is not None else None
            if request is None:
                continue
            computed = item.num_computed_tokens + item.num_new_tokens
            progress.append(self._progress_type(rid, computed, list(item.block_ids),
                                                computed >= request.num_prompt_tokens))
        plans = self.producer.start_step(progress) if progress else []
        self._planned = bool(plans)
        if not plans and progress:
            self.producer.end_step()
        if self.per_layer:
            # Only for steps that move KV: a set hook keeps the runner off its CUDA graphs.
            self.core.runner.on_layer_done = self.producer.save_layer if plans else None
        return plan

    def _execute_and_save(self, *args, **kwargs):
        try:
            logits = self._execute(*args, **kwargs)
            if self._planned and not self.per_layer:
                for layer in range(self.num_layers):
                    self.producer.save_layer(layer)
            return logits
        finally:
            if self._planned:
                self._planned = False
                if self.per_layer:
                    self.core.runner.on_layer_done = None
                self.producer.end_step()
