"""The client's side of one response: its disconnect, noticed while the proxy waits on the nodes, and a stream
that cleans up however it ends."""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import StreamingResponse


class ClientGone(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, coro, on_gone=lambda: None):
    """Run coro; if the client disconnects first, call on_gone (abort the node work at once, whatever the
    cancelled coroutine still does), cancel coro and raise ClientGone."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    on_gone()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    raise ClientGone


class JobStream(StreamingResponse):
    """A stream that runs `on_close` however it ends, even when the client left before the first byte (then
    Starlette never starts the body iterator, so a generator's `finally` alone would never run)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()  # run the generator's own cleanup now, not at garbage collection
                except Exception:  # noqa: BLE001 - still running elsewhere, or already closed
                    pass
