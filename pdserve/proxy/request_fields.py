"""Every request field vLLM's CompletionRequest / ChatCompletionRequest accepts, each honoured or refused with
a 400 that names it; a key nobody knows is logged once (as ignored) and otherwise ignored, as OpenAI does.

Torch-free (the proxy). protocol.py parses the fields it always had; this module owns the audit and the fields
added beside them: penalties, logit_bias, bad_words, allowed_token_ids, cache_salt, structured output
(`response_format`, vLLM's `guided_*` and `structured_outputs`), priority, truncate_prompt_tokens,
prompt_logprobs.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

from pdserve.proxy.body_fields import get_field, is_int, is_num
from pdserve.proxy.errors import bad_request
from pdserve.wire.sampling_params import MAX_CACHE_SALT, MAX_LOGPROBS, tokenize_bad_words

log = logging.getLogger(__name__)

# Honoured (parsed in protocol.py or below). Fields vLLM takes that change nothing for this server are listed
# in NO_EFFECT with the reason; those that would change the output and are not implemented, in REFUSED_IF.
COMMON = {
    "model", "n", "best_of", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
    "stream", "stream_options", "max_tokens", "min_tokens", "ignore_eos", "skip_special_tokens",
    "include_stop_str_in_output", "return_token_ids", "user", "logprobs", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias", "bad_words", "allowed_token_ids", "cache_salt",
    "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
    "guided_decoding_backend", "priority", "truncate_prompt_tokens", "truncation_side", "add_special_tokens",
    "echo", "request_id", "prompt_logprobs",
}  # fmt: skip
COMPLETION_ONLY = {"prompt", "suffix"}
CHAT_ONLY = {
    "messages", "max_completion_tokens", "top_logprobs", "add_generation_prompt", "continue_final_message",
    "chat_template", "chat_template_kwargs", "documents", "tools", "tool_choice", "functions",
    "function_call", "parallel_tool_calls", "reasoning_effort", "include_reasoning",
}  # fmt: skip
NO_EFFECT = {
    "session_id": "an identity for tracing only",
    "stream_interval": "chunking of a stream only; tokens are sent as they come",
    "return_token_offsets": "vLLM ignores it outside its /render endpoints",
    "return_mm_kwargs": "vLLM ignores it outside its /render endpoints",
    "mm_processor_kwargs": "text-only models",
    "media_io_kwargs": "text-only models",
    "routed_experts_prompt_start": "no mixture-of-experts routing data is returned",
    "service_tier": "one tier",
    "metadata": "stored nowhere",
    "store": "nothing is stored",
}
# name -> predicate over its value: True means the value would change the output and is refused.
REFUSED_IF = {
    "use_beam_search": lambda v: bool(v),
    "length_penalty": lambda v: v not in (None, 1, 1.0),
    "logits_processors": lambda v: bool(v),
    "logprob_token_ids": lambda v: v is not None,
    "prompt_embeds": lambda v: v is not None,
    "return_tokens_as_token_ids": lambda v: bool(v),
    "spaces_between_special_tokens": lambda v: v is False,
    "watermarking": lambda v: bool(v),
    "kv_transfer_params": lambda v: v is not None,
    "ec_transfer_params": lambda v: v is not None,
    "vllm_xargs": lambda v: bool(v),
    "repetition_detection": lambda v: v is not None,
    "thinking_token_budget": lambda v: v not in (None, -1),
    "structural_tag": lambda v: v is not None,
    "guided_whitespace_pattern": lambda v: v is not None,
    "disable_structured_output": lambda v: bool(v),
}
WHY_REFUSED = {
    "use_beam_search": "beam search is not implemented",
    "logits_processors": "custom logits processors are not loaded by this server",
}
MAX_REMEMBERED_UNKNOWN = 256
_unknown_seen: set[str] = set()
_unknown_lock = threading.Lock()


def audit(body: dict, kind: str) -> None:
    """400 for a field whose value this server cannot honour; log each unknown key's name once."""
    for name, refuse in REFUSED_IF.items():
        if name in body and refuse(body[name]):
            why = WHY_REFUSED.get(name, "not supported by this server")
            raise bad_request(f"'{name}' is not supported ({why})", param=name)
    known = (
        COMMON | (COMPLETION_ONLY if kind == "completion" else CHAT_ONLY) | set(NO_EFFECT) | set(REFUSED_IF)
    )
    for key in body:
        if key not in known:
            _log_unknown(str(key)[:64])


def _log_unknown(key: str) -> None:
    with _unknown_lock:
        if key in _unknown_seen or len(_unknown_seen) >= MAX_REMEMBERED_UNKNOWN:
            return
        _unknown_seen.add(key)
    log.warning("request field %r is not known here and is ignored (logged once)", key)


# ---------------------------------------------------------------------------------------------------- fields


