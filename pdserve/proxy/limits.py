"""Limits on concurrent sequences (choices: prompts x n): one request's, and one API key's across its
requests.

A sequence costs a node a KV slot and a batch row for as long as it runs, so it is what a client must not be
able to take without bound: one request asking n=128 over a batch of prompts, or one key opening many such
requests. Over the per-request limit: 400 (the request can never run). Over the per-key limit: 429 (retry
later). Clients are told apart by their bearer token (all clients share one bucket when the proxy has no
--api-key).
"""

from __future__ import annotations

import hashlib

from pdserve.proxy.errors import APIError, bad_request


class SequenceLimits:
    def __init__(self, per_request: int, per_key: int):
        self.per_request = per_request
        self.per_key = per_key
        self.in_use: dict[str, int] = {}

    @staticmethod
    def key_of(authorization: str) -> str:
        """A stable name for the caller's key that does not keep the key itself."""
        token = authorization.partition(" ")[2].strip()
        return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:16] if token else "anonymous"

    def acquire(self, key: str, sequences: int) -> None:
        if sequences > self.per_request:
            raise bad_request(
                f"this request asks for {sequences} sequences (prompts x n); at most "
                f"{self.per_request} are allowed per request",
                param="n",
            )
        used = self.in_use.get(key, 0)
        if used + sequences > self.per_key:
            raise APIError(
                429,
                f"too many concurrent sequences for this API key ({used} running, {sequences} "
                f"asked, limit {self.per_key}); retry later",
                code="too_many_sequences",
            )
        self.in_use[key] = used + sequences

    def release(self, key: str, sequences: int) -> None:
        left = self.in_use.get(key, 0) - sequences
        if left > 0:
            self.in_use[key] = left
        else:
            self.in_use.pop(key, None)
