"""Tensor parallelism on CPU (gloo): a TP engine's greedy tokens equal one rank's and Hugging Face
transformers' through batching, chunked prefill, prefix-cache hits and preemption; each rank loads exactly its
slice of the checkpoint; a node's KV heads are gathered and scattered across ranks; a rank that dies fails the
requests in flight, naming it, instead of hanging them, and leaves no block held.

Each TP engine spawns its ranks 1..N-1 (seconds each), so the engines are few and module-scoped, each covering
several paths; the unit tests (shard math, the sharded loader, HeadLayout) start no process.
"""

import contextlib
import multiprocessing
import threading
import time
from collections import defaultdict
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.checkpoint import load_arch_config
from pdserve.engine.models.loader import load_model
from pdserve.engine.tensor_parallel import TPGroup, check_divisible, kv_head_range, shard, vocab_range
from pdserve.engine.tp_workers import RankLost
from pdserve.kvconnector.head_layout import HeadLayout
from pdserve.wire.errors import ConfigError
from tests.engine.test_llm_vs_hf import expected, random_prompts, run_llm

DEADLINE_S = 60  # a call after a rank died must fail well within this, never hang


# ---- helpers -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def engine(model: str, **engine_args):
    """An LLM on CPU; on exit its ranks must be stopped (no worker process left running)."""
    llm = LLM(model=model, device="cpu", block_size=16, **engine_args)
    workers = llm.core.runner.workers
    procs = list(workers.procs) if workers is not None else []
    try:
        yield llm
    finally:
        llm.close()
        alive = [p.name for p in procs if p.is_alive()]
        assert not alive, f"worker processes left running after close(): {alive}"


def tp1_tokens(model: str, prompts, max_tokens: int, **engine_args) -> list[list[int]]:
    """The same prompts on a one-rank engine of the same configuration."""
    with engine(model, **engine_args) as llm:
        return run_llm(llm, prompts, max_tokens)[0]


def with_deadline(fn, timeout: float = DEADLINE_S) -> dict:
    """fn() on a thread: {"value": ...} or {"error": ...}; fails the test if still running at timeout."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), (
        f"still running after {timeout} s: a lost rank must fail the call, not hang it"
    )
    return result


def check_no_block_held(core, request_ids) -> None:
    pool = core.block_pool
    assert pool.num_free + pool.num_cached + pool.num_used == pool.num_blocks
    assert pool.num_used == 0
    assert all(block.ref_count == 0 for block in pool.blocks)  # counted from the blocks, not the counters
    assert all(core.kv_manager.num_blocks_held(rid) == 0 for rid in request_ids)
    assert not core.has_unfinished()


def kill_at_step(core, proc, at: int) -> None:
    """From now on, `proc` is killed just before the core's `at`-th step (counted from now)."""
    step, steps = core.step, [0]

    def killing_step():
        steps[0] += 1
        if steps[0] == at:
            proc.kill()
        return step()

    core.step = killing_step


def tp_children() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("pdserve-tp-rank")]


@pytest.fixture(scope="module")
def hf(model_dirs):
    """family -> transformers' model of the tiny checkpoint (loaded on first use)."""
    from transformers import AutoModelForCausalLM

    loaded = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = AutoModelForCausalLM.from_pretrained(
                model_dirs[family], dtype=torch.float32
            ).eval()
        return loaded[family]

    return get


# ---- shard math (no process) -------------------------------------------------------------------------------
def test_shard_splits_evenly_in_rank_order():
    assert [shard(128, r, 4) for r in range(4)] == [(0, 32), (32, 32), (64, 32), (96, 32)]
    assert shard(48, 1, 2) == (24, 24)


