"""The baseline: Hugging Face transformers eager (bf16, sdpa attention) on the same checkpoint and shapes.

- prefill: one forward of T tokens, logits for the last token only (`logits_to_keep=1`, as our engine does).
- decode step: one token per sequence on a DynamicCache already holding `context` tokens (random K/V written
  with `cache.update`, which is what a prefill leaves); the cache grows by one token per timed call, as it
  does in generate (DynamicCache concatenates: that copy is part of transformers' real cost).
- throughput: `generate` with max_new_tokens = min_new_tokens = output_len, greedy, on random prompts. Capped
  at about `hf_gen_max_s` seconds (and at `hf_gen_output_cap` new tokens with --quick): then fewer new tokens
  run and the steps left out are counted at the per-step cost measured from two short runs; params say so
  (`capped`).
Records are named hf_*; bench/engine_floors.link_baselines copies them into our records' `baseline`.
"""

from __future__ import annotations

import time

from bench.common import free_memory, gpu_memory_gib, guarded, is_cuda, sync, time_fn
from bench.engine_floors import Shape
from bench.engine_ours import FIRST_ID, add_decode_record, add_prefill_record
from pdserve.benchmarks.results import log


def load_hf(path: str, bench, dummy: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    kwargs = {"attn_implementation": "sdpa"}
    model = None
    if dummy:  # no weights on disk: transformers' own random initialisation, drawn on the device
        from transformers import AutoConfig

        with torch.device(bench.device):
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(path), dtype=bench.torch_dtype, **kwargs
            )
    elif is_cuda(
        bench.device
    ):  # straight onto the GPU where this transformers can (no 16 GB stop in host memory)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=bench.torch_dtype, device_map=str(bench.device), **kwargs
            )
        except Exception as exc:
            log(f"  (device_map load failed: {exc!r}; loading on the host, then moving)")
            model = None
            free_memory(bench.device)
    if model is None:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=bench.torch_dtype, **kwargs)
        except TypeError:  # older transformers: torch_dtype
            model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=bench.torch_dtype, **kwargs)
        model = model.to(bench.device)
    model.eval()
    where = {str(p.device) for p in model.parameters()}
    if where != {str(bench.device)} and not (is_cuda(bench.device) and where <= {"cuda:0", "cuda"}):
        raise RuntimeError(f"transformers' weights ended up on {sorted(where)}, not {bench.device}")
    sync(bench.device)
    log(
        f"transformers {model.__class__.__name__} loaded in {time.perf_counter() - started:.1f} s "
        f"(attn {getattr(model.config, '_attn_implementation', '?')}, {gpu_memory_gib(bench.device)})"
    )
    torch.manual_seed(0)
    return model


def run_hf(bench, name: str, path: str, shape: Shape, dummy: bool = False) -> None:
    import torch

    if bench.out_of_time(f"{name} transformers"):
        return
    model = load_hf(path, bench, dummy)
    try:
        with torch.inference_mode():
            with guarded(f"{name}: transformers prefill", bench.failures, bench.device):
                hf_prefill(bench, model, name, shape)
            with guarded(f"{name}: transformers decode step", bench.failures, bench.device):
                hf_decode(bench, model, name, shape)
            with guarded(f"{name}: transformers generate", bench.failures, bench.device):
                hf_generate(bench, model, name, shape)
    finally:
        del model
        free_memory(bench.device)
        log(f"freed transformers ({gpu_memory_gib(bench.device)})")


def _forward_kwargs(model, **kwargs) -> dict:
    """logits_to_keep=1 where this transformers has it (it skips the vocab projection of all but the last
    row)."""
    import inspect

    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


def hf_prefill(bench, model, name: str, shape: Shape) -> None:
    for tokens in bench.sizes.prefill_tokens:
        if bench.out_of_time(f"{name} transformers prefill {tokens}"):
            return
        _hf_prefill_one(bench, model, name, shape, tokens)


def _hf_prefill_one(bench, model, name: str, shape: Shape, tokens: int) -> None:
    import torch

    ids = torch.randint(FIRST_ID, shape.vocab, (1, tokens), device=bench.device)
    kwargs = _forward_kwargs(model, input_ids=ids, use_cache=False)
    t = time_fn(
        lambda: model(**kwargs),
        bench.device,
        warmup=bench.sizes.warmup,
        iters=bench.sizes.iters,
        max_seconds=8.0,
    )
    add_prefill_record(bench, "hf_prefill_ms", name, shape, tokens, t, impl="transformers sdpa")


def make_cache(model, shape: Shape, batch: int, context: int, bench):
    """A DynamicCache holding `context` tokens of random K/V per layer."""
    import torch
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    for layer in range(shape.layers):
        k = torch.randn(
            batch, shape.kv_heads, context, shape.head_dim, dtype=bench.torch_dtype, device=bench.device
        )
        cache.update(k, torch.randn_like(k), layer)
    return cache


def _fits(bench, nbytes: float) -> bool:
    if not is_cuda(bench.device):
        return True
    import torch

    free, _ = torch.cuda.mem_get_info(bench.device)
    return nbytes < 0.85 * free


