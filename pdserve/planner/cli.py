"""`pdserve plan`: how many prefill and decode nodes a workload needs, from a profile (planner/plan.py)."""

from __future__ import annotations

import argparse
import json


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="prefill and decode node counts for a workload, from `pdserve profile`'s measurements"
    )
    p.add_argument("--profile", required=True, help="a profile JSON written by `pdserve profile`")
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--input-len", type=int, required=True, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, required=True, help="generated tokens per request")
    p.add_argument("--ttft-ms", type=float, required=True, help="time-to-first-token goal (mean)")
    p.add_argument("--itl-ms", type=float, required=True, help="inter-token latency goal (p99)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs to split into nodes")
    p.add_argument("--json", action="store_true", help="print the plan and every split as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pdserve.planner.plan import Workload, plan, split_dict
    from pdserve.planner.profile import Profile

    profile = Profile.load(args.profile)
    workload = Workload(args.rate, args.input_len, args.output_len, args.ttft_ms, args.itl_ms)
    best, splits = plan(profile, workload, args.gpus)
    if args.json:
        print(json.dumps({"plan": split_dict(best), "splits": [split_dict(s) for s in splits]}, indent=1))
        return 0
    print(
        f"{best.prefill_nodes} prefill + {best.decode_nodes} decode nodes, "
        f"{profile.tensor_parallel_size} GPU(s) each"
    )
    for s in splits:
        at = s.at_rate
        mark = "->" if s is best else "  "
        print(
            f"{mark} {s.prefill_nodes}P{s.decode_nodes}D: goodput {s.goodput_req_s:.2f} req/s "
            f"(holds the goals up to {s.capacity_req_s:.2f}; then {s.binding}), "
            f"TTFT {at.ttft_ms:.1f} ms, ITL {at.itl_ms:.2f} ms, decode batch {at.decode_batch:.1f}"
        )
    return 0