@pytest.mark.parametrize(
    "num_kv_heads,size,ranges",
    [
        (2, 1, [(0, 2)]),
        (2, 2, [(0, 1), (1, 1)]),
        (8, 4, [(0, 2), (2, 2), (4, 2), (6, 2)]),
        (2, 4, [(0, 1), (0, 1), (1, 1), (1, 1)]),  # replicated: ranks 0-1 hold head 0, ranks 2-3 head 1
        (1, 4, [(0, 1)] * 4),
        (2, 8, [(0, 1)] * 4 + [(1, 1)] * 4),
    ],
)
def test_kv_head_range(num_kv_heads, size, ranges):
    assert [kv_head_range(num_kv_heads, r, size) for r in range(size)] == ranges


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,size",
    [(4, 2, 2), (4, 2, 4), (32, 8, 4), (32, 8, 8), (32, 8, 16), (14, 2, 2), (16, 1, 8), (8, 8, 8)],
)
def test_every_rank_holds_the_kv_heads_its_query_heads_read(num_heads, num_kv_heads, size):
    group = num_heads // num_kv_heads  # query heads per KV head (GQA)
    for rank in range(size):
        first, count = kv_head_range(num_kv_heads, rank, size)
        q_start, q_count = shard(num_heads, rank, size)
        read = {q // group for q in range(q_start, q_start + q_count)}
        assert read == set(range(first, first + count)), (rank, read, first, count)


@pytest.mark.parametrize(
    "vocab,size", [(1024, 1), (1024, 2), (1024, 4), (1000, 3), (1021, 2), (1021, 4), (10, 4), (5, 4)]
)
def test_vocab_range_covers_the_vocabulary_once_with_equal_padded_shards(vocab, size):
    ranges = [vocab_range(vocab, r, size) for r in range(size)]
    padded = -(-vocab // size)
    covered = []
    for rank, (start, real, pad) in enumerate(ranges):
        assert pad == padded and start == rank * padded and 0 <= real <= pad
        covered += range(start, start + real)
    assert covered == list(range(vocab))


def test_vocab_range_examples():
    assert vocab_range(1024, 3, 4) == (768, 256, 256)
    assert vocab_range(1021, 3, 4) == (768, 253, 256)
    assert vocab_range(1021, 1, 2) == (511, 510, 511)


def test_check_divisible_accepts_what_splits(model_dir):
    arch = load_arch_config(model_dir)  # 4 heads, 2 KV heads, intermediate 128
    for size in (1, 2, 4):
        check_divisible(arch, size)


@pytest.mark.parametrize(
    "changes,size,field",
    [
        ({}, 3, r"num_attention_heads \(4\)"),
        ({}, 0, "at least 1"),
        ({}, -2, "at least 1"),
        ({"intermediate_size": 100}, 8, None),  # 4 heads already refuse 8
        ({"num_attention_heads": 8, "intermediate_size": 100}, 8, r"intermediate_size \(100\)"),
        (
            {"num_attention_heads": 12, "num_key_value_heads": 8, "intermediate_size": 96},
            3,
            "num_key_value_heads 8",
        ),
    ],
)
def test_check_divisible_names_the_field_that_does_not_split(model_dir, changes, size, field):
    arch = replace(load_arch_config(model_dir), **changes)
    with pytest.raises(ConfigError, match=field or "num_attention_heads"):
        check_divisible(arch, size)


def test_check_divisible_names_the_experts_width(model_dirs):
    arch = load_arch_config(model_dirs["qwen3_moe"])  # experts' intermediate size 48
    check_divisible(arch, 4)
    moe = replace(arch.moe, intermediate_size=50)
    with pytest.raises(ConfigError, match=r"experts' intermediate size \(50\)"):
        check_divisible(replace(arch, moe=moe), 4)


# ---- the sharded loader (no process: a TPGroup without a process group builds and fills, runs nothing) -----
def checkpoint(model_dir: str) -> dict:
    return load_file(f"{model_dir}/model.safetensors")


def load_rank(model_dir: str, rank: int, size: int):
    model, _ = load_model(model_dir, torch.float32, "cpu", progress=False, tp=TPGroup(rank, size))
    return model


def split_qkv(attn):
    return attn.qkv_proj.weight.split([attn.q_size, attn.kv_size, attn.kv_size])


@pytest.mark.parametrize(
    "size,rank,q_rows,kv_rows",
    [
        (2, 1, (32, 64), (16, 32)),  # head_dim 16
        (4, 1, (16, 32), (0, 16)),  # KV head 0, replicated
        (4, 3, (48, 64), (16, 32)),
    ],
)  # KV head 1, replicated
def test_a_rank_holds_its_query_heads_and_the_kv_head_they_read(model_dir, size, rank, q_rows, kv_rows):
    sd = checkpoint(model_dir)
    attn = load_rank(model_dir, rank, size).model.layers[0].self_attn
    q, k, v = split_qkv(attn)
    hf = "model.layers.0.self_attn."
    assert torch.equal(q, sd[hf + "q_proj.weight"][slice(*q_rows)])
    assert torch.equal(k, sd[hf + "k_proj.weight"][slice(*kv_rows)])
    assert torch.equal(v, sd[hf + "v_proj.weight"][slice(*kv_rows)])
    assert torch.equal(attn.o_proj.weight, sd[hf + "o_proj.weight"][:, slice(*q_rows)])


@pytest.mark.parametrize(
    "family,size",
    [
        ("llama", 2),
        ("llama", 4),
        ("qwen2", 2),
        ("qwen2", 4),
        ("gemma2", 4),
        ("qwen3_moe", 2),
        ("qwen3_moe", 4),
    ],
)
def test_each_rank_loads_exactly_its_slice_of_every_tensor(model_dirs, family, size):
    """Every parameter of every rank against the checkpoint read directly: column-parallel rows, row-parallel
    columns, vocabulary rows, KV heads (replicated past 2 ranks), experts cut along their width, and the
    replicated norms and router; the ranks' shards put together are the whole tensor."""
    sd = checkpoint(model_dirs[family])
    arch = load_arch_config(model_dirs[family])
    d = arch.head_dim
    offset = arch.norm_offset  # Gemma folds its (1 + w) into the weight at load
    models = [load_rank(model_dirs[family], r, size) for r in range(size)]
    for rank, model in enumerate(models):
        q0, nq = shard(arch.num_attention_heads, rank, size)
        k0, nk = kv_head_range(arch.num_key_value_heads, rank, size)
        qs, ks = slice(q0 * d, (q0 + nq) * d), slice(k0 * d, (k0 + nk) * d)
        start, real, padded = vocab_range(arch.vocab_size, rank, size)
        embed = model.model.embed_tokens.weight
        assert embed.shape[0] == padded
        assert torch.equal(embed[:real], sd["model.embed_tokens.weight"][start : start + real])
        if model.lm_head is not None:
            assert torch.equal(model.lm_head.weight[:real], sd["lm_head.weight"][start : start + real])
        else:
            assert "lm_head.weight" not in sd or arch.tie_word_embeddings
        assert torch.equal(model.model.norm.weight, sd["model.norm.weight"] + offset)
        for i, layer in enumerate(model.model.layers):
            hf = f"model.layers.{i}."
            attn = layer.self_attn
            assert (attn.num_heads, attn.num_kv_heads) == (nq, nk)
            q, k, v = split_qkv(attn)
            assert torch.equal(q, sd[hf + "self_attn.q_proj.weight"][qs])
            assert torch.equal(k, sd[hf + "self_attn.k_proj.weight"][ks])
            assert torch.equal(v, sd[hf + "self_attn.v_proj.weight"][ks])
            if attn.qkv_proj.bias is not None:
                qb, kb, vb = attn.qkv_proj.bias.split([attn.q_size, attn.kv_size, attn.kv_size])
                assert torch.equal(qb, sd[hf + "self_attn.q_proj.bias"][qs])
                assert torch.equal(kb, sd[hf + "self_attn.k_proj.bias"][ks])
                assert torch.equal(vb, sd[hf + "self_attn.v_proj.bias"][ks])
            assert torch.equal(attn.o_proj.weight, sd[hf + "self_attn.o_proj.weight"][:, qs])
            assert torch.equal(layer.input_layernorm.weight, sd[hf + "input_layernorm.weight"] + offset)
            ffn = getattr(layer, layer.ffn_name)
            if hasattr(ffn, "experts"):
                i0, ni = shard(arch.moe.intermediate_size, rank, size)
                cut = slice(i0, i0 + ni)
                assert torch.equal(ffn.gate.weight, sd[hf + "mlp.gate.weight"])  # the router: replicated
                for e in range(arch.moe.num_experts):
                    ex = f"{hf}mlp.experts.{e}."
                    gate, up = ffn.experts.w13[e].split([ni, ni])
                    assert torch.equal(gate, sd[ex + "gate_proj.weight"][cut])
                    assert torch.equal(up, sd[ex + "up_proj.weight"][cut])
                    assert torch.equal(ffn.experts.w2[e], sd[ex + "down_proj.weight"][:, cut])
            else:
                i0, ni = shard(arch.intermediate_size, rank, size)
                cut = slice(i0, i0 + ni)
                gate, up = ffn.gate_up_proj.weight.split([ni, ni])
                assert torch.equal(gate, sd[hf + "mlp.gate_proj.weight"][cut])
                assert torch.equal(up, sd[hf + "mlp.up_proj.weight"][cut])
                assert torch.equal(ffn.down_proj.weight, sd[hf + "mlp.down_proj.weight"][:, cut])
    # put together, the ranks' shards are the checkpoint's tensors
    attn = [m.model.layers[1].self_attn for m in models]
    assert torch.equal(
        torch.cat([split_qkv(a)[0] for a in attn]), sd["model.layers.1.self_attn.q_proj.weight"]
    )
    assert torch.equal(
        torch.cat([a.o_proj.weight for a in attn], 1), sd["model.layers.1.self_attn.o_proj.weight"]
    )
    vocab = torch.cat([m.model.embed_tokens.weight for m in models])
    assert torch.equal(vocab[: arch.vocab_size], sd["model.embed_tokens.weight"])


@pytest.fixture(scope="module")
def odd_vocab_dir(tmp_path_factory):
    """The tiny llama with 1021 tokens: no rank count above 1 splits it, so the last shard is padded."""
    from pdserve.tools.make_model import make_model

    path = tmp_path_factory.mktemp("odd-vocab") / "tiny-llama-1021"
    make_model(
        str(path),
        family="llama",
        preset="tiny",
        seed=0,
        dtype="float32",
        config_overrides={"vocab_size": 1021},
        progress=False,
    )
    return str(path)


def test_the_last_vocabulary_shard_is_padded_with_zero_rows(odd_vocab_dir):
    sd = checkpoint(odd_vocab_dir)
    model = load_rank(odd_vocab_dir, 3, 4)  # rows 768..1020 real, 3 rows of padding
    for weight, name in (
        (model.model.embed_tokens.weight, "model.embed_tokens.weight"),
        (model.lm_head.weight, "lm_head.weight"),
    ):
        assert weight.shape[0] == 256
        assert torch.equal(weight[:253], sd[name][768:])
        assert weight[253:].eq(0).all()


def test_a_rank_of_a_size_that_does_not_split_the_heads_refuses_to_load(model_dir):
    with pytest.raises(ConfigError, match="num_attention_heads"):
        load_model(model_dir, torch.float32, "cpu", progress=False, tp=TPGroup(0, 3))


# ---- HeadLayout (no process) -------------------------------------------------------------------------------
LAYERS, BLOCKS, BLOCK_SIZE, HEAD_DIM = 3, 7, 4, 8


def layout_of(caches, num_kv_heads, size):
    ranges = [kv_head_range(num_kv_heads, r, size) for r in range(size)]
    return HeadLayout.of_ranks(caches, ranges, num_kv_heads), ranges


@pytest.mark.parametrize("num_kv_heads,size", [(4, 2), (2, 2), (6, 2), (2, 4), (8, 4), (1, 2), (2, 8)])
def test_gather_assembles_every_head_from_the_ranks(num_kv_heads, size):
    gen = torch.Generator().manual_seed(num_kv_heads * 10 + size)
    full = torch.randn(LAYERS, 2, BLOCKS, BLOCK_SIZE, num_kv_heads, HEAD_DIM, generator=gen)
    ranges = [kv_head_range(num_kv_heads, r, size) for r in range(size)]
    # each rank's own cache tensor [L, 2, N, bs, h, D], as the engine allocates it
    layout, _ = layout_of([full[..., f : f + n, :].clone() for f, n in ranges], num_kv_heads, size)
    assert layout.tp_size == size
    for ids in ([5, 0, 3], [6], list(range(BLOCKS))):
        block_ids = torch.tensor(ids)
        for layer in range(LAYERS):
            got = layout.gather(layer, block_ids)
            assert got.shape == (2, len(ids), BLOCK_SIZE, num_kv_heads, HEAD_DIM)
            assert torch.equal(got, full[layer][:, block_ids])


@pytest.mark.parametrize("num_kv_heads,size", [(4, 2), (2, 2), (2, 4), (8, 4), (1, 2), (2, 8)])
def test_scatter_writes_each_ranks_heads_into_every_replica(num_kv_heads, size):
    caches = [
        torch.zeros(LAYERS, 2, BLOCKS, BLOCK_SIZE, kv_head_range(num_kv_heads, r, size)[1], HEAD_DIM)
        for r in range(size)
    ]
    layout, ranges = layout_of(caches, num_kv_heads, size)
    ids = torch.tensor([6, 1, 4])
    blocks = torch.randn(2, len(ids), BLOCK_SIZE, num_kv_heads, HEAD_DIM)
    layout.scatter(1, ids, blocks)
    untouched = [b for b in range(BLOCKS) if b not in ids.tolist()]
    for (first, count), cache in zip(ranges, caches, strict=True):
        assert torch.equal(cache[1][:, ids], blocks[..., first : first + count, :])
        assert cache[1][:, untouched].eq(0).all()
        assert cache[0].eq(0).all() and cache[2].eq(0).all()
    assert torch.equal(layout.gather(1, ids), blocks)  # and back


def test_per_layer_lists_work_as_rank_caches():
    full = torch.randn(LAYERS, 2, BLOCKS, BLOCK_SIZE, 4, HEAD_DIM)
    ranks = [list(full[..., 2 * r : 2 * r + 2, :].clone().unbind(0)) for r in range(2)]
    layout, _ = layout_of(ranks, 4, 2)
    ids = torch.tensor([2, 5, 0])
    assert torch.equal(layout.gather(2, ids), full[2][:, ids])


def test_ranks_that_do_not_cover_the_heads_are_refused():
    caches = [torch.zeros(LAYERS, 2, BLOCKS, BLOCK_SIZE, 1, HEAD_DIM) for _ in range(2)]
    with pytest.raises(ValueError, match="cover"):
        HeadLayout.of_ranks(caches, [(0, 1), (2, 1)], 3)


# ---- engines: TP against one rank and transformers ---------------------------------------------------------
# llama, 2 ranks, the whole token budget: batched prompts in one step; 12 blocks hold the batch test's prompts
# (10 blocks) but not the preemption test's (16), and a prefix-cache hit.
TP2_ARGS = {"num_gpu_blocks_override": 12}
# llama, 2 ranks, 7 tokens a step: every prompt chunked; prefix-cache hits read chunked blocks.
TP2_CHUNKED_ARGS = {"max_num_batched_tokens": 7, "enable_prefix_caching": True}
# llama, 4 ranks (each KV head on 2 ranks), 7 tokens a step, 12 blocks.
TP4_ARGS = {"max_num_batched_tokens": 7, "num_gpu_blocks_override": 12}


@pytest.fixture(scope="module")
def tp2(model_dir):
    with engine(model_dir, tensor_parallel_size=2, **TP2_ARGS) as llm:
        yield llm


@pytest.fixture(scope="module")
def tp2_chunked(model_dir):
    with engine(model_dir, tensor_parallel_size=2, **TP2_CHUNKED_ARGS) as llm:
        yield llm


@pytest.fixture(scope="module")
def tp4(model_dir):
    with engine(model_dir, tensor_parallel_size=4, **TP4_ARGS) as llm:
        yield llm


@pytest.mark.slow
def test_tp2_batched_prompts_of_different_lengths_match_tp1_and_hf(tp2, model_dir, hf):
    prompts = random_prompts(1, [3, 17, 33, 50])
    preempted = tp2.core.scheduler.num_preemptions
    got, _ = run_llm(tp2, prompts)
    assert tp2.core.scheduler.num_preemptions == preempted  # this batch fits: a plain batched run
    assert got == expected(hf("llama"), prompts)
    assert got == tp1_tokens(model_dir, prompts, 12, **TP2_ARGS)
    check_no_block_held(tp2.core, [])


@pytest.mark.slow
def test_tp2_preemption_matches_tp1_and_hf(tp2, model_dir, hf):
    prompts = random_prompts(4, [30, 31, 29, 33])
    preempted = tp2.core.scheduler.num_preemptions
    got, _ = run_llm(tp2, prompts, max_tokens=24)
    assert tp2.core.scheduler.num_preemptions > preempted
    assert got == expected(hf("llama"), prompts, max_tokens=24)
    assert got == tp1_tokens(model_dir, prompts, 24, **TP2_ARGS)
    check_no_block_held(tp2.core, [])


def same_logprobs(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(
        abs(a[t].logprob - b[t].logprob) < 1e-4 and a[t].rank == b[t].rank for t in a
    )


@pytest.mark.slow
@pytest.mark.parametrize("which,args", [("tp2", TP2_ARGS), ("tp2_chunked", TP2_CHUNKED_ARGS)])
def test_tp2_logprobs_prompt_logprobs_and_seeded_samples_match_tp1(which, args, request, model_dir):
    """The other ranks compute prompt logprobs' rows too, chunk by chunk (their LM head's all-gather must meet
    rank 0's); only rank 0 samples, so a seeded request's n samples repeat one rank's."""
    tp2 = request.getfixturevalue(which)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(6, [21, 40, 9])]
    params = [
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2),
        SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0),
    ]
    got = tp2.generate(prompts, params)
    with engine(model_dir, **args) as llm:
        want = llm.generate(prompts, params)
    for g, w in zip(got, want, strict=True):
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in w.outputs]
        assert (g.prompt_logprobs is None) == (w.prompt_logprobs is None)
        if g.prompt_logprobs is not None:
            assert len(g.prompt_logprobs) == len(w.prompt_logprobs) == len(g.prompt_token_ids)
            assert all(map(same_logprobs, g.prompt_logprobs, w.prompt_logprobs))
    assert got[1].outputs[0].token_ids != got[1].outputs[1].token_ids  # two different seeded samples
    assert all(map(same_logprobs, got[0].outputs[0].logprobs, want[0].outputs[0].logprobs))


