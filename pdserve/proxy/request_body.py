"""Reading a request body into a JSON object, refusing every hostile shape with a named 4xx.

Checks, in order (the first failure answers): content type (application/json only, as vLLM: 400), size
(`--max-request-bytes`: 413, counted while the body streams in, so an oversized body is never held whole),
UTF-8 (400 naming the byte offset), JSON syntax, nesting depth (400; a deep body would otherwise exhaust the
parser's recursion: a RecursionError, a 500), and lone surrogates anywhere in it (400 naming the field:
"\\ud800" is valid JSON but no tokenizer, and no UTF-8 encoder, accepts it). Parsing runs in a worker thread
when the body is large, so the event loop keeps serving /health and every other request meanwhile.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pdserve.proxy.errors import APIError, bad_request

MAX_JSON_DEPTH = 64  # far above any OpenAI body (messages -> content parts -> text is 4)
THREAD_PARSE_BYTES = 64 << 10  # parse bodies larger than this off the event loop


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is over the {limit}-byte limit (--max-request-bytes)",
        code="request_too_large",
    )


def check_content_type(content_type: str) -> None:
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise bad_request(
            f"Unsupported Media Type: only 'application/json' is allowed, got {media or 'none'!r}",
            code="unsupported_media_type",
        )


async def read_limited(request, limit: int) -> bytes:
    """The body, or 413 as soon as more than `limit` bytes were declared or arrived."""
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _depth_over(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than limit (iterative: a deep value must not recurse here either)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return False


def surrogate_path(value: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) holding a lone surrogate, else None."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not _utf8_ok(item):
                return where or "body"
        elif isinstance(item, dict):
            for k, v in item.items():
                if not _utf8_ok(k):
                    return f"{where}.{k!r}".lstrip(".")
                stack.append((v, f"{where}.{k}".lstrip(".")))
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return None


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_json_object(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(
            f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_utf8"
        ) from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise bad_request(f"the request body nests deeper than {max_depth} levels", code="too_deep") from None
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if _depth_over(body, max_depth):
        raise bad_request(f"the request body nests deeper than {max_depth} levels", code="too_deep")
    where = surrogate_path(body)
    if where is not None:
        param = where.split(".")[0].split("[")[0]
        raise bad_request(
            f"'{where}' holds a lone surrogate (not valid Unicode text)", param=param, code="invalid_unicode"
        )
    return body


async def read_json_object(request, limit: int) -> dict:
    check_content_type(request.headers.get("content-type", ""))
    raw = await read_limited(request, limit)
    if len(raw) > THREAD_PARSE_BYTES:
        return await asyncio.to_thread(parse_json_object, raw)
    return parse_json_object(raw)
