"""Request fields end to end through `pdserve up --prefill 1 --decode 1` (real processes, CPU) with the
official openai client, disaggregated (a long prompt: the prefill node samples the first token, the decode
node the rest) and colocated (a short one):
- penalties, logit_bias, bad_words and allowed_token_ids: greedy output equals transformers' greedy decoding
  under the same logits processors (tests/logits_reference.py);
- response_format json_schema and guided_choice: outputs parse and validate, finishing by the grammar;
- cache_salt: requests with different salts share no cached tokens, one salt shares its prefix."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.harness.servers import module_cluster, needs_nodes
from tests.logits_reference import SMALL_SCHEMA, hf_greedy_processed, reference_processors

pytestmark = [pytest.mark.slow, needs_nodes]

LONG = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 4).strip()
SHORT = "Hello"
N = 12
MODES = [(LONG, "disaggregated"), (SHORT, "colocated")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    yield from module_cluster(tmp_path_factory, tiny_model, "cluster-fields")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def client(cluster):
    from openai import OpenAI

    return OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=120)


def fresh() -> dict:
    """A new salt: nothing is cached under it, so a long prompt is disaggregated every time (a prompt the
    decode node already holds would be prefilled there, colocated)."""
    return {"cache_salt": uuid.uuid4().hex}


def _complete(client, prompt, mode, **extra):
    raw = client.completions.with_raw_response.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=N,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True, **fresh(), **extra},
    )
    assert raw.headers["x-pdserve-route"].startswith(mode)
    return raw.parse().choices[0].token_ids


@pytest.mark.parametrize("prompt,mode", MODES)
def test_processors_match_transformers(client, tok, hf_model, prompt, mode):
    from pdserve.wire.sampling_params import tokenize_bad_words

    ids = tok.encode(prompt)
    eos = sorted(tok.eos_token_ids)
    base = _complete(client, prompt, mode)
    cases = [
        {"repetition_penalty": 1.5, "presence_penalty": 0.5, "frequency_penalty": 0.5},
        {"logit_bias": {str(base[1]): -100, "5": 6}, "bad_words": [tok.decode([base[2]])]},
        {"allowed_token_ids": sorted({base[0], base[3], 300, 301, 5})},
    ]
    for fields in cases:
        got = _complete(client, prompt, mode, **fields)
        ref = dict(fields)
        if "bad_words" in ref:
            ref["bad_words_token_ids"] = tokenize_bad_words(tok, ref.pop("bad_words"))
        if "logit_bias" in ref:
            ref["logit_bias"] = {int(k): v for k, v in ref["logit_bias"].items()}
        expected = hf_greedy_processed(hf_model, ids, N, reference_processors(len(ids), eos, **ref))
        assert got == expected, fields
        assert got != base, fields


@pytest.mark.parametrize("prompt,mode", MODES)
def test_json_schema_validates(client, prompt, mode):
    jsonschema = pytest.importorskip("jsonschema")
    for seed in (1, 2):
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-llama",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=64,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SMALL_SCHEMA}},
            extra_body=fresh(),
        )
        assert raw.headers["x-pdserve-route"].startswith(mode)
        choice = raw.parse().choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SMALL_SCHEMA)
    r = client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=16,
        temperature=1.0,
        extra_body={"guided_choice": ["red", "green", "blue"], **fresh()},
    )
    assert r.choices[0].text in ("red", "green", "blue") and r.choices[0].finish_reason == "stop"


def test_cache_salt_separates_prefix_hits(client):
    def cached(salt):
        r = client.completions.create(
            model="tiny-llama",
            prompt=LONG + " salted",
            max_tokens=2,
            temperature=0,
            extra_body={"cache_salt": salt},
        )
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-a") > 0  # the same salt hits its own prefix
    assert cached("tenant-b") == 0  # another salt shares nothing