@pytest.mark.slow
def test_tp2_chunked_prefill_matches_tp1_and_hf(tp2_chunked, model_dir, hf):
    prompts = random_prompts(2, [9, 23, 40])
    got, _ = run_llm(tp2_chunked, prompts, max_tokens=6)
    assert got == expected(hf("llama"), prompts, max_tokens=6)
    assert got == tp1_tokens(model_dir, prompts, 6, **TP2_CHUNKED_ARGS)


@pytest.mark.slow
def test_tp2_prefix_cache_hit_of_chunked_blocks_matches_hf(tp2_chunked, hf):
    shared = random_prompts(3, [40])[0]
    first, second = shared + [11, 12, 13], shared + [21, 22]
    got_first, out_first = run_llm(tp2_chunked, [first])
    got_second, out_second = run_llm(tp2_chunked, [second])
    assert out_first[0].num_cached_tokens == 0
    assert out_second[0].num_cached_tokens == 32  # two full 16-token blocks of the shared 40-token prefix
    assert got_first + got_second == expected(hf("llama"), [first, second])
    check_no_block_held(tp2_chunked.core, [])


@pytest.mark.slow
def test_tp4_replicated_kv_heads_batched_and_chunked_match_tp1_and_hf(tp4, model_dir, hf):
    assert [c.shape[4] for c in tp4.core.runner.rank_caches] == [1, 1, 1, 1]  # one KV head each
    prompts = random_prompts(1, [3, 17, 33, 50])
    got, _ = run_llm(tp4, prompts)
    assert got == expected(hf("llama"), prompts)
    assert got == tp1_tokens(model_dir, prompts, 12, **TP4_ARGS)
    check_no_block_held(tp4.core, [])


