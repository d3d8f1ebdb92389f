"""`pdserve bench`: measure any OpenAI-compatible server the way `vllm bench serve` does.

    pdserve bench --base-url http://127.0.0.1:8000 [--endpoint /v1/completions | /v1/chat/completions]
        [--dataset-name random|prefix|conversation|jsonl] [--input-len 1024] [--output-len 128]
        [--request-rate inf | 4 | 1,2,4,8 | sweep] [--num-prompts 200 | --duration 30] [--burstiness 1.0]
        [--max-concurrency N] [--goodput ttft:1000 tpot:50 itl:25] [--num-warmups 2] [--seed 0]
        [--save-result --result-dir DIR --result-filename F] [--plot]

Per rate it prints the summary table and, with --save-result (or --result-dir / --result-filename), writes the
records to one JSON file in the project's results format; --plot draws latency and goodput against rate and
the server-reported phases. `--request-rate sweep` climbs from --sweep-start by --sweep-factor until the share
of requests meeting --goodput falls below --sweep-attainment (that rate included), at most --sweep-max-rates
rates. Each rate runs its own draw of the workload (seed + rate index), so no rate finds its prompts cached by
an earlier one; warm-up requests come from yet another draw and are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
import time
from typing import Optional

from pdserve.benchmarks.results import Results, log
from pdserve.benchmarks.serving_client import ClientConfig, RunOutput, ServerUnusable, run_requests
from pdserve.benchmarks.serving_metrics import compute_figures, parse_slos
from pdserve.benchmarks.serving_report import figure_records, rate_label, summary_lines
from pdserve.benchmarks.workloads import WorkloadError, build_workload, load_tokenizer
from pdserve.wire.errors import ConfigError

WARMUP_SEED_OFFSET = 1_000_003


def parse_rates(text: str) -> Optional[list[float]]:
    """'inf' | '4' | '1,2,4' -> rates; 'sweep' -> None."""
    if text.strip() == "sweep":
        return None
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--request-rate {text!r}: expected numbers separated by commas, 'inf' or 'sweep'"
        ) from None
    if not rates or any(r <= 0 or math.isnan(r) for r in rates):
        raise ConfigError(f"--request-rate {text!r}: rates must be positive")
    return rates


class BenchRun:
    """One server measured at a list of rates (or a sweep), under one or more named SLOs.

    slos: name -> {metric: seconds}; each rate's goodput is computed under each (from the same requests)."""

    def __init__(
        self,
        args: argparse.Namespace,
        label: str,
        slos: dict[str, dict[str, float]],
        results: Optional[Results] = None,
        extra_params: Optional[dict] = None,
    ):
        self.args, self.label, self.slos, self.results = args, label, slos, results
        self.extra_params = dict(extra_params or {})
        self.tokenizer = load_tokenizer(args.tokenizer)
        self.cfg = ClientConfig(
            base_url=args.base_url,
            endpoint=args.endpoint,
            model=args.model or "",
            ignore_eos=args.ignore_eos,
            request_timeout_s=args.request_timeout,
            api_key=args.api_key or os.environ.get("OPENAI_API_KEY", ""),
            tokenizer=self.tokenizer,
        )
        self.figures: list[tuple[float, dict[str, dict]]] = []  # (rate, slo name -> figures)
        self.deadline: Optional[float] = None  # time.monotonic() after which no new rate starts

    def workload(self, rate: float, index: int) -> list:
        a = self.args
        num = a.num_prompts
        if a.duration and not math.isinf(rate):
            num = max(a.min_prompts, math.ceil(rate * a.duration))
        return build_workload(a, num, self.tokenizer, seed_offset=index + 1)

    def warm_up(self) -> None:
        if self.args.num_warmups <= 0:
            return
        log(f"{self.label}: {self.args.num_warmups} warm-up request(s), not counted")
        reqs = build_workload(
            self.args, self.args.num_warmups, self.tokenizer, seed_offset=WARMUP_SEED_OFFSET
        )
        out = asyncio.run(run_requests(self.cfg, reqs, math.inf, max_concurrency=self.args.max_concurrency))
        failed = [r for r in out.results if not r.ok]
        if failed:
            log(
                f"{self.label}: {len(failed)} warm-up request(s) failed, first: {failed[0].error_kind} "
                f"{failed[0].error}"
            )

    def run_rate(self, rate: float, index: int) -> dict[str, dict]:
        reqs = self.workload(rate, index)
        log(f"{self.label}: rate {rate_label(rate)} req/s, {len(reqs)} requests ({self.args.dataset_name})")
        out = self._send(reqs, rate, index)
        by_slo = {
            name: compute_figures(out.results, out.duration_s, slo, self.args.prefill_workers)
            for name, slo in (self.slos or {"": {}}).items()
        }
        self.figures.append((rate, by_slo))
        names = list(by_slo)
        lines = summary_lines(by_slo[names[0]], self.label + (f" [{names[0]}]" if names[0] else ""), rate)
        for name in names[1:]:  # the other SLOs change only goodput: one line each, not the whole table again
            fig = by_slo[name]
            lines.append(
                f"Goodput under [{name}]: {fig['goodput']:.2f} req/s, SLO attainment "
                f"{fig['slo_attainment']:.2f}"
            )
        print("\n".join(lines), flush=True)
        self._record(rate, by_slo)
        return by_slo

    def _send(self, reqs: list, rate: float, index: int) -> RunOutput:
        from tqdm import tqdm

        bar = tqdm(
            total=len(reqs),
            desc=f"{self.label} @ {rate_label(rate)}",
            unit="req",
            disable=self.args.disable_tqdm,
            file=sys.stderr,
        )
        try:
            return asyncio.run(
                run_requests(
                    self.cfg,
                    reqs,
                    rate,
                    self.args.burstiness,
                    self.args.max_concurrency,
                    seed=self.args.seed + index,
                    on_done=lambda r: bar.update(1),
                    drain_timeout_s=self.args.drain_timeout,
                )
            )
        finally:
            bar.close()

    def params(self, rate: float) -> dict:
        a = self.args
        p = {
            "run": self.label,
            "request_rate": rate_label(rate),
            "dataset": a.dataset_name,
            "endpoint": a.endpoint,
            "input_len": a.input_len,
            "output_len": a.output_len,
            "burstiness": str(a.burstiness),
            "max_concurrency": a.max_concurrency or 0,
        }
        if a.dataset_name == "prefix":
            p.update(prefix_groups=a.prefix_groups, prefix_len=a.prefix_len)
        if a.dataset_name == "conversation":
            p.update(conversation_turns=a.conversation_turns)
        return {**p, **self.extra_params}

    def _record(self, rate: float, by_slo: dict[str, dict]) -> None:
        if self.results is None:
            return
        per_slo = ("goodput", "slo_attainment")
        first = next(iter(by_slo.values()))
        recs = [r for r in figure_records(first, self.params(rate)) if r["metric"] not in per_slo]
        for name, fig in by_slo.items():  # the other figures do not depend on the SLO: recorded once
            if fig.get("goodput") is not None:
                recs += [
                    r
                    for r in figure_records(fig, {**self.params(rate), "slo": name})
                    if r["metric"] in per_slo
                ]
        for rec in recs:
            self.results.add(
                rec["metric"],
                rec["value"],
                rec["unit"],
                rec["ceiling"],
                rec["ratio"],
                rec["baseline"],
                rec["params"],
                quiet=True,
            )

    def rates_to_run(self):
        """Yields the rates: the list given, or the sweep's (it stops once every SLO broke)."""
        rates = parse_rates(self.args.request_rate)
        if rates is not None:
            yield from rates
            return
        rate = self.args.sweep_start
        for _ in range(self.args.sweep_max_rates):
            yield rate
            _, by_slo = self.figures[-1]
            if all((f["slo_attainment"] or 0.0) < self.args.sweep_attainment for f in by_slo.values()):
                log(f"{self.label}: every SLO broke at {rate_label(rate)} req/s; the sweep stops here")
                return
            rate *= self.args.sweep_factor

    def run(self) -> list[tuple[float, dict[str, dict]]]:
        self.warm_up()
        for index, rate in enumerate(self.rates_to_run()):
            if index and self.deadline is not None and time.monotonic() > self.deadline:
                log(f"{self.label}: time budget spent; no rate after {rate_label(self.figures[-1][0])} req/s")
                break
            self.run_rate(rate, index)
        return self.figures


