"""Smoke-test a running pdserve cluster with the official openai client, optionally against transformers.

    python deploy/smoke_openai.py --base-url http://127.0.0.1:8000/v1 --model-dir DIR --requests 50 --check-hf

Sends `--requests` greedy requests (completions and chat, streamed and not, prompts of several lengths, some
sharing long prefixes so the prefix cache and cache-aware routing are exercised), `--concurrency` at a time.
With --check-hf it loads the checkpoint in transformers (on the GPU when there is one, in the checkpoint's
dtype) and checks every response's token ids against transformers' greedy continuation. Prints one line per
request and a summary; --out writes the summary as JSON. Exit status 1 when any request failed or differed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be or had not "
    "but what all when there can said one each she do how their if will up other about out many then them "
    "these so some would make like him into time has look two more write go see number no way could people "
    "my than first water been call who oil its now find long down day did get come made may part"
).split()


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    shared = [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(3)]
    prompts = []
    for i in range(n):
        kind = i % 3
        if kind == 0:  # short: colocated on the decode node
            prompts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))))
        elif kind == 1:  # long, shared prefix: prefix cache and cache-aware routing
            prompts.append(
                shared[i % 3] + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
            )
        else:  # long, unique: disaggregated
            prompts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 600))))
    return prompts


def hf_models(model_dir: str, dtype: str = "auto"):
    """transformers' model in the serving dtype (default: the checkpoint's), and in float32 (the exact
    reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    exact = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return model, exact, device


def teacher_forced_gap(model, exact, device, prompt: list[int], ids: list[int]) -> tuple[float, float]:
    """(worst gap, tolerance): transformers reads the prompt plus our tokens; the worst gap is the largest
    (top-1 logit - logit of our token) over the steps. The tolerance is 3x transformers' own rounding noise on
    these logits (max |checkpoint dtype - float32|): two correct low-precision implementations can each be
    that far from exact, so a near tie may go either way. A wrong KV or position costs several units."""
    import torch

    with torch.no_grad():
        seq = torch.tensor([prompt + ids], device=device)
        rows = slice(len(prompt) - 1, len(prompt) - 1 + len(ids))
        logits = model(input_ids=seq).logits[0, rows].float()
        reference = exact(input_ids=seq).logits[0, rows].float()
    chosen = logits.gather(1, torch.tensor(ids, device=device).unsqueeze(1)).squeeze(1)
    gap = float((logits.max(dim=1).values - chosen).max())
    return gap, 3 * float((logits - reference).abs().max())


def hf_greedy_fn(model, device):
    import torch

    def greedy(prompt: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
            ids = []
            for _ in range(n):
                token = int(out.logits[0, -1].argmax())
                ids.append(token)
                out = model(
                    input_ids=torch.tensor([[token]], device=device),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
        return ids

    return greedy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="unused")
    p.add_argument(
        "--model-dir", required=True, help="the checkpoint the cluster serves (tokenizer, HF check)"
    )
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--check-hf", action="store_true")
    p.add_argument(
        "--hf-dtype", default="auto", help="dtype transformers runs in: the one the nodes serve in"
    )
    p.add_argument(
        "--near-ties-ok",
        action="store_true",
        help="for low-precision serving: accept a difference where every token we chose is within "
        "transformers' own rounding noise of its top-1 (teacher-forced)",
    )
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    from openai import OpenAI

    from pdserve.wire.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model_dir)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    prompts = make_prompts(args.requests)
    extra = {"ignore_eos": True, "return_token_ids": True}

    def one(i: int) -> dict:
        prompt, chat, stream = prompts[i], i % 4 in (2, 3), i % 2 == 1
        t0 = time.monotonic()
        try:
            if chat:
                messages = [{"role": "user", "content": prompt}]
                prompt_ids = tok.encode_chat(messages)
                if stream:
                    ids, text = [], ""
                    for c in client.chat.completions.create(
                        model=model,
                        messages=messages,
                        temperature=0,
                        max_tokens=args.max_tokens,
                        stream=True,
                        extra_body=extra,
                    ):
                        if c.choices:
                            text += c.choices[0].delta.content or ""
                            ids += (c.choices[0].model_extra or {}).get("token_ids") or []
                else:
                    r = client.chat.completions.create(
                        model=model,
                        messages=messages,
                        temperature=0,
                        max_tokens=args.max_tokens,
                        extra_body=extra,
                    )
                    ids, text = r.choices[0].model_extra["token_ids"], r.choices[0].message.content
            else:
                prompt_ids = tok.encode(prompt)
                if stream:
                    ids, text = [], ""
                    for c in client.completions.create(
                        model=model,
                        prompt=prompt,
                        temperature=0,
                        max_tokens=args.max_tokens,
                        stream=True,
                        extra_body=extra,
                    ):
                        if c.choices:
                            text += c.choices[0].text
                            ids += (c.choices[0].model_extra or {}).get("token_ids") or []
                else:
                    r = client.completions.create(
                        model=model,
                        prompt=prompt,
                        temperature=0,
                        max_tokens=args.max_tokens,
                        extra_body=extra,
                    )
                    ids, text = r.choices[0].model_extra["token_ids"], r.choices[0].text
            return {
                "i": i,
                "ok": True,
                "chat": chat,
                "stream": stream,
                "prompt_tokens": len(prompt_ids),
                "prompt_ids": prompt_ids,
                "ids": ids,
                "text": text,
                "seconds": time.monotonic() - t0,
            }
        except Exception as exc:  # noqa: BLE001 - reported per request
            return {
                "i": i,
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "seconds": time.monotonic() - t0,
            }

    t0 = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(one, range(args.requests)))
    wall = time.monotonic() - t0
    greedy, models = None, None
    if args.check_hf:
        models = hf_models(args.model_dir, args.hf_dtype)
        greedy = hf_greedy_fn(models[0], models[2])
    bad = near_ties = 0
    for r in results:
        line = f"#{r['i']:3d} "
        if not r["ok"]:
            bad += 1
            print(line + "FAILED " + r["error"], flush=True)
            continue
        line += (
            f"{'chat' if r['chat'] else 'cmpl'} {'stream' if r['stream'] else 'json  '} "
            f"{r['prompt_tokens']:4d} prompt tokens, {len(r['ids'])} generated, {r['seconds']:.2f}s"
        )
        if greedy is not None:
            want = greedy(r["prompt_ids"], args.max_tokens)
            r["hf_match"] = r["ids"] == want and r["text"] == tok.decode(want)
            if r["hf_match"]:
                line += "  = transformers"
            else:
                first = next(
                    (k for k, (a, b) in enumerate(zip(r["ids"], want, strict=False)) if a != b),
                    min(len(want), len(r["ids"])),
                )
                gap, tol = teacher_forced_gap(*models, r["prompt_ids"], r["ids"])
                r.update(first_difference=first, worst_gap=gap, tolerance=tol)
                if args.near_ties_ok and gap <= tol:
                    near_ties += 1
                    line += (
                        f"  differs at token {first}, a near tie: every token within {gap:.3f} of "
                        f"transformers' top-1 (tolerance {tol:.3f})"
                    )
                else:
                    bad += 1
                    line += f"  DIFFERS from transformers at token {first} (worst gap {gap:.3f}, tolerance "
                    f"{tol:.3f})"
        print(line, flush=True)
    summary = {
        "requests": args.requests,
        "failed_or_different": bad,
        "near_ties": near_ties,
        "wall_s": round(wall, 3),
        "checked_against_hf": greedy is not None,
        "max_tokens": args.max_tokens,
        "results": [{k: v for k, v in r.items() if k not in ("prompt_ids",)} for r in results],
    }
    print(
        f"{args.requests - bad}/{args.requests} requests ok"
        + (
            f" and equal to transformers' greedy output ({near_ties} of them up to near ties)"
            if greedy is not None
            else ""
        )
        + f" in {wall:.1f}s"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