@pytest.mark.slow
def test_tp4_prefix_cache_hit_matches_hf(tp4, hf):
    shared = random_prompts(7, [37])[0]
    first, second = shared + [11, 12, 13], shared + [21, 22]
    got_first, _ = run_llm(tp4, [first], max_tokens=8)
    got_second, out_second = run_llm(tp4, [second], max_tokens=8)
    assert out_second[0].num_cached_tokens == 32
    assert got_first + got_second == expected(hf("llama"), [first, second], max_tokens=8)


@pytest.mark.slow
def test_tp4_preemption_matches_hf(tp4, hf):
    prompts = random_prompts(4, [30, 31, 29, 33])
    preempted = tp4.core.scheduler.num_preemptions
    got, _ = run_llm(tp4, prompts, max_tokens=24)
    assert tp4.core.scheduler.num_preemptions > preempted
    assert got == expected(hf("llama"), prompts, max_tokens=24)
    check_no_block_held(tp4.core, [])


def prompt_kv(llm, prompt: list[int]) -> list[torch.Tensor]:
    """Each layer's K/V of `prompt`'s tokens, every head, read through a HeadLayout of the engine's rank
    caches (as a node lays them out for its KV connector) right after the prompt was computed:
    [2, len(prompt), num_kv_heads, head_dim] per layer."""
    core = llm.core
    runner = core.runner
    request_id = f"kv-{len(prompt)}-{id(llm)}"
    request = core.add_request(
        request_id, prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    )
    while request.num_computed_tokens < len(prompt):
        core.step()
    block_ids = torch.tensor(core.kv_manager.block_table(request_id))
    heads, size = runner.arch.num_key_value_heads, len(runner.rank_caches)
    ranges = [kv_head_range(heads, rank, size) for rank in range(size)]
    layout = HeadLayout.of_ranks(runner.rank_caches, ranges, heads)
    assert layout.tp_size == core.config.parallel.tensor_parallel_size
    kv = [
        layout.gather(layer, block_ids).flatten(1, 2)[:, : len(prompt)] for layer in range(len(layout.layers))
    ]
    while core.has_unfinished():
        core.step()
    return kv


