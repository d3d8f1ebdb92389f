"""GPU: penalties, logit_bias, bad words, allowed_token_ids and a JSON-schema grammar on the CUDA path (the
processors' device tensors, the decode CUDA graphs), against transformers on CPU under the same processors.

The tiny llama checkpoint in fp32: our GPU logits and transformers' CPU logits differ by rounding alone
(~1e-5), so each step is checked teacher-forced: transformers reads the prompt plus our tokens, applies the
reference processors, and our token must be its top-1 or within TOL of it. A processor that is not applied,
or applied to the wrong row of the batch, picks a token that the processed scores put far below the top (a
bias of -100, a banned or disallowed token at -inf, a penalty of whole units).
"""

from __future__ import annotations

import json

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from tests.engine.test_logits_processors import MAX_TOKENS, PROMPTS, run_cases
from tests.logits_reference import SMALL_SCHEMA, reference_processors

pytestmark = pytest.mark.gpu

TOL = 1e-3


@pytest.fixture(scope="module")
def llama_gpu(model_dirs):
    from transformers import AutoModelForCausalLM

    d = model_dirs["llama"]
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    llm = LLM(model=d, device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=16)
    return llm, hf


@torch.no_grad()
def processed_scores(model, prompt: list[int], generated: list[int], processors: list) -> list[torch.Tensor]:
    """Teacher-forced: transformers' processed scores at each generated position, given our tokens."""
    ids = torch.tensor([prompt + generated])
    logits = model(input_ids=ids).logits[0].float()
    scores = []
    for step in range(len(generated)):
        pos = len(prompt) + step
        row = logits[pos - 1 : pos]
        for proc in processors:
            row = proc(ids[:, :pos], row)
        scores.append(row[0])
    return scores


def test_processors_on_gpu_match_transformers(llama_gpu):
    llm, hf = llama_gpu
    eos = sorted(llm.tokenizer.eos_token_ids)
    base, cases, outs = run_cases(llm)
    for prompt, fields, out in zip(PROMPTS + PROMPTS[:1], cases + [{}], outs, strict=True):
        ours = out.outputs[0].token_ids
        assert len(ours) == MAX_TOKENS
        procs = reference_processors(len(prompt), eos, **fields)
        for step, row in enumerate(processed_scores(hf, prompt, ours, procs)):
            gap = float(row.max() - row[ours[step]])
            assert gap <= TOL, (fields, step, ours[step], int(row.argmax()), gap)
        if fields.get("allowed_token_ids"):
            assert set(ours) <= set(fields["allowed_token_ids"])
    assert outs[0].outputs[0].token_ids != base[0]  # the penalties did change the output
    assert outs[3].outputs[0].token_ids == base[0]  # a neighbour without processors is untouched
    assert llm.core.processors.states == {}


def test_json_schema_on_gpu_validates(llama_gpu):
    jsonschema = pytest.importorskip("jsonschema")
    llm, _ = llama_gpu
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=64, structured={"json": SMALL_SCHEMA})
    for out in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params):
        choice = out.outputs[0]
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(choice.text), SMALL_SCHEMA)
