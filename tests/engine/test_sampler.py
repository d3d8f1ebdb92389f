"""Sampler: greedy, seeded reproducibility independent of the batch, filtering supports, logprobs.

Statistical checks draw many samples on an 8-token vocabulary with fixed seeds, so they are deterministic."""

import math

import pytest
import torch

from pdserve.engine.outputs import make_logprob_entry
from pdserve.engine.sampler import Sampler, make_generator
from pdserve.wire.sampling_params import SamplingParams

PROBS = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.01, 0.01])
LOGITS = PROBS.log()  # softmax(LOGITS) == PROBS


def _draw(params: SamplingParams, num: int = 4000, logits=LOGITS) -> torch.Tensor:
    """num independent draws: one seeded row each, all in one batch."""
    rows = logits.expand(num, -1).contiguous()
    gens = [make_generator(1000 + i) for i in range(num)]
    return Sampler().sample(rows, [params] * num, gens).token_ids


def _freqs(tokens: torch.Tensor, vocab: int = 8) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).float() / len(tokens)


def test_temperature_zero_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    out = Sampler().sample(logits, [SamplingParams(temperature=0)] * 6)
    assert torch.equal(out.token_ids, logits.argmax(-1)) and out.token_ids.dtype == torch.int64
    assert out.logprobs is None


def test_top_k_one_equals_greedy():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(5)]
    gens = [make_generator(p.seed) for p in params]
    assert torch.equal(Sampler().sample(logits, params, gens).token_ids, logits.argmax(-1))


def test_seeded_rows_reproduce_regardless_of_batch_neighbours():
    torch.manual_seed(0)
    vocab = 64
    target = torch.randn(vocab)
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=30, seed=1234)
    sampler = Sampler()

    def run(neighbours: int, position: int) -> list[int]:
        gen = make_generator(p.seed)
        others = [make_generator(99 + j) if j % 2 else None for j in range(neighbours)]
        tokens = []
        for step in range(20):
            rows = torch.randn(neighbours + 1, vocab)  # neighbours' logits change each step
            rows[position] = target + step * 0.1
            params = [
                SamplingParams(temperature=0.5 + j, top_p=0.8, min_p=0.01 * j) for j in range(neighbours)
            ]
            params.insert(position, p)
            gens = list(others)
            gens.insert(position, gen)
            tokens.append(int(sampler.sample(rows, params, gens).token_ids[position]))
        return tokens

    alone = run(0, 0)
    assert run(5, 2) == alone and run(7, 7) == alone
    assert len(set(alone)) > 1  # it really sampled


def test_different_seeds_differ_and_unseeded_rows_vary():
    a = _draw(SamplingParams(temperature=1.0), num=200)
    b = (
        Sampler()
        .sample(
            LOGITS.expand(200, -1),
            [SamplingParams(temperature=1.0)] * 200,
            [make_generator(5000 + i) for i in range(200)],
        )
        .token_ids
    )
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    unseeded = Sampler().sample(LOGITS.expand(200, -1), [SamplingParams()] * 200).token_ids
    assert len(set(unseeded.tolist())) > 3


def test_plain_sampling_follows_the_distribution():
    freqs = _freqs(_draw(SamplingParams(temperature=1.0)))
    assert torch.allclose(freqs, PROBS, atol=0.025)


def test_temperature_sharpens_and_flattens():
    sharp = _freqs(_draw(SamplingParams(temperature=0.5)))
    flat = _freqs(_draw(SamplingParams(temperature=2.0)))
    expect_sharp = torch.softmax(LOGITS / 0.5, -1)
    expect_flat = torch.softmax(LOGITS / 2.0, -1)
    assert torch.allclose(sharp, expect_sharp, atol=0.025) and torch.allclose(flat, expect_flat, atol=0.025)