def hf_decode(bench, model, name: str, shape: Shape) -> None:
    for context in bench.sizes.decode_contexts:
        for batch in bench.sizes.decode_batches:
            if bench.out_of_time(f"{name} transformers decode b{batch} ctx{context}"):
                return
            _hf_decode_one(bench, model, name, shape, batch, context)
            free_memory(bench.device)  # this shape's cache is gone before the next one is made


def _hf_decode_one(bench, model, name: str, shape: Shape, batch: int, context: int) -> None:
    import torch

    iters = bench.sizes.decode_iters
    grown = context + bench.sizes.warmup + iters + 1
    # the cache, plus one layer's K/V twice over while DynamicCache concatenates, plus a GiB of activations
    need = batch * grown * shape.kv_bytes_per_token * (1 + 2 / shape.layers) + 2**30
    if not _fits(bench, need):
        reason = f"a {need / 2**30:.1f} GiB DynamicCache does not fit beside transformers' weights"
        log(f"  SKIPPED transformers decode b{batch} ctx{context}: {reason}")
        bench.results.add(
            "hf_decode_step_ms",
            None,
            "ms",
            params={"model": name, "batch": batch, "context": context, "skipped": reason},
        )
        return
    cache = make_cache(model, shape, batch, context, bench)
    ids = torch.randint(FIRST_ID, shape.vocab, (batch, 1), device=bench.device)
    kwargs = _forward_kwargs(model, input_ids=ids, past_key_values=cache, use_cache=True)
    t = time_fn(
        lambda: model(**kwargs), bench.device, warmup=bench.sizes.warmup, iters=iters, max_seconds=6.0
    )
    add_decode_record(
        bench,
        "hf_decode_step_ms",
        name,
        shape,
        batch,
        context,
        t,
        impl="transformers sdpa, DynamicCache",
        note=f"the cache grows by one token per call (to <= {grown})",
    )


def hf_generate(bench, model, name: str, shape: Shape) -> None:
    import torch

    s = bench.sizes
    if bench.out_of_time(f"{name} transformers generate"):
        return
    gen_cfg = getattr(model, "generation_config", None)
    pad = getattr(gen_cfg, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else 0

    def run(new_tokens: int) -> float:
        ids = torch.randint(FIRST_ID, shape.vocab, (s.gen_batch, s.gen_input), device=bench.device)
        sync(bench.device)
        started = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        sync(bench.device)
        seconds = time.perf_counter() - started
        assert out.shape[1] == s.gen_input + new_tokens, f"generate returned {tuple(out.shape)}"
        return seconds

    # 1. Warm up, and measure the prefill and the per-token cost from two short runs.
    short, probe = min(2, s.gen_output), min(8, s.gen_output)
    short_s = run(short)
    probe_s = run(probe)
    per_token = max((probe_s - short_s) / max(probe - short, 1), 1e-6)
    prefill_s = max(short_s - short * per_token, 0.0)
    new_tokens = min(s.gen_output, s.hf_gen_output_cap or s.gen_output)
    if prefill_s + per_token * new_tokens > s.hf_gen_max_s:
        new_tokens = max(probe, int((s.hf_gen_max_s - prefill_s) / per_token))
    log(
        f"  transformers generate: prefill ~{prefill_s:.2f} s, ~{per_token * 1e3:.1f} ms per step; "
        f"running {new_tokens} new tokens"
    )
    # 2. The timed run; if capped, the missing steps are added at the measured per-step cost (which favours
    #    transformers slightly: its later steps read a longer cache).
    seconds = run(new_tokens) if new_tokens != probe else probe_s
    full_seconds = seconds + per_token * (s.gen_output - new_tokens)
    value = s.gen_batch * s.gen_output / full_seconds
    floor_s = shape.generate_floor_s(s.gen_batch, s.gen_input, s.gen_output, bench.matmul_rate, bench.copy_bw)
    ceiling = s.gen_batch * s.gen_output / floor_s
    params = {
        "model": name,
        "batch": s.gen_batch,
        "input_len": s.gen_input,
        "output_len": s.gen_output,
        "new_tokens_run": new_tokens,
        "seconds": round(full_seconds, 3),
        "prefill_s": round(prefill_s, 3),
        "step_ms": round(per_token * 1e3, 2),
        "impl": "transformers generate, sdpa, greedy",
    }
    if new_tokens < s.gen_output:
        params["capped"] = (
            f"ran {new_tokens} of {s.gen_output} new tokens (--quick or time cap); the other "
            f"{s.gen_output - new_tokens} steps counted at the measured {per_token * 1e3:.1f} ms each"
        )
        params["measured_tok_s"] = round(s.gen_batch * new_tokens / seconds, 2)
        log(f"  transformers generate capped: {params['capped']}")
    bench.results.add(
        "hf_throughput_tok_s",
        round(value, 2),
        "tok/s",
        ceiling=round(ceiling, 1),
        ratio=round(value / ceiling, 4),
        params=params,
    )
