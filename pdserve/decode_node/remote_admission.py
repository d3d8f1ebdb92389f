"""The decode node's use of the engine core for requests whose prompt KV comes from a prefill node: reserve
blocks first (the request waits in the scheduler as WAITING_FOR_REMOTE_KVS), tell it when the KV has landed.
The engine core does the work (`EngineCore.reserve_remote / remote_kv_ready / release`).

Call these on the engine loop thread only (EngineLoop.call / hooks): they touch scheduler state.
"""

from __future__ import annotations

from pdserve.engine.engine_core import NoRoomError, Reservation  # noqa: F401  (re-exported for the node)
from pdserve.engine.request import Request


def reserve(core, request_id: str, prompt_token_ids: list[int], params) -> Reservation:
    """Raises PromptTooLongError / ValueError (400) or NoRoomError (429); takes nothing then."""
    return core.reserve_remote(request_id, prompt_token_ids, params)


def first_token_stop(core, request: Request, token_id: int):
    """Append the prefill node's first token; the final RequestStatus if it ends the request, else None.

    Reads only the scheduler's fixed settings (eos ids, max_model_len) and touches a request the scheduler
    never schedules while it waits for its remote KV, so the RPC thread may call it."""
    request.append_output_token(token_id)
    return core.scheduler.check_stop(request)


def release(core, request_id: str) -> None:
    core.release(request_id)
