"""Keeping one request's failure inside one step from failing its batch neighbours.

Two kinds of failure inside `EngineCore.step`:
- per-request work (its blocked token ids, its sampling parameters, its generator, its output) raises for one
  row: the batch is sampled again row by row, and only the rows that still raise fail; their requests end with
  an error (`StepOutput.error`) and every other request gets its token as usual;
- step-wide work (scheduling, the forward pass) raises: `StepFailed` names the requests in the step, and says
  whether the step may be retried (nothing was advanced yet) so the loop can try it once more before it aborts
  anything, and log who was in the batch.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """A step-wide failure; `request_ids` were scheduled in it, `retryable` when no request state moved."""

    def __init__(self, request_ids: Sequence[str], retryable: bool, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_ids = list(request_ids)
        self.retryable = retryable
        self.cause = cause


def sample_rows_isolated(
    sample_one: Callable[[int], tuple[int, object]], request_ids: Sequence[str]
) -> tuple[dict[int, tuple[int, object]], dict[str, str]]:
    """Run `sample_one(row)` for every row; returns ({row: (token, logprob)}, {request id: error message}).

    The fallback after a batched sample raised: a row whose own work raises is reported with its error, the
    others keep their tokens."""
    results: dict[int, tuple[int, object]] = {}
    failed: dict[str, str] = {}
    for row, request_id in enumerate(request_ids):
        try:
            results[row] = sample_one(row)
        except Exception as exc:  # noqa: BLE001 - whatever one request's parameters provoke fails only it
            log.error(
                "request %s failed while sampling (%s: %s); the rest of its batch goes on",
                request_id,
                type(exc).__name__,
                exc,
            )
            failed[request_id] = f"sampling failed for this request: {type(exc).__name__}: {exc}"
    return results, failed
