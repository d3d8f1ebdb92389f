"""GPU checks of the engine against transformers on a real-shape random-weight checkpoint (Qwen2.5-0.5B shape,
bf16).

Run on a GPU with `pytest -s tests/engine/test_gpu_engine.py` (-s shows the figures each test prints); skipped
without CUDA (tests/conftest.py). Meant to take a minute or two on an H100.

The tolerance. Two correct bf16 implementations differ from the exact (fp32) result by rounding noise, and
from each other by up to the sum of their two distances to it. So we measure transformers' own bf16 noise on
the same prompts, noise = max |logits_hf_bf16 - logits_hf_fp32|, and allow TOL = 3 * noise between our logits
and transformers' bf16 logits (the sum of two such distances, with 1.5x headroom), never less than 1/64 of the
largest logit. Our distance to the fp32 result must stay within TOL too (we are not much less exact than
transformers). On this checkpoint (logit std ~4, largest ~19) the noise is a few tenths of a unit: bf16 keeps
8 bits, the top logits alone are rounded on a 0.125 grid, and 24 random-weight layers add to it.

Greedy margins on a random-weight model are small (the gap between the top two of 152k roughly Gaussian logits
averages ~0.8 units), comparable to that noise, so a token-by-token comparison over 32 free-running steps is
bound to meet a near tie. Two checks therefore:
  - teacher-forced, every step: transformers reads the prompt plus our 32 tokens; at each step our token must
    be its top-1 or within TOL of it. A real bug (wrong KV, wrong position) picks tokens several units below
    the top.
  - free-running, as asked: our greedy tokens against transformers' own greedy (DynamicCache); the sequences
    must agree until the first step where they differ, and that step's transformers top-1 margin must be below
    TOL (a near tie). Where they differ (or that they never do) is printed; on average they must agree for a
    while.

Without pytest (a bare GPU machine), `python tests/engine/test_gpu_engine.py` runs the same tests and
fixtures.
"""

from __future__ import annotations

import os
import random
import sys

import torch

try:
    import pytest
except ImportError:  # see _run_without_pytest
    pytest = None

if pytest is not None:
    pytestmark = pytest.mark.gpu


def module_fixture(fn):
    return pytest.fixture(scope="module")(fn) if pytest is not None else fn


STEPS = 32
PROMPT_LENS = [5, 37, 100, 150, 257, 333]  # 6 sequences: the decode graph of batch 8 runs with 2 padding rows
VOCAB = 151936
FIRST_ID = 10  # below: special tokens


def _engine_args(**overrides) -> dict:
    args = dict(
        device="cuda",
        dtype="bfloat16",
        block_size=16,
        max_model_len=1024,
        max_num_seqs=8,
        max_num_batched_tokens=1024,
        num_gpu_blocks_override=512,
        enable_prefix_caching=False,
    )
    args.update(overrides)
    return args


@module_fixture
def qwen_dir(tmp_path_factory):
    """Written once per module; PDSERVE_TEST_QWEN_DIR may name one already written (bench/engine.py leaves one
    at models/bench/qwen2.5-0.5b) to save the ~10 s."""
    from pdserve.tools.make_model import make_model

    given = os.environ.get("PDSERVE_TEST_QWEN_DIR")
    if given and os.path.exists(os.path.join(given, "config.json")):
        return given
    path = tmp_path_factory.mktemp("gpu-models") / "qwen2.5-0.5b"
    make_model(str(path), family="qwen2", preset="qwen2.5-0.5b", seed=0, dtype="bfloat16", progress=False)
    return str(path)


@module_fixture
def prompts():
    rng = random.Random(1234)
    return [[rng.randrange(FIRST_ID, VOCAB) for _ in range(n)] for n in PROMPT_LENS]