def slo_from_args(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    try:
        slo = parse_slos(args.goodput)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if parse_rates(args.request_rate) is None and not slo:
        raise ConfigError("--request-rate sweep needs --goodput (the SLO whose breaking ends the sweep)")
    return {" ".join(args.goodput): slo} if slo else {}


def open_results(args: argparse.Namespace) -> Optional[Results]:
    if not (args.save_result or args.result_dir or args.result_filename or args.plot):
        return None
    results = Results(
        "serving", args.result_dir or ".", slug=args.device_label, filename=args.result_filename or None
    )
    results.commands[-1] = "pdserve bench " + " ".join(getattr(args, "argv", [])[1:])
    return results


def run_cli(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would bury the tables
    slos = slo_from_args(args)
    try:
        results = open_results(args)
        label = args.label or args.base_url.split("://")[-1].rstrip("/")
        bench = BenchRun(args, label, slos, results)
        bench.run()
    except (WorkloadError, ServerUnusable) as exc:
        raise ConfigError(str(exc)) from None
    if results is not None:
        log(f"results: {results.path}")
        if args.plot:
            from pdserve.benchmarks.serving_plots import plot_serving

            plot_serving(results.path, os.path.splitext(results.path)[0] + ".png")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="the server's root URL, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"]
    )
    p.add_argument("--model", default="", help="model name to send (default: the first one /v1/models lists)")
    p.add_argument(
        "--tokenizer",
        default="",
        help="a model folder with tokenizer.json (or a Hugging Face hub id in the local cache): token ids "
        "from its vocabulary, and chat prompts decoded to text",
    )
    p.add_argument("--api-key", default="", help="bearer token (default: $OPENAI_API_KEY)")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset-name", default="random", choices=["random", "prefix", "conversation", "jsonl"])
    w.add_argument("--dataset-path", default="", help='jsonl: one {"prompt": ..., "output_len": N} a line')
    w.add_argument(
        "--input-len",
        "--random-input-len",
        type=int,
        default=1024,
        help="prompt tokens (random); unique tokens after the prefix (prefix); new tokens a turn "
        "(conversation)",
    )
    w.add_argument("--output-len", "--random-output-len", type=int, default=128)
    w.add_argument("--prefix-groups", type=int, default=8, help="prefix: how many shared prefixes")
    w.add_argument("--prefix-len", "--random-prefix-len", type=int, default=1024, help="prefix: tokens each")
    w.add_argument("--conversation-turns", type=int, default=4)
    w.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask for exactly --output-len tokens (vLLM's ignore_eos)",
    )
    a = p.add_argument_group("arrivals")
    a.add_argument("--request-rate", default="inf", help="req/s: a number, a list (1,2,4,8), inf, or sweep")
    a.add_argument("--num-prompts", type=int, default=200, help="requests per rate (without --duration)")
    a.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="seconds of arrivals per rate: rate x duration requests (at least --min-prompts)",
    )
    a.add_argument("--min-prompts", type=int, default=8)
    a.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 Poisson, <1 burstier"
    )
    a.add_argument("--max-concurrency", type=int, default=None)
    a.add_argument("--num-warmups", type=int, default=0)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--sweep-start", type=float, default=1.0)
    a.add_argument("--sweep-factor", type=float, default=2.0)
    a.add_argument("--sweep-max-rates", type=int, default=6)
    a.add_argument(
        "--sweep-attainment",
        type=float,
        default=0.9,
        help="share of requests meeting --goodput below which the SLO counts as broken",
    )
    a.add_argument("--request-timeout", type=float, default=600.0)
    a.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="seconds to wait after the last arrival; "
        "requests still running then are cancelled and count as errors of kind unfinished",
    )
    r = p.add_argument_group("results")
    r.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:MS",
        help="SLO for goodput: ttft:MS tpot:MS itl:MS (a request's p99 gap) e2el:MS",
    )
    r.add_argument(
        "--prefill-workers",
        type=int,
        default=1,
        help="prefill engines behind the server, for the prefill capacity bound",
    )
    r.add_argument(
        "--label", default="", help="this run's name in records and plots (default: the host:port)"
    )
    r.add_argument("--save-result", action="store_true")
    r.add_argument("--result-dir", default="")
    r.add_argument("--result-filename", default="")
    r.add_argument("--device-label", default="unknown", help="the server's device, for the results file")
    r.add_argument(
        "--plot", action="store_true", help="draw a PNG beside the results file (needs matplotlib)"
    )
    r.add_argument("--disable-tqdm", action="store_true")


def _check(args: argparse.Namespace) -> None:
    for name in ("num_prompts", "min_prompts", "sweep_max_rates", "prefill_workers"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.burstiness <= 0 or args.sweep_start <= 0 or args.sweep_factor <= 1:
        raise ConfigError("--burstiness and --sweep-start must be positive and --sweep-factor above 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ConfigError("--max-concurrency must be at least 1")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure an OpenAI-compatible server (like vllm bench serve)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=_checked_run)


def _checked_run(args: argparse.Namespace) -> int:
    _check(args)
    return run_cli(args)
