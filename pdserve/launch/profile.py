"""`pdserve profile`: measure a node's engine on the devices at hand and write the profile that `pdserve plan`
reads (planner/profile.py).

Prefill: one prompt alone, every chunk of it, for each input length (fresh random tokens: no prefix hit).
Decode: `batch` requests of `context` tokens running together, the median of several steps once all of them
are decoding. Each figure is the median of --reps runs. The engine is the one a node would run with the same
engine flags (device, dtype, -tp, block size, batching limits), in this process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import random
import statistics
import time

from pdserve.engine.config import add_engine_args

log = logging.getLogger(__name__)

DECODE_STEPS = 8  # timed steps per decode point


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure prefill and decode times of a node for `pdserve plan`")
    add_engine_args(p)
    p.add_argument("--input-lens", type=int, nargs="+", default=[128, 512, 2048, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--reps", type=int, default=3, help="runs per figure (the median is kept)")
    p.add_argument("--out", required=True, help="the profile JSON to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pdserve.engine.config import engine_config_from_args
    from pdserve.engine.llm import LLM
    from pdserve.wire.errors import ConfigError
    from pdserve.wire.model_source import resolve_model_flag

    for name in ("input_lens", "batches", "contexts"):
        if min(getattr(args, name)) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if args.reps < 1:
        raise ConfigError("--reps must be at least 1")
    resolve_model_flag(args)
    config = engine_config_from_args(args)
    with LLM.from_config(config) as llm:
        profile = measure(llm.core, args)
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=1)
    print(f"profile: {args.out} ({len(profile['prefill'])} prefill, {len(profile['decode'])} decode points)")
    return 0


def measure(core, args: argparse.Namespace) -> dict:
    from pdserve.planner.profile import SCHEMA

    pool, config = core.block_pool, core.config
    kv_tokens = pool.num_blocks * config.cache.block_size
    rng = random.Random(0)
    vocab = core.runner.arch.vocab_size
    prefill, decode = [], []
    _prefill_ms(core, _prompt(rng, vocab, min(args.input_lens)))  # untimed: first-call costs (compiles)
    for n in args.input_lens:
        if n + 1 > min(kv_tokens, core.max_model_len):
            log.warning("profile: skipping input length %d: the cache or max_model_len cannot hold it", n)
            continue
        ms = statistics.median(_prefill_ms(core, _prompt(rng, vocab, n)) for _ in range(args.reps))
        prefill.append({"input_len": n, "ms": round(ms, 4)})
        print(f"prefill {n:6d} tokens: {ms:9.3f} ms", flush=True)
    for context in args.contexts:
        for batch in args.batches:
            need = batch * (context + DECODE_STEPS + 2)
            if need > kv_tokens or batch > config.scheduler.max_num_seqs:
                log.warning(
                    "profile: skipping batch %d x context %d: more than the node holds", batch, context
                )
                continue
            ms = statistics.median(_decode_ms(core, rng, vocab, batch, context) for _ in range(args.reps))
            decode.append({"batch": batch, "context": context, "itl_ms": round(ms, 4)})
            print(f"decode batch {batch:4d} context {context:6d}: {ms:9.3f} ms per step", flush=True)
    return {
        "schema": SCHEMA,
        "model": config.model.model,
        "device": _device_name(core.runner.device),
        "date": datetime.date.today().isoformat(),
        "tensor_parallel_size": config.parallel.tensor_parallel_size,
        "kv_cache_tokens": kv_tokens,
        "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
        "prefill": prefill,
        "decode": decode,
    }


def _prompt(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


def _params(max_tokens: int):
    from pdserve.wire.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)


def _prefill_ms(core, ids: list[int]) -> float:
    """One prompt alone until its first token: every chunk's step."""
    rid = f"profile-prefill-{time.monotonic_ns()}"
    core.add_request(rid, ids, _params(1))
    start = time.perf_counter()
    while core.has_unfinished():
        core.step()
    return (time.perf_counter() - start) * 1e3


def _decode_ms(core, rng: random.Random, vocab: int, batch: int, context: int) -> float:
    """The median step once `batch` requests of `context` tokens all decode (each step returns its sampled
    tokens to the host, so a step's wall time is its own)."""
    rids = [f"profile-decode-{time.monotonic_ns()}-{i}" for i in range(batch)]
    for rid in rids:
        core.add_request(rid, _prompt(rng, vocab, context), _params(DECODE_STEPS + 2))
    started: set[str] = set()
    while len(started) < batch:  # prefill everyone (a step may mix prefills and decodes)
        started |= {o.request_id for o in core.step() if o.new_token_ids}
    core.step()  # every request decodes in this one: a first pure step, untimed
    times = []
    for _ in range(DECODE_STEPS):
        start = time.perf_counter()
        core.step()
        times.append((time.perf_counter() - start) * 1e3)
    for rid in rids:
        core.abort_request(rid)
    while core.has_unfinished():
        core.step()
    return statistics.median(times)


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
