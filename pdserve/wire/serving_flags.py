"""Checks of the flags a node and the proxy both take, as vLLM reads them (torch-free: the proxy imports
it)."""

from __future__ import annotations

import argparse
import json

from pdserve.wire.errors import ConfigError
from pdserve.wire.sampling_params import MAX_LOGPROBS  # the most top logprobs a request may ask for


def json_object_flag(text: str | None, flag: str) -> dict:
    """A flag holding a JSON object (vLLM's --kv-transfer-config, --kv-events-config); {} when empty."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{flag} must be a JSON object")
    return raw


def check_shared_serving_flags(args: argparse.Namespace) -> None:
    """--max-logprobs (-1: the most we serve), --shutdown-timeout, --served-model-name; fills the defaults in
    place."""
    if args.max_logprobs == -1:
        args.max_logprobs = MAX_LOGPROBS
    if not 0 <= args.max_logprobs <= MAX_LOGPROBS:
        raise ConfigError(
            f"--max-logprobs must be in 0..{MAX_LOGPROBS} (or -1 for {MAX_LOGPROBS}), got {args.max_logprobs}"
        )
    if args.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    names = list(args.served_model_name or [])
    if any(not n.strip() for n in names) or len(set(names)) != len(names):
        raise ConfigError("--served-model-name: names must be non-empty and distinct")
