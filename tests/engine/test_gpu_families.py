"""Every family on the GPU: the tiny fp32 checkpoints through the engine's Triton kernels (sliding-window and
soft-capped attention, the fused MoE) with CUDA-graph decode and chunked prefill, against transformers on the
CPU in fp32. The kernels' fp32 dots are IEEE, not TF32, so only summation order (and exp2's last bits) differ
from the oracle: about 1e-6 in a logit. That decides a token only at a near-tie, and Gemma 2's final soft cap
makes those common (tanh flattens the top logits together), so the check is teacher-forced: at every step our
token is transformers' top-1, or within TOL of it."""

import pytest
import torch

from pdserve.engine import LLM
from tests.conftest import FAMILIES
from tests.engine.test_llm_vs_hf import expected, random_prompts, run_llm

pytestmark = pytest.mark.gpu
TOL = 1e-4  # a logit; fp32 noise is ~1e-6, a wrong token is off by far more (these models' margins: ~0.1-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_on_gpu_matches_hf(family, model_dirs):
    from transformers import AutoModelForCausalLM

    # eager: the reference implementation (sdpa cannot soft-cap, and some transformers releases use it for
    # Gemma 2 anyway, ignoring attn_logit_softcapping)
    hf = AutoModelForCausalLM.from_pretrained(
        model_dirs[family], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    shared = random_prompts(31, [40])[0]
    prompts = random_prompts(32, [5, 23, 38, 50]) + [shared + [11, 12], shared + [21, 22, 23]]
    llm = LLM(
        model=model_dirs[family],
        device="cuda",
        dtype="float32",
        block_size=16,
        max_num_batched_tokens=32,  # the 50-token prompt prefills in two chunks
        enable_prefix_caching=True,
        kv_cache_memory=64 << 20,  # a fixed budget: earlier GPU tests in this process may hold the card
    )
    assert llm.core.runner.graphs is not None, "decode should run as CUDA-graph replays"
    first, _ = run_llm(llm, prompts[:4], max_tokens=20)
    second, outs = run_llm(llm, prompts[4:], max_tokens=20)
    assert outs[1].num_cached_tokens == 32  # the shared prefix's two full blocks
    ours = first + second
    exact = sum(a == b for a, b in zip(ours, expected(hf, prompts, max_tokens=20), strict=True))
    print(f"{family}: {exact}/{len(prompts)} sequences equal to transformers' free-running greedy")
    with torch.no_grad():
        for prompt, tokens in zip(prompts, ours, strict=True):
            logits = hf(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
            gaps = logits.max(dim=-1).values - logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
            step = int(gaps.argmax())
            assert float(gaps[step]) <= TOL, (
                f"step {step}: our token is {float(gaps[step]):.2e} below the top-1"
            )
    pool = llm.core.block_pool
    assert pool.num_free + pool.num_used + pool.num_cached == pool.num_blocks and pool.num_used == 0


def test_reference_kernels_run_eager_on_gpu(model_dirs, monkeypatch):
    """PDSERVE_KERNELS=ref (the torch references, a debugging switch) cannot be captured in a CUDA graph: the
    runner then runs eager instead of failing at start-up, and still generates."""
    monkeypatch.setenv("PDSERVE_KERNELS", "ref")
    llm = LLM(model=model_dirs["gemma2"], device="cuda", dtype="float32", kv_cache_memory=16 << 20)
    assert llm.core.runner.graphs is None
    tokens, _ = run_llm(llm, random_prompts(33, [30]), max_tokens=4)
    assert len(tokens[0]) == 4
