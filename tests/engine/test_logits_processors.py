"""Penalties, logit_bias, bad words, allowed_token_ids and grammars in the engine: greedy output equals
transformers' greedy decoding under the same logits processors, for requests batched together with different
settings (and one without any), through chunked prefill; a JSON-schema request's output parses and
validates."""

import json

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from tests.logits_reference import SMALL_SCHEMA, hf_greedy_processed, reference_processors

MAX_TOKENS = 16
PROMPTS = [
    [0, 11, 25, 25, 31, 40, 41, 12, 99, 7, 7, 7, 150, 3, 60, 61, 62, 63, 12, 13],
    [0, 500, 501, 502, 9, 9, 200],
    [0, 77, 78, 79, 80, 81],
]


@pytest.fixture(scope="module")
def llama(model_dirs):
    from transformers import AutoModelForCausalLM

    d = model_dirs["llama"]
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    llm = LLM(model=d, device="cpu", block_size=16, max_num_batched_tokens=16)  # chunked prefill
    return llm, hf


def _cases(base: list[list[int]]) -> list[dict]:
    """Per-prompt fields chosen from the unconstrained output, so each one changes what is generated."""
    a, b, c = base
    return [
        {"repetition_penalty": 1.6, "frequency_penalty": 0.7, "presence_penalty": 0.4},
        {"logit_bias": {b[0]: -100.0, 5: 8.0}, "bad_words_token_ids": [[b[1]], [b[3], b[4]]]},
        {"allowed_token_ids": sorted({c[0], c[2], 300, 301, 302, 5}), "repetition_penalty": 0.7},
    ]


def run_cases(llm) -> tuple[list[list[int]], list[dict], list]:
    """The unconstrained greedy outputs, the per-prompt fields chosen from them, and one batch of the three
    prompts with those fields plus the first prompt again without any (its neighbour must be untouched)."""
    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    base = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], plain)]
    cases = _cases(base)
    params = [plain.clone(**fields) for fields in cases] + [plain]
    return base, cases, llm.generate([{"prompt_token_ids": p} for p in PROMPTS + PROMPTS[:1]], params)


def test_processors_batched_match_transformers(llama):
    llm, hf = llama
    eos = sorted(llm.tokenizer.eos_token_ids)
    base, cases, outs = run_cases(llm)
    for prompt, fields, out in zip(PROMPTS, cases, outs[:3], strict=True):
        procs = reference_processors(len(prompt), eos, **fields)
        expected = hf_greedy_processed(hf, prompt, MAX_TOKENS, procs)
        assert out.outputs[0].token_ids == expected, fields
    assert outs[0].outputs[0].token_ids != base[0]  # the penalties did change the output
    assert outs[3].outputs[0].token_ids == base[0]  # a neighbour without processors is untouched


def test_bad_words_strings_are_tokenized_like_vllm(llama):
    llm, _ = llama
    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    base = llm.generate([{"prompt_token_ids": PROMPTS[1]}], plain)[0].outputs[0]
    word = llm.tokenizer.decode([base.token_ids[0]]).strip() or "x"
    params = plain.clone(bad_words=[word])
    out = llm.generate([{"prompt_token_ids": PROMPTS[1]}], params)[0].outputs[0]
    banned = [seq for seq in params.bad_words_token_ids or []] or llm._with_bad_word_ids(
        params
    ).bad_words_token_ids
    assert banned and all(
        out.token_ids[i : i + len(seq)] != seq for seq in banned for i in range(len(out.token_ids))
    )


def test_json_schema_output_validates(llama):
    jsonschema = pytest.importorskip("jsonschema")
    llm, _ = llama
    schema = SMALL_SCHEMA
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=64, structured={"json": schema})
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    for out in outs:
        choice = out.outputs[0]
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(choice.text), schema)


def test_choice_and_regex(llama):
    llm, _ = llama
    base = SamplingParams(temperature=1.0, seed=1, max_tokens=20)
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], base.clone(structured={"choice": ["yes", "no"]}))
    assert out[0].outputs[0].text in ("yes", "no")
    out = llm.generate(
        [{"prompt_token_ids": PROMPTS[1]}], base.clone(structured={"regex": "[a-c]{3}-[0-9]{2}"})
    )
    import re

    assert re.fullmatch("[a-c]{3}-[0-9]{2}", out[0].outputs[0].text)


def test_processor_state_is_released(llama):
    llm, _ = llama
    assert llm.core.processors.states == {}
    assert sorted(llm.core.processors.free_slots) == list(range(llm.core.processors.counts.shape[0]))