@module_fixture
def hf(qwen_dir):
    from transformers import AutoModelForCausalLM

    def load(dtype):
        return (
            AutoModelForCausalLM.from_pretrained(qwen_dir, dtype=dtype, attn_implementation="sdpa")
            .to("cuda")
            .eval()
        )

    models = {"bf16": load(torch.bfloat16), "fp32": load(torch.float32)}
    yield models
    del models
    torch.cuda.empty_cache()


@module_fixture
def llm(qwen_dir):
    from pdserve.engine import LLM

    engine = LLM(model=qwen_dir, **_engine_args())
    assert engine.core.runner.graphs is not None, "CUDA graphs should be on by default on a GPU"
    yield engine
    del engine
    torch.cuda.empty_cache()


@torch.inference_mode()
def hf_last_logits(model, prompts) -> torch.Tensor:
    return torch.stack(
        [model(input_ids=torch.tensor([p], device="cuda")).logits[0, -1].float() for p in prompts]
    )


@torch.inference_mode()
def our_prefill_logits(runner, prompts) -> torch.Tensor:
    """All prompts as prefills of one step, each with its own blocks; fp32 logits of each last token."""
    from pdserve.engine.scheduler_output import ScheduledRequest

    chunks, first = [], 0
    for i, p in enumerate(prompts):
        blocks = -(-(len(p) + 1) // runner.block_size)
        chunks.append(
            ScheduledRequest(
                request_id=f"p{i}",
                token_ids=list(p),
                num_computed_tokens=0,
                block_ids=list(range(first, first + blocks)),
                is_decode=False,
                samples=True,
            )
        )
        first += blocks
    return runner.execute(chunks, list(range(len(chunks)))).float(), chunks


@module_fixture
def tolerance(hf, prompts) -> dict:
    """transformers' own bf16 noise on these prompts, and the tolerance derived from it (module docstring)."""
    ref = hf_last_logits(hf["fp32"], prompts)
    bf16 = hf_last_logits(hf["bf16"], prompts)
    noise = float((bf16 - ref).abs().max())
    scale = float(ref.abs().max())
    tol = max(3 * noise, scale / 64)
    print(
        f"\n[tolerance] transformers bf16 vs fp32: max |diff| {noise:.4f} (logit max {scale:.2f}, "
        f"std {float(ref.std()):.2f}); TOL = {tol:.4f} ({tol / scale:.2%} of the largest logit)"
    )
    return {"noise": noise, "tol": tol, "scale": scale, "hf_fp32": ref, "hf_bf16": bf16}


def _margin(entry: dict) -> float:
    """top-1 minus top-2 logprob (= logit margin) from one generated token's logprobs entry."""
    values = sorted((lp.logprob for lp in entry.values()), reverse=True)
    return values[0] - values[1] if len(values) > 1 else float("inf")


def _generate(engine, prompts, logprobs: int | None = None):
    from pdserve.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=logprobs)
    outs = engine.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0] for o in outs]


def test_logits_match_transformers_within_bf16_tolerance(llm, prompts, tolerance):
    ours, _ = our_prefill_logits(llm.core.runner, prompts)
    to_bf16 = (ours - tolerance["hf_bf16"]).abs().amax(dim=-1)
    to_fp32 = (ours - tolerance["hf_fp32"]).abs().amax(dim=-1)
    for i, n in enumerate(PROMPT_LENS):
        print(
            f"[logits] prompt {n:4d} tokens: max |ours - hf bf16| {float(to_bf16[i]):.4f}, "
            f"max |ours - hf fp32| {float(to_fp32[i]):.4f}"
        )
    assert torch.isfinite(ours).all()
    assert float(to_bf16.max()) <= tolerance["tol"], (
        f"ours vs transformers bf16 {float(to_bf16.max()):.4f} > TOL"
    )
    assert float(to_fp32.max()) <= tolerance["tol"], (
        f"ours is {float(to_fp32.max()):.4f} from fp32, transformers' bf16 only {tolerance['noise']:.4f}"
    )


