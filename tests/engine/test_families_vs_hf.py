"""Every family the engine serves, against Hugging Face transformers' greedy decoding of the same tiny fp32
checkpoint, through each path: batching, chunked prefill, prefix-cache hits and preemption.

The tiny checkpoints make each family's features bite at these lengths (tools/make_model.py): a 24-token
sliding window (Mistral, Gemma's local layers), so prompts of 30-50 tokens cross it; soft caps small enough to
change scores (Gemma 2); separate local and global rope bases (Gemma 3); four experts, two per token, and a
dense layer beside a sparse one (Qwen3-MoE). Llama, Qwen2 and the oracle's own checks live in
test_llm_vs_hf.py.
"""

import pytest

from pdserve.engine import LLM
from tests.engine.test_llm_vs_hf import expected, random_prompts, run_llm

FAMILIES = ["mistral", "qwen3", "gemma2", "gemma3", "mixtral", "qwen3_moe"]


@pytest.fixture(scope="module")
def hf_family_models(model_dirs):
    import torch
    from transformers import AutoModelForCausalLM

    return {
        f: AutoModelForCausalLM.from_pretrained(model_dirs[f], dtype=torch.float32).eval() for f in FAMILIES
    }


def check_accounting(llm) -> None:
    pool = llm.core.block_pool
    assert pool.num_free + pool.num_used + pool.num_cached == pool.num_blocks
    assert pool.num_used == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_prompts_cross_the_window_and_match_hf(family, model_dirs, hf_family_models):
    prompts = random_prompts(11, [5, 23, 38, 50])
    llm = LLM(model=model_dirs[family], device="cpu", block_size=16)
    got, _ = run_llm(llm, prompts, max_tokens=16)
    assert got == expected(hf_family_models[family], prompts, max_tokens=16)
    check_accounting(llm)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_matches_hf(family, model_dirs, hf_family_models):
    prompts = random_prompts(12, [29, 41])
    llm = LLM(model=model_dirs[family], device="cpu", block_size=16, max_num_batched_tokens=7)
    got, _ = run_llm(llm, prompts, max_tokens=6)
    assert got == expected(hf_family_models[family], prompts, max_tokens=6)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_hit_matches_hf(family, model_dirs, hf_family_models):
    shared = random_prompts(13, [40])[0]
    first, second = shared + [11, 12, 13], shared + [21, 22]
    llm = LLM(model=model_dirs[family], device="cpu", block_size=16, enable_prefix_caching=True)
    got_first, _ = run_llm(llm, [first], max_tokens=8)
    got_second, out_second = run_llm(llm, [second], max_tokens=8)
    assert out_second[0].num_cached_tokens == 32
    assert got_first + got_second == expected(hf_family_models[family], [first, second], max_tokens=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_matches_hf(family, model_dirs, hf_family_models):
    prompts = random_prompts(14, [30, 31, 29, 33])
    llm = LLM(model=model_dirs[family], device="cpu", block_size=16, num_gpu_blocks_override=9)
    got, _ = run_llm(llm, prompts, max_tokens=24)
    assert llm.core.scheduler.num_preemptions > 0
    assert got == expected(hf_family_models[family], prompts, max_tokens=24)
    check_accounting(llm)


def test_all_sliding_model_holds_only_its_window(model_dirs, hf_family_models):
    """Mistral's every layer slides (window 24): a 200-token sequence holds the blocks its window reaches,
    about 24 / 16 + 2 of them, not the 13 its length would take, and its tokens still match."""
    llm = LLM(model=model_dirs["mistral"], device="cpu", block_size=16, max_num_batched_tokens=32)
    prompt = random_prompts(15, [120])[0]
    held = []
    core = llm.core
    original = core.scheduler.update_from_output

    def spy(output, sampled):
        finished = original(output, sampled)
        held.append(core.block_pool.num_used)
        return finished

    core.scheduler.update_from_output = spy
    got, _ = run_llm(llm, [prompt], max_tokens=80)
    assert got == expected(hf_family_models["mistral"], [prompt], max_tokens=80)
    assert max(held) <= 24 // 16 + 1 + 2  # the window, its partial block, and the block being written
    check_accounting(llm)
