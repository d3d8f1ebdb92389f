"""The engine's oracle: greedy token ids equal Hugging Face transformers' greedy decoding of the same
checkpoint, through batching, chunked prefill, prefix-cache hits and preemption."""

import random

import pytest
import torch

from pdserve.engine import LLM, SamplingParams

MAX_TOKENS = 12
FAMILIES = ["llama", "qwen2", "mistral"]


def hf_greedy(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Plain greedy decoding with transformers' own model and KV cache; never stops early (ignore_eos)."""
    ids = torch.tensor([prompt_ids])
    out = model(input_ids=ids, use_cache=True)
    generated = []
    for _ in range(max_tokens):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return generated


@pytest.fixture(scope="module")
def hf_models(model_dirs):
    from transformers import AutoModelForCausalLM

    return {
        f: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for f, d in model_dirs.items()
    }


def random_prompts(seed: int, lengths: list[int], vocab: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(n)] for n in lengths]


def expected(hf_model, prompts, max_tokens=MAX_TOKENS):
    with torch.no_grad():
        return [hf_greedy(hf_model, p, max_tokens) for p in prompts]


def run_llm(llm, prompts, max_tokens=MAX_TOKENS):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outputs], outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_prompts_of_different_lengths_match_hf(family, model_dirs, hf_models):
    prompts = random_prompts(1, [3, 17, 33, 50])
    llm = LLM(model=model_dirs[family], device="cpu", block_size=16)
    got, _ = run_llm(llm, prompts)
    assert got == expected(hf_models[family], prompts)


@pytest.mark.parametrize("budget", [1, 7, 64])
def test_chunked_prefill_matches_hf(budget, model_dirs, hf_models):
    prompts = random_prompts(2, [9, 23, 40])
    llm = LLM(model=model_dirs["llama"], device="cpu", block_size=16, max_num_batched_tokens=budget)
    got, _ = run_llm(llm, prompts, max_tokens=6)
    assert got == expected(hf_models["llama"], prompts, max_tokens=6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefix_cache_hit_reuses_blocks_and_matches_hf(family, model_dirs, hf_models):
    shared = random_prompts(3, [40])[0]
    first, second = shared + [11, 12, 13], shared + [21, 22]
    llm = LLM(model=model_dirs[family], device="cpu", block_size=16, enable_prefix_caching=True)
    got_first, out_first = run_llm(llm, [first])
    got_second, out_second = run_llm(llm, [second])
    assert out_first[0].num_cached_tokens == 0
    assert out_second[0].num_cached_tokens == 32  # two full 16-token blocks of the shared 40-token prefix
    assert got_first + got_second == expected(hf_models[family], [first, second])


def test_preemption_when_cache_is_too_small_matches_hf(model_dirs, hf_models):
    prompts = random_prompts(4, [30, 31, 29, 33])
    # 4 requests x (~30 prompt + 24 new tokens) need 16 blocks of 16; 9 blocks force preemption by recompute.
    llm = LLM(model=model_dirs["llama"], device="cpu", block_size=16, num_gpu_blocks_override=9)
    got, _ = run_llm(llm, prompts, max_tokens=24)
    assert llm.core.scheduler.num_preemptions > 0
    assert got == expected(hf_models["llama"], prompts, max_tokens=24)
    pool = llm.core.block_pool
    assert pool.num_free + pool.num_used + pool.num_cached == pool.num_blocks
    assert pool.num_used == 0


def test_text_prompts_and_stop_strings(model_dirs, hf_models):
    llm = LLM(model=model_dirs["llama"], device="cpu")
    full = llm.generate(
        ["The quick brown fox"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    )
    text = full[0].outputs[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = llm.generate(
        ["The quick brown fox"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop])
    )[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop


def test_a_refused_prompt_queues_nothing_and_the_next_call_works(model_dirs):
    """Bad input loses nothing: a batch whose second prompt can never fit the cache is refused whole."""
    from pdserve.engine.scheduler import RequestTooLargeError

    llm = LLM(model=model_dirs["llama"], device="cpu", block_size=16, num_gpu_blocks_override=8)
    prompt = {"prompt_token_ids": list(range(10, 30))}
    with pytest.raises(RequestTooLargeError):
        llm.generate(
            [prompt, prompt],
            [SamplingParams(temperature=0, max_tokens=4), SamplingParams(temperature=0, max_tokens=400)],
        )
    assert not llm.core.has_unfinished()
    assert llm.core.block_pool.num_used == 0
    again = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(again[0].outputs[0].token_ids) == 4


def test_min_tokens_keeps_eos_from_being_sampled(model_dirs, hf_models):
    """With EOS made the greedy choice, min_tokens must mask it (vLLM's behaviour), not emit it and go on."""
    llm = LLM(model=model_dirs["llama"], device="cpu")
    prompt = random_prompts(5, [12])[0]
    free = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1))
    first = free[0].outputs[0].token_ids[0]
    # Declare the greedy first token a stop token: without min_tokens the request stops at once on it.
    stopped = llm.generate(
        [{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[first])
    )
    assert stopped[0].outputs[0].token_ids == [first] and stopped[0].outputs[0].finish_reason == "stop"
    held = llm.generate(
        [{"prompt_token_ids": prompt}],
        SamplingParams(temperature=0, max_tokens=6, min_tokens=3, stop_token_ids=[first]),
    )
    tokens = held[0].outputs[0].token_ids
    assert first not in tokens[:3]
    assert len(tokens) >= 3