def extra_sampling(body: dict, tokenizer) -> dict:
    """SamplingParams keyword arguments for the fields added beside protocol.py's (checked: 400 named)."""
    vocab = len(tokenizer)
    out: dict = {}
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = body.get(name)
        if value is not None:
            if not is_num(value):
                raise bad_request(f"'{name}' must be a number, got {value!r}", param=name)
            out[name] = value
    bias = body.get("logit_bias")
    if bias:
        out["logit_bias"] = _logit_bias(bias, vocab)
    allowed = body.get("allowed_token_ids")
    if allowed is not None:
        if not isinstance(allowed, list) or not allowed or not all(is_int(t) for t in allowed):
            raise bad_request(
                "'allowed_token_ids' must be a non-empty list of token ids", param="allowed_token_ids"
            )
        bad = next((t for t in allowed if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(
                f"'allowed_token_ids' holds {bad}, outside the vocabulary (size {vocab})",
                param="allowed_token_ids",
            )
        out["allowed_token_ids"] = list(dict.fromkeys(allowed))
    words = body.get("bad_words")
    if words:
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise bad_request("'bad_words' must be a list of non-empty strings", param="bad_words")
        if len(words) > 256:
            raise bad_request("'bad_words' may hold at most 256 words", param="bad_words")
        out["bad_words"] = list(words)
        out["bad_words_token_ids"] = tokenize_bad_words(tokenizer, words)
    salt = body.get("cache_salt")
    if salt is not None:
        if not isinstance(salt, str) or not 0 < len(salt) <= MAX_CACHE_SALT:
            raise bad_request(
                f"'cache_salt' must be a string of 1 to {MAX_CACHE_SALT} characters", param="cache_salt"
            )
        out["cache_salt"] = salt
    priority = body.get("priority")
    if priority not in (None, 0):
        raise bad_request(
            "'priority' other than 0 is not supported (the scheduler is first come, first served)",
            param="priority",
        )
    spec, param = structured_spec(body)
    if spec is not None:
        from pdserve.wire.structured_grammar import check_spec

        try:
            check_spec(spec)
        except ValueError as exc:
            raise bad_request(f"'{param}' cannot be compiled to a grammar: {exc}", param=param) from None
        out["structured"] = spec
    return out


def prompt_logprobs(body: dict, stream: bool) -> Optional[int]:
    """vLLM's `prompt_logprobs` k (each prompt token's logprob and rank plus the top k), checked as vLLM does:
    not with stream (a stream has no field for them; 0 asks for nothing and is let through, as there); -1,
    vLLM's whole vocabulary, is refused: a vocabulary per prompt token does not fit the node wire."""
    k = get_field(body, "prompt_logprobs", "int", None)
    if k is None:
        return None
    if k == -1:
        raise bad_request(
            f"'prompt_logprobs' -1 (the whole vocabulary) is not supported; ask for at most {MAX_LOGPROBS}",
            param="prompt_logprobs",
        )
    if not 0 <= k <= MAX_LOGPROBS:
        raise bad_request(
            f"'prompt_logprobs' must be between 0 and {MAX_LOGPROBS}, got {k}", param="prompt_logprobs"
        )
    if stream and k > 0:
        raise bad_request(
            "'prompt_logprobs' are not available when 'stream' is true", param="prompt_logprobs"
        )
    return None if stream else k


def _logit_bias(bias, vocab: int) -> dict[int, float]:
    if not isinstance(bias, dict):
        raise bad_request("'logit_bias' must map token ids to numbers", param="logit_bias")
    if len(bias) > 1024:
        raise bad_request("'logit_bias' may hold at most 1024 entries", param="logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise bad_request(f"'logit_bias' key {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= tok < vocab:
            raise bad_request(
                f"'logit_bias' token {tok} is outside the vocabulary (size {vocab})", param="logit_bias"
            )
        if not is_num(value):
            raise bad_request(f"'logit_bias' value for {tok} must be a number", param="logit_bias")
        out[tok] = max(-100.0, min(100.0, float(value)))  # OpenAI clamps to [-100, 100]
    return out


def structured_spec(body: dict) -> tuple[Optional[dict], str]:
    """(SamplingParams.structured, the field it came from); at most one constraint per request (400 else)."""
    found: list[tuple[dict, str]] = []
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise bad_request("'response_format' must be an object", param="response_format")
        kind = fmt.get("type", "text")
        if kind == "json_object":
            found.append(({"json_object": True}, "response_format"))
        elif kind == "json_schema":
            js = fmt.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if schema is None:
                raise bad_request(
                    "'response_format' json_schema needs json_schema.schema", param="response_format"
                )
            found.append(({"json": schema}, "response_format"))
        elif kind != "text":
            raise bad_request(
                f"'response_format' type {kind!r} is not supported (text, json_object, json_schema)",
                param="response_format",
            )
    for field, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        if body.get(field) is not None:
            found.append(({key: body[field]}, field))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("'structured_outputs' must be an object", param="structured_outputs")
        for key in ("json", "regex", "choice", "grammar"):
            if so.get(key) is not None:
                found.append(({key: so[key]}, "structured_outputs"))
        if so.get("json_object"):
            found.append(({"json_object": True}, "structured_outputs"))
    if len(found) > 1:
        names = ", ".join(sorted({p for _, p in found}))
        raise bad_request(
            f"only one structured output constraint per request, got {names}", param=found[1][1]
        )
    return found[0] if found else (None, "")


GENERATION_CONFIG_KEYS = {  # generation_config.json key -> request field, those vLLM takes as defaults
    "repetition_penalty": "repetition_penalty",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "max_new_tokens": "max_tokens",
}


def generation_defaults(source: str, model_dir: str) -> dict:
    """--generation-config: "auto" reads the checkpoint's generation_config.json, "vllm" uses none, any other
    value is a folder holding one. Only the keys vLLM applies are kept; a request's own value always wins."""
    import json
    import os

    if source == "vllm":
        return {}
    folder = model_dir if source == "auto" else source
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        if source != "auto":
            raise ValueError(f"--generation-config {source}: no generation_config.json there")
        return {}
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    found = {
        field: config[key] for key, field in GENERATION_CONFIG_KEYS.items() if config.get(key) is not None
    }
    if found:
        log.info("default sampling parameters from %s: %s", path, found)
    return found


def read_chat_template(value: str) -> str:
    """--chat-template: a file's path, or the template itself (vLLM's meaning)."""
    import os

    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a template")
    return value