@pytest.mark.slow
def test_tp4_rank_caches_put_together_equal_one_ranks_cache(tp4, model_dir):
    """Rank 0 sees the other ranks' caches (shared memory) and, through the node's layout of them, a prompt's
    K/V of every head equals what a one-rank engine wrote."""
    prompt = random_prompts(8, [37])[0]
    got = prompt_kv(tp4, prompt)
    with engine(model_dir, **TP4_ARGS) as llm:
        want = prompt_kv(llm, prompt)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape == (2, len(prompt), 2, 16)
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# ---- other families ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family,size", [("qwen3_moe", 2), ("gemma2", 4)])
def test_other_families_batched_chunked_and_a_prefix_hit_match_hf(family, size, model_dirs, hf):
    """Qwen3-MoE: experts cut along their width, the router replicated. Gemma 2 on 4 ranks: soft caps over
    gathered logits, sliding-window layers, replicated KV heads."""
    prompts = random_prompts(11, [5, 23, 38, 50])
    shared = random_prompts(13, [40])[0]
    first, second = shared + [11, 12, 13], shared + [21, 22]
    with engine(model_dirs[family], tensor_parallel_size=size, max_num_batched_tokens=16) as llm:
        got, _ = run_llm(llm, prompts, max_tokens=16)
        assert got == expected(hf(family), prompts, max_tokens=16)
        got_first, _ = run_llm(llm, [first], max_tokens=8)
        got_second, out_second = run_llm(llm, [second], max_tokens=8)
        assert out_second[0].num_cached_tokens == 32
        assert got_first + got_second == expected(hf(family), [first, second], max_tokens=8)
        check_no_block_held(llm.core, [])