@torch.inference_mode()
def hf_greedy_with_margins(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    out = model(input_ids=torch.tensor([prompt], device="cuda"), use_cache=True)
    tokens, margins = [], []
    for _ in range(STEPS):
        top = torch.topk(out.logits[0, -1].float(), 2)
        tokens.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        out = model(input_ids=top.indices[:1].view(1, 1), past_key_values=out.past_key_values, use_cache=True)
    return tokens, margins


def test_greedy_tokens_match_transformers(llm, hf, prompts, tolerance):
    tol = tolerance["tol"]
    ours = [o.token_ids for o in _generate(llm, prompts)]
    assert all(len(t) == STEPS for t in ours)
    # 1. Teacher-forced: every one of our tokens is transformers' top-1 or within TOL of it.
    with torch.inference_mode():
        for p, toks in zip(prompts, ours, strict=False):
            logits = hf["bf16"](input_ids=torch.tensor([p + toks[:-1]], device="cuda")).logits[0].float()
            steps = logits[len(p) - 1 : len(p) - 1 + STEPS]
            gaps = (
                steps.max(dim=-1).values - steps.gather(1, torch.tensor(toks, device="cuda")[:, None])[:, 0]
            )
            worst = int(gaps.argmax())
            print(
                f"[teacher-forced] prompt {len(p):4d}: our token is transformers' top-1 at "
                f"{int((gaps == 0).sum())}/{STEPS} steps; largest gap {float(gaps[worst]):.4f} at step "
                f"{worst}"
            )
            assert float(gaps.max()) <= tol, (
                f"step {worst}: our token is {float(gaps[worst]):.3f} below top-1"
            )
    # 2. Free-running against transformers' own greedy.
    agreed = []
    for p, toks in zip(prompts, ours, strict=False):
        ref, margins = hf_greedy_with_margins(hf["bf16"], p)
        first = next((i for i in range(STEPS) if toks[i] != ref[i]), None)
        if first is None:
            print(
                f"[free-running] prompt {len(p):4d}: all {STEPS} tokens equal (smallest margin "
                f"{min(margins):.3f})"
            )
            agreed.append(STEPS)
            continue
        print(
            f"[free-running] prompt {len(p):4d}: equal for {first} steps, then differ at a transformers "
            f"margin "
            f"of {margins[first]:.4f} (TOL {tol:.4f}); margins up to there: "
            f"{[round(m, 3) for m in margins[: first + 1]]}"
        )
        assert margins[first] < tol, (
            f"differs at step {first} although transformers' margin is {margins[first]:.3f}"
        )
        agreed.append(first)
    mean = sum(agreed) / len(agreed)
    print(f"[free-running] steps equal per prompt: {agreed} (mean {mean:.1f})")
    assert mean >= 4, "the sequences part too early: near ties should be rarer than this"


def _assert_same_tokens(label: str, a_outs, b_outs, prompts, tol: float) -> None:
    """Equal token sequences, or equal until a step where b's own top-1 margin is a near tie (< tol)."""
    for p, a, b in zip(prompts, a_outs, b_outs, strict=False):
        first = next((i for i in range(STEPS) if a.token_ids[i] != b.token_ids[i]), None)
        if first is None:
            continue
        margin = _margin(b.logprobs[first])
        print(
            f"[{label}] prompt {len(p):4d}: tokens differ at step {first} (margin {margin:.4f}, TOL "
            f"{tol:.4f})"
        )
        assert margin < tol, f"{label}: prompt {len(p)} differs at step {first} with margin {margin:.3f}"
    same = sum(a.token_ids == b.token_ids for a, b in zip(a_outs, b_outs, strict=False))
    print(f"[{label}] {same}/{len(prompts)} sequences identical over {STEPS} tokens")


@torch.inference_mode()
def test_cuda_graph_decode_equals_eager(llm, qwen_dir, prompts, tolerance):
    from pdserve.engine import LLM
    from pdserve.engine.scheduler_output import ScheduledRequest

    # 1. One decode step of the 6 prompts (bucket 8: two padding rows) replayed from the graph and run
    # eagerly.
    runner = llm.core.runner
    prefill_logits, chunks = our_prefill_logits(runner, prompts)
    decodes = [
        ScheduledRequest(
            request_id=c.request_id,
            token_ids=[int(prefill_logits[i].argmax())],
            num_computed_tokens=len(c.token_ids),
            block_ids=c.block_ids,
            is_decode=True,
            samples=True,
        )
        for i, c in enumerate(chunks)
    ]
    rows = list(range(len(decodes)))
    graph_logits = runner.execute(decodes, rows).float().clone()
    graphs, runner.graphs = runner.graphs, None
    try:
        eager_logits = runner.execute(decodes, rows).float()
    finally:
        runner.graphs = graphs
    diff = float((graph_logits - eager_logits).abs().max())
    print(
        f"[graph vs eager] one decode step, batch {len(decodes)}: max |diff| {diff:.5f} "
        f"({'bitwise equal' if diff == 0 else 'not bitwise equal'})"
    )
    assert diff <= tolerance["tol"], f"graph and eager logits differ by {diff:.4f}"
    # 2. Whole generations: the default engine (graphs) against one built with enforce_eager=True.
    eager = LLM(model=qwen_dir, **_engine_args(enforce_eager=True))
    try:
        assert eager.core.runner.graphs is None
        _assert_same_tokens(
            "graph vs eager",
            _generate(llm, prompts, logprobs=2),
            _generate(eager, prompts, logprobs=2),
            prompts,
            tolerance["tol"],
        )
    finally:
        del eager
        torch.cuda.empty_cache()


def test_chunked_batched_prefill_equals_unchunked(llm, qwen_dir, prompts, tolerance):
    from pdserve.engine import LLM

    chunked = LLM(model=qwen_dir, **_engine_args(max_num_batched_tokens=64))
    try:
        got = _generate(chunked, prompts, logprobs=2)
        steps = chunked.core.stats.steps
    finally:
        del chunked
        torch.cuda.empty_cache()
    want = _generate(llm, prompts, logprobs=2)
    print(f"[chunked] {sum(PROMPT_LENS)} prompt tokens in chunks of <= 64: {steps} engine steps")
    assert steps >= sum(PROMPT_LENS) // 64, (
        "the 64-token budget should have split the prompts over many steps"
    )
    _assert_same_tokens("chunked vs unchunked", got, want, prompts, tolerance["tol"])


