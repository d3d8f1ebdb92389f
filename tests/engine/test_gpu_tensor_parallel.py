"""Tensor parallelism on a GPU: the ranks' sharded weights and head-split KV caches through the Triton
kernels.

With one GPU lent, both ranks share it over gloo (PDSERVE_TP_BACKEND=gloo: NCCL refuses two ranks on one
device), so this shows the GPU path is correct, not fast; gloo's collectives cannot be captured in a CUDA
graph, so the ranks run eager. With one GPU per rank the same test runs over NCCL, with graphs. The oracle is
TP 1 on the same GPU and transformers greedy, teacher-forced as in test_gpu_families.py (fp32: a different
summation order moves a logit by ~1e-6)."""

import pytest
import torch

from pdserve.engine import LLM
from tests.engine.test_gpu_families import TOL
from tests.engine.test_llm_vs_hf import random_prompts, run_llm

pytestmark = pytest.mark.gpu


def _engine(model_dir: str, tp: int) -> LLM:
    return LLM(
        model=model_dir,
        device="cuda",
        dtype="float32",
        block_size=16,
        max_num_batched_tokens=32,  # the 50-token prompt prefills in two chunks
        enable_prefix_caching=True,
        kv_cache_memory=64 << 20,
        tensor_parallel_size=tp,
    )


@pytest.mark.parametrize("family,tp", [("llama", 2), ("llama", 4), ("qwen3_moe", 2)])
def test_tp_on_gpu_matches_tp1_and_hf(family, tp, model_dirs, monkeypatch):
    from transformers import AutoModelForCausalLM

    if torch.cuda.device_count() < tp:
        monkeypatch.setenv("PDSERVE_TP_BACKEND", "gloo")
    shared = random_prompts(41, [40])[0]
    prompts = random_prompts(42, [5, 23, 50]) + [shared + [11, 12], shared + [21, 22, 23]]
    with _engine(model_dirs[family], 1) as one:
        want, _ = run_llm(one, prompts, max_tokens=16)
    with _engine(model_dirs[family], tp) as llm:
        runner = llm.core.runner
        assert len(runner.rank_caches) == tp
        assert all(c.is_cuda for c in runner.rank_caches)
        got_first, _ = run_llm(llm, prompts[:3], max_tokens=16)
        got_second, outs = run_llm(llm, prompts[3:], max_tokens=16)
        assert outs[1].num_cached_tokens == 32
        pool = llm.core.block_pool
        assert pool.num_free + pool.num_used + pool.num_cached == pool.num_blocks and pool.num_used == 0
    got = got_first + got_second
    same = sum(a == b for a, b in zip(got, want, strict=True))
    print(f"{family} tp {tp}: {same}/{len(prompts)} equal to TP 1")
    hf = AutoModelForCausalLM.from_pretrained(
        model_dirs[family], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for prompt, tokens in zip(prompts, got, strict=True):
            logits = hf(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
            gaps = logits.max(dim=-1).values - logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
            step = int(gaps.argmax())
            assert float(gaps[step]) <= TOL, (
                f"step {step}: our token is {float(gaps[step]):.2e} below the top-1"
            )
