"""GPU: prompt logprobs on the CUDA path (chunked prefill, two requests sharing steps) against transformers'
log_softmax on CPU, tiny llama checkpoint in fp32. GPU and CPU logits differ by rounding (~1e-5), so values
are compared within TOL and the top k as sets up to ties within TOL, not by exact rank."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from tests.engine.test_prompt_logprobs import prompt_of, reference

pytestmark = pytest.mark.gpu

TOL = 1e-3


def test_prompt_logprobs_on_gpu_match_transformers(model_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = LLM(model=model_dir, device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=7)
    prompts, k = [prompt_of(1, 45), prompt_of(2, 20)], 5
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=k)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for prompt, out in zip(prompts, outs, strict=True):
        ref = reference(hf, prompt)
        entries = out.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None
        for i in range(1, len(prompt)):
            row, token, entry = ref[i - 1], prompt[i], entries[i]
            assert entry[token].logprob == pytest.approx(float(row[token]), abs=TOL), i
            ours = [tid for tid in entry if entry[tid].rank <= k]
            assert len(ours) == k, i
            for tid in ours:  # each of our top k is one of transformers' top k, up to a near tie
                assert entry[tid].logprob == pytest.approx(float(row[tid]), abs=TOL), i
                assert float(row[tid]) >= float(row.topk(k).values[-1]) - TOL, i