@pytest.mark.parametrize(
    "kwargs,support",
    [
        ({"top_k": 3}, {0, 1, 2}),
        ({"top_p": 0.7}, {0, 1, 2}),  # mass before token 2 is 0.65 < 0.7, before token 3 is 0.80
        ({"top_p": 0.3}, {0}),
        ({"min_p": 0.2}, {0, 1, 2, 3}),  # threshold 0.2 * 0.40 = 0.08
        ({"min_p": 0.5}, {0, 1}),  # threshold 0.20
        (
            {"top_k": 5, "top_p": 0.9, "min_p": 0.3},
            {0, 1, 2},
        ),  # top_k keeps 0..4, top_p 0..3, min_p (0.12) 0..2
    ],
)
def test_filters_keep_the_right_support(kwargs, support):
    tokens = _draw(SamplingParams(temperature=1.0, **kwargs))
    assert set(tokens.tolist()) == support
    freqs = _freqs(tokens)
    kept = torch.zeros(8, dtype=torch.bool)
    kept[list(support)] = True
    expected = torch.where(kept, PROBS, torch.zeros(8))
    assert torch.allclose(freqs, expected / expected.sum(), atol=0.03)


def test_mixed_batch_applies_each_rows_params():
    params = [
        SamplingParams(temperature=0),
        SamplingParams(top_k=2),
        SamplingParams(min_p=0.5),
        SamplingParams(top_p=0.3),
        SamplingParams(temperature=1.0),
    ]
    seen = [set() for _ in params]
    sampler = Sampler()
    for i in range(300):
        gens = [make_generator(i * 10 + j) for j in range(len(params))]
        for j, t in enumerate(
            sampler.sample(LOGITS.expand(len(params), -1), params, gens).token_ids.tolist()
        ):
            seen[j].add(t)
    assert seen[:4] == [{0}, {0, 1}, {0, 1}, {0}] and len(seen[4]) >= 5


def test_blocked_tokens_are_never_sampled():
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)]
    out = Sampler().sample(
        LOGITS.expand(2, -1), params, [None, make_generator(3)], blocked_token_ids=[[0], [0, 1]]
    )
    assert out.token_ids[0] == 1 and out.token_ids[1] not in (0, 1)
    for i in range(200):
        t = Sampler().sample(LOGITS.unsqueeze(0), params[1:], [make_generator(i)], blocked_token_ids=[[0, 1]])
        assert int(t.token_ids[0]) not in (0, 1)


def test_greedy_logprobs_are_the_top_entry_and_equal_log_softmax():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2)) * 3
    params = [SamplingParams(temperature=0, logprobs=5)] * 4
    out = Sampler().sample(logits, params)
    ref = torch.log_softmax(logits, -1)
    lp = out.logprobs
    assert lp.topk_ids.shape == (4, 5) and lp.topk_ids.dtype == torch.int64
    assert torch.equal(lp.topk_ids[:, 0], out.token_ids)
    assert torch.equal(lp.sampled_ranks, torch.ones(4, dtype=torch.int64))
    assert torch.allclose(lp.sampled_logprobs, ref.max(-1).values)
    assert torch.allclose(lp.topk_logprobs, ref.topk(5, -1).values)
    assert (lp.topk_logprobs[:, :-1] >= lp.topk_logprobs[:, 1:]).all()  # descending


def test_sampled_logprobs_use_raw_logits_and_rank():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.3, top_k=5, seed=i, logprobs=2) for i in range(2)]
    params.append(SamplingParams(temperature=1.0))  # no logprobs asked; still gets the batch's width
    gens = [make_generator(i) for i in range(2)] + [None]
    out = Sampler().sample(logits, params, gens)
    ref = torch.log_softmax(logits, -1)  # raw: not the temperature-scaled distribution
    ids = out.token_ids
    assert torch.allclose(out.logprobs.sampled_logprobs, ref.gather(1, ids[:, None]).squeeze(1))
    for row in range(3):
        assert int(out.logprobs.sampled_ranks[row]) == int((ref[row] > ref[row, ids[row]]).sum()) + 1
    topk_ids, topk_lps, sampled_lps, ranks = out.logprobs.tolists()
    entry = make_logprob_entry(ids[0].item(), sampled_lps[0], ranks[0], topk_ids[0], topk_lps[0], 2)
    assert ids[0].item() in entry and len(entry) in (2, 3)
    assert [entry[t].rank for t in topk_ids[0]] == [1, 2]


def test_logprobs_zero_returns_only_the_sampled_token():
    out = Sampler().sample(LOGITS.unsqueeze(0), [SamplingParams(temperature=0, logprobs=0)])
    assert out.logprobs.topk_ids.shape == (1, 0)
    assert math.isclose(out.logprobs.sampled_logprobs.item(), math.log(0.4), rel_tol=1e-5)


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(-1), make_generator(2**64 - 1)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
