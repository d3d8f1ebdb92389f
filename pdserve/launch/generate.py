"""`pdserve generate`: offline, colocated generation from the command line."""

from __future__ import annotations

import argparse
import json

from pdserve.engine.config import add_engine_args


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate offline (prefill and decode in this process)")
    add_engine_args(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stop", action="append", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pdserve.engine.config import engine_config_from_args
    from pdserve.engine.llm import LLM
    from pdserve.wire.model_source import resolve_model_flag
    from pdserve.wire.sampling_params import SamplingParams

    resolve_model_flag(args)  # a hub id -> its cached folder, once, as every command does
    config = engine_config_from_args(args)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.sampling_seed,
        ignore_eos=args.ignore_eos,
        stop=args.stop,
    )
    with LLM.from_config(config) as llm:
        outputs = llm.generate(args.prompt, params)
    for output in outputs:
        completion = output.outputs[0]
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": output.prompt,
                        "text": completion.text,
                        "token_ids": completion.token_ids,
                        "finish_reason": completion.finish_reason,
                    }
                )
            )
        else:
            print(f"{output.prompt!r} -> {completion.text!r} ({completion.finish_reason})")
    return 0
