"""Structured-output specs -> llguidance grammars (torch-free: the proxy validates, the nodes compile).

Library: llguidance (Microsoft's grammar engine, one of vLLM's structured-output backends). It is a pure wheel
with no torch dependency, so the proxy can refuse a bad schema with a 400 before anything is routed, and the
nodes compute a token mask from the checkpoint's tokenizer.json without transformers. It takes JSON Schema,
regexes and Lark grammars directly, and computes masks lazily (no per-vocabulary precompilation per grammar).

A spec is `SamplingParams.structured`: {"json": schema}, {"json_object": true}, {"regex": str},
{"choice": [str, ...]} or {"grammar": lark or GBNF text}.
"""

from __future__ import annotations

import json

MAX_SPEC_BYTES = 64 << 10  # a schema or grammar's JSON size; bigger ones are refused


def grammar_for(spec: dict) -> str:
    """The llguidance grammar for one spec; ValueError when the spec is malformed."""
    import llguidance

    (kind, value), *_ = spec.items()
    if len(json.dumps(value)) > MAX_SPEC_BYTES:
        raise ValueError(f"the {kind} spec is over {MAX_SPEC_BYTES} bytes")
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(value, (dict, bool)):
            raise ValueError("a JSON schema must be an object")
        return llguidance.LLMatcher.grammar_from_json_schema(
            value if isinstance(value, dict) else {}, defaults={"whitespace_flexible": False}
        )
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise ValueError("a regex must be a non-empty string")
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    if kind == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise ValueError("a grammar must be a non-empty string")
        if "::=" in value:  # GBNF (llama.cpp / xgrammar's EBNF), as vLLM's default backend takes
            from llguidance.gbnf_to_lark import gbnf_to_lark

            value = gbnf_to_lark(value)
        return llguidance.LLMatcher.grammar_from_lark(value)
    raise ValueError(f"unknown structured output kind {kind!r}")


def check_spec(spec: dict) -> None:
    """ValueError naming the problem when the spec cannot be compiled (no tokenizer needed)."""
    import llguidance

    try:
        grammar = grammar_for(spec)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - the compilers raise their own types for bad input
        raise ValueError(str(exc)) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(messages[0] if messages else "the grammar is not valid")
