"""Typed reads of a JSON request body's fields (torch-free): each wrong type is a 400 naming the field."""

from __future__ import annotations

from pdserve.proxy.errors import bad_request

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def is_int(x) -> bool:
    """An integer the wire can carry (msgpack's int64): a larger one is a 400 here, not a 500 at encoding."""
    return isinstance(x, int) and not isinstance(x, bool) and INT64_MIN <= x <= INT64_MAX


def is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def get_field(body: dict, name: str, kind: str, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    ok = {
        "int": is_int,
        "num": is_num,
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "dict": lambda v: isinstance(v, dict),
    }[kind](value)
    if not ok:
        words = {
            "int": "an integer",
            "num": "a number",
            "bool": "a boolean",
            "str": "a string",
            "dict": "an object",
        }
        raise bad_request(f"'{name}' must be {words[kind]}, got {value!r}", param=name)
    return value