def _run_without_pytest() -> int:
    """Resolve the module fixtures by parameter name, run every test_* in file order, report like pytest
    -s."""
    import inspect
    import pathlib
    import tempfile
    import traceback

    class TmpPathFactory:
        def mktemp(self, name):
            return pathlib.Path(tempfile.mkdtemp(prefix=name + "-"))

    fixtures = {"qwen_dir": qwen_dir, "prompts": prompts, "hf": hf, "llm": llm, "tolerance": tolerance}
    values, generators = {"tmp_path_factory": TmpPathFactory()}, []

    def get(name):
        if name not in values:
            fn = fixtures[name]
            out = fn(*[get(p) for p in inspect.signature(fn).parameters])
            if inspect.isgenerator(out):
                generators.append(out)
                out = next(out)
            values[name] = out
        return values[name]

    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    failed = 0
    for name, fn in tests:
        try:
            fn(*[get(p) for p in inspect.signature(fn).parameters])
            print(f"PASSED {name}", flush=True)
        except Exception:
            failed += 1
            print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
    for gen in reversed(generators):
        next(gen, None)
    print(f"{len(tests) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    if pytest is not None:
        sys.exit(pytest.main([os.path.abspath(__file__), "-s", "-q", "-p", "no:cacheprovider"]))
    sys.exit(_run_without_pytest())
