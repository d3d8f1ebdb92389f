"""Prompt logprobs (vLLM's `prompt_logprobs`) equal transformers' log_softmax over the same checkpoint's
logits at every prompt position: through chunked prefill (a token budget smaller than the prompt, two requests
sharing steps), with another request's different k in the same step, and for a prompt already in the prefix
cache (the request reads no hits, so every position is still computed)."""

import pytest
import torch

from pdserve.engine import LLM, SamplingParams

TOLERANCE = 1e-4  # fp32 on both sides; only the kernels' summation order differs


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def prompt_of(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 250, (n,), generator=g).tolist()


def reference(hf_model, prompt: list[int]) -> torch.Tensor:
    """[P - 1, V]: row i - 1 is the log_softmax predicting prompt token i."""
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def check(entries, prompt: list[int], ref: torch.Tensor, k: int) -> None:
    assert len(entries) == len(prompt)
    assert entries[0] is None
    for i in range(1, len(prompt)):
        row, token, entry = ref[i - 1], prompt[i], entries[i]
        want_rank = int((row > row[token]).sum()) + 1
        assert entry[token].rank == want_rank, i
        assert entry[token].logprob == pytest.approx(float(row[token]), abs=TOLERANCE), i
        top_values, top_ids = row.topk(k)
        assert set(entry) == set(top_ids.tolist()) | {token}, i
        for rank, (tid, value) in enumerate(zip(top_ids.tolist(), top_values.tolist(), strict=True), start=1):
            assert entry[tid].rank == rank, i
            assert entry[tid].logprob == pytest.approx(value, abs=TOLERANCE), i
        assert all(lp.decoded_token is not None for lp in entry.values())


def generate(llm, prompts, params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params)


def test_chunked_prefill_matches_transformers(model_dir, hf_model):
    long, short = prompt_of(1, 45), prompt_of(2, 20)
    llm = LLM(model=model_dir, device="cpu", block_size=16, max_num_batched_tokens=7)
    asks = [
        SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=5),
        SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0),
        SamplingParams(temperature=0, max_tokens=3),
    ]
    out = generate(llm, [long, short, long], asks)
    check(out[0].prompt_logprobs, long, reference(hf_model, long), 5)
    check(out[1].prompt_logprobs, short, reference(hf_model, short), 0)
    assert out[2].prompt_logprobs is None
    assert out[0].outputs[0].token_ids == out[2].outputs[0].token_ids  # the extra rows change no sampling


def test_prefix_cache_hit_still_gets_every_position(model_dir, hf_model):
    prompt = prompt_of(3, 40)
    llm = LLM(model=model_dir, device="cpu", block_size=16, enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    first = generate(llm, [prompt], params)[0]
    plain = generate(llm, [prompt], SamplingParams(temperature=0, max_tokens=2))[0]
    again = generate(llm, [prompt], params)[0]
    assert plain.num_cached_tokens == 32  # the first request's blocks are in the cache...
    assert again.num_cached_tokens == 0  # ...and a prompt_logprobs request reads none of them
    ref = reference(hf_model, prompt)
    check(first.prompt_logprobs, prompt, ref, 3)
    check(again.prompt_logprobs, prompt, ref, 3)


def test_one_token_prompt_has_only_none(model_dir):
    llm = LLM(model=model_dir, device="cpu", block_size=16)
    out = generate(llm, [[42]], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))[0]
    assert out.prompt_logprobs == [None]


def test_bad_values_are_refused():
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


def test_preemption_recomputes_and_keeps_every_record(model_dir, hf_model):
    # 4 requests x (~30 prompt + 24 new tokens) need 16 blocks of 16; 9 blocks and 8-token chunks force
    # preemption by recompute, some of it before a request's first token (its records are then overwritten).
    prompts = [prompt_of(10 + i, n) for i, n in enumerate([30, 31, 29, 33])]
    llm = LLM(
        model=model_dir, device="cpu", block_size=16, num_gpu_blocks_override=9, max_num_batched_tokens=8
    )
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=2)
    out = generate(llm, prompts, params)
    assert llm.core.scheduler.num_preemptions > 0
    for prompt, result in zip(prompts, out, strict=True):
        check(result.prompt_logprobs, prompt, reference(hf_model, prompt), 2)
    assert not llm.core.prompt_logprob_ids  # nothing left behind