@pytest.mark.slow
def test_a_padded_vocabulary_shard_matches_hf(odd_vocab_dir):
    """1021 tokens on 2 ranks: rank 1's embedding and LM head end with a padding row, which neither a lookup
    nor the gathered logits may see: the first step's logits are exactly the vocabulary's, as transformers
    computes them, and greedy decoding matches."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(odd_vocab_dir, dtype=torch.float32).eval()
    prompts = random_prompts(9, [7, 30]) + [[1020, 1019, 511, 510, 0, 1020]]  # ids on both sides of the cut
    with engine(odd_vocab_dir, tensor_parallel_size=2) as llm:
        runner, steps = llm.core.runner, []
        execute = runner.execute
        runner.execute = lambda *args: steps.append(execute(*args)) or steps[-1]
        got, _ = run_llm(llm, prompts)
    assert got == expected(hf_model, prompts)
    first = steps[0]  # every prompt prefilled in one step, one row each
    assert first.shape == (len(prompts), 1021)
    with torch.no_grad():
        want = torch.stack([hf_model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-4)


# ---- a lost rank -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_rank_killed_mid_generate_fails_the_call_naming_it_and_frees_every_block(model_dir):
    with engine(model_dir, tensor_parallel_size=2, num_gpu_blocks_override=20) as llm:
        core = llm.core
        assert run_llm(llm, random_prompts(20, [12]), max_tokens=3)[0]  # the ranks work before the kill
        worker = core.runner.workers.procs[0]
        request_ids, add_request = [], core.add_request

        def recording_add(request_id, *args, **kwargs):
            request_ids.append(request_id)
            return add_request(request_id, *args, **kwargs)

        core.add_request = recording_add
        kill_at_step(core, worker, at=4)  # the prompts are prefilled, the decodes under way: rank 1 dies
        prompts = random_prompts(21, [30, 20])
        result = with_deadline(lambda: run_llm(llm, prompts, max_tokens=30))
        assert "error" in result, "generate went on without rank 1"
        error = result["error"]
        assert "rank 1" in str(error)
        assert isinstance(getattr(error, "cause", error), RankLost)
        assert len(request_ids) == 2
        check_no_block_held(core, request_ids)

        # the engine stays failed: the next call raises at once, naming the rank again, and holds nothing
        started = time.monotonic()
        again = with_deadline(lambda: run_llm(llm, prompts[:1], max_tokens=4))
        assert "error" in again and "rank 1" in str(again["error"])
        assert time.monotonic() - started < 10
        check_no_block_held(core, request_ids)
        assert not worker.is_alive()


@pytest.mark.slow
def test_on_4_ranks_the_error_names_the_rank_that_was_killed(model_dir):
    """Rank 2 of 4 dies mid-run. Its peers' collectives fail too and they exit on their own (exit code 1), so
    the dead rank must be told apart from the ranks that exited because of it."""
    with engine(model_dir, tensor_parallel_size=4, num_gpu_blocks_override=20) as llm:
        procs = llm.core.runner.workers.procs  # ranks 1, 2, 3
        kill_at_step(llm.core, procs[1], at=3)
        result = with_deadline(lambda: run_llm(llm, random_prompts(23, [30, 20]), max_tokens=30))
        assert "error" in result, "generate went on without rank 2"
        check_no_block_held(llm.core, [])
        message = str(result["error"])
        procs[1].join(5)
        assert procs[1].exitcode == -9
        assert "tensor-parallel rank 2 died (exit code -9)" in message, message


@pytest.mark.slow
def test_engine_loop_fails_every_request_naming_the_lost_rank_and_breaks(model_dir):
    from pdserve.engine.engine_loop import EngineLoop, Sink

    with engine(model_dir, tensor_parallel_size=2, num_gpu_blocks_override=40) as llm:
        core = llm.core
        worker = core.runner.workers.procs[0]
        loop = EngineLoop(core).start()
        try:
            tokens: dict = defaultdict(list)
            failed: dict = {}
            all_failed = threading.Event()
            expected_failures = {"a", "b"}

            def sink(request_id):
                def on_output(out):
                    tokens[request_id].extend(out.new_token_ids)
                    if len(tokens["a"]) >= 3 and tokens["b"] and worker.is_alive():
                        worker.kill()  # mid-run: both requests hold blocks and decode

                def on_fail(message):
                    failed[request_id] = message
                    if expected_failures <= failed.keys():
                        all_failed.set()

                return Sink(on_output, on_fail)

            params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
            for request_id, prompt in zip("ab", random_prompts(22, [25, 40]), strict=True):
                loop.add_request(request_id, prompt, params, sink(request_id)).result(timeout=10)
            assert all_failed.wait(DEADLINE_S), f"requests not failed after {DEADLINE_S} s: {sorted(failed)}"
            assert len(tokens["a"]) < 300 and len(tokens["b"]) < 300
            assert all("rank 1" in message for message in failed.values()), failed
            assert loop.broken and "rank 1" in loop.broken
            assert loop.step_failures == 1  # a fatal failure is not retried

            def accounting(c):
                check_no_block_held(c, ["a", "b"])
                return c.block_pool.num_used

            assert loop.call(accounting, core).result(timeout=10) == 0
            assert loop.snapshot.num_used_blocks == 0

            # a request that arrives after the loss fails too, naming the rank
            expected_failures.add("c")
            all_failed.clear()
            loop.add_request("c", [5, 6, 7], params, sink("c")).result(timeout=10)
            assert all_failed.wait(DEADLINE_S)
            assert "rank 1" in failed["c"] and not tokens["c"]
            assert loop.call(accounting, core).result(timeout=10) == 0
        finally:
            loop.stop()


# ---- configuration errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, -1, True, 2.0])
def test_a_bad_tensor_parallel_size_is_a_config_error(model_dir, size):
    before = tp_children()
    with pytest.raises(ConfigError, match="tensor-parallel-size"):
        LLM(model=model_dir, device="cpu", tensor_parallel_size=size)
    assert tp_children() == before


@pytest.mark.slow
def test_a_size_that_does_not_divide_the_heads_fails_quickly_and_leaves_no_process(model_dir):
    before = tp_children()
    started = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"--tensor-parallel-size 3 does not divide num_attention_heads \(4\)"
    ):
        LLM(model=model_dir, device="cpu", tensor_parallel_size=3)
    assert time.monotonic() - started < 30
    assert tp_children() == before
