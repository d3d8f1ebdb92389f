"""Serving benchmark of pdserve configurations: starts `pdserve up` in each configuration on the devices it
sees, runs the same `pdserve bench` workload against each, writes
bench/results/serving-<device>-<date>.{json,md,png}.

Sections (--sections; the default follows the GPU count):
- pd: disaggregated against colocated on the same GPUs: 1P1D vs 0P2D on two GPUs; on four, 1P3D, 2P2D and 3P1D
  vs 0P4D. Random 2048-in / 128-out, a rate sweep (--rates, default doubling from --sweep-start) that stops
  once both SLOs broke: loose (TTFT 1 s, TPOT 50 ms) and token pacing (TTFT 1 s, each request's p99 ITL 25
  ms).
- routing: cache_aware vs round_robin on two colocated replicas, the prefix workload sized so its working set
  is above one node's KV cache and within two (--num-gpu-blocks-override on the nodes); the hit fraction's
  ceiling is the LRU oracle of that very trace (bench/prefix_oracle.py), with the never-evicting upper bound
  beside it.
- shared: on one GPU, 1P1D sharing it vs one colocated node.
- tp: on two GPUs, one colocated node with tensor parallelism 2 (--decode-tp 2) vs two TP 1 replicas (0P2D);
  on four, 1P1D with prefill TP 2 and decode TP 2 vs 2P2D. Two GPUs per node halve the weights each reads per
  decode step at the cost of two all-reduces per layer.
Each configuration's first rate is preceded by warm-up requests. A record of a non-baseline run carries the
baseline's figure from the same run. --time-budget stops starting new rates once spent (results so far are
kept).

GPU (two H100s; writes the random-weight llama-3.1-8b into models/ first if --model is not given, ~1 min):
    .venv/bin/python bench/serving.py
Each configuration's `pdserve up` loads the model (and captures CUDA graphs) before it measures anything, so
if one call's budget is too short for all sections, run them in separate calls on the same day: the records
merge into the same file and the report and plot are redrawn from all of them:
    .venv/bin/python bench/serving.py --sections pd ; .venv/bin/python bench/serving.py --sections routing
On four GPUs the pd section alone is four configurations: run `--sections pd` in a call of its own.
A configuration that fails to start is logged with its traceback and the others still run (exit status 1).
CPU smoke (tiny model):
    python bench/serving.py --input-len 64 --output-len 8 --duration-per-rate 3 --rates 2,4 --routing-rate 4 \
        --routing-prefix-len 64 --routing-unique-len 16 --routing-groups 4 --out /tmp/serving
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO_ROOT  # noqa: E402
from bench.prefix_oracle import lru_oracle_hit_fraction, upper_bound_hit_fraction  # noqa: E402
from bench.serving_cluster import LocalCluster  # noqa: E402
from bench.serving_summary import link_baselines, markdown_report  # noqa: E402
from pdserve.benchmarks.results import Results, log  # noqa: E402
from pdserve.benchmarks.serving_cli import BenchRun, add_arguments  # noqa: E402
from pdserve.launch.gpus import visible_gpus  # noqa: E402

SLOS = {"loose": {"ttft": 1.0, "tpot": 0.050}, "pacing": {"ttft": 1.0, "itl": 0.025}}
SLO_TEXT = {
    "loose": "TTFT <= 1 s and TPOT <= 50 ms",
    "pacing": "TTFT <= 1 s and each request's p99 ITL <= 25 ms",
}
BLOCK_SIZE = 16
CONFIGS_PER_SECTION = {"pd": 2, "routing": 2, "shared": 2, "tp": 2}  # pd: 4 on four GPUs


@dataclass
class Config:
    run: str
    prefill: int
    decode: int
    extra: tuple = ()

    @property
    def prefill_workers(self) -> int:
        return self.prefill or self.decode


def gpu_slug(gpus: list[str]) -> tuple[str, str]:
    """('h100', 'NVIDIA H100 80GB HBM3 x2') from nvidia-smi, without torch; ('cpu', ...) with no GPU."""
    if not gpus:
        return "cpu", f"cpu ({os.cpu_count()} cores)"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.splitlines()
        name = out[int(gpus[0])].strip() if out else "cuda"
    except (OSError, subprocess.TimeoutExpired, IndexError, ValueError):
        name = "cuda"
    slug = next(
        (t for t in name.lower().replace("-", " ").split() if t[:1] in "habvl" and t[1:].isdigit()), "cuda"
    )
    return slug, f"{name} x{len(gpus)}"


def ensure_model(opts, gpus: list[str]) -> str:
    if opts.model:
        return opts.model
    preset = "llama-3.1-8b" if gpus else "tiny"
    path = os.path.join(REPO_ROOT, "models", "llama-3.1-8b-random" if gpus else "tiny-llama")
    if not os.path.exists(os.path.join(path, "config.json")):
        log(f"writing the random-weight {preset} checkpoint to {os.path.relpath(path, REPO_ROOT)}")
        subprocess.run(
            [sys.executable, "-m", "pdserve", "make-model", path, "--family", "llama", "--preset", preset],
            check=True,
            cwd=REPO_ROOT,
        )
    return path


def bench_args(opts, url: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    common = [
        "--base-url",
        url,
        "--duration",
        str(opts.duration_per_rate),
        "--num-warmups",
        str(opts.warmups),
        "--seed",
        str(opts.seed),
        "--min-prompts",
        str(opts.min_prompts),
        "--request-timeout",
        str(opts.request_timeout),
        "--drain-timeout",
        str(opts.drain_timeout or max(10.0, opts.duration_per_rate)),
    ]
    if opts.disable_tqdm:
        common.append("--disable-tqdm")
    return parser.parse_args(common + argv)


class Runner:
    """Runs configurations one after another, all into one results file."""

    def __init__(self, opts, model: str, gpus: list[str], results: Results, started: float):
        self.opts, self.model, self.gpus, self.results = opts, model, gpus, results
        self.deadline = started + opts.time_budget  # from the script's start: writing the model counts too
        self.configs_left = 0  # set before the sections run: each configuration gets its share of the budget
        self.failures: list[str] = []

    def up_flags(self, cfg: Config) -> tuple:
        flags = ["--block-size", str(BLOCK_SIZE)]
        if self.opts.max_model_len:
            flags += ["--max-model-len", str(self.opts.max_model_len)]
        return (*flags, *cfg.extra)

    def run_config(
        self,
        cfg: Config,
        comparison: str,
        baseline: str,
        workload: list[str],
        slos: dict,
        env: dict | None = None,
    ) -> BenchRun | None:
        if time.monotonic() > self.deadline:
            log(f"time budget spent: {cfg.run} ({comparison}) skipped")
            self.failures.append(f"{comparison} {cfg.run}: skipped, time budget spent")
            return None
        # An equal share of what is left, so a sweep that runs long cannot starve the baseline after it.
        share_ends = time.monotonic() + (self.deadline - time.monotonic()) / max(self.configs_left, 1)
        self.configs_left -= 1
        work = os.path.join(self.opts.work_dir, f"{comparison}-{cfg.run}")
        # Not bench.common.guarded: its CUDA clean-up would open a CUDA context here, on a GPU the nodes use.
        try:
            # A cluster still loading when the whole budget is spent would measure nothing: give up on it
            # then.
            startup_s = max(120.0, self.deadline - time.monotonic())
            with LocalCluster(
                work, self.model, cfg.prefill, cfg.decode, self.up_flags(cfg), startup_s, env=env
            ) as cluster:
                args = bench_args(
                    self.opts, cluster.url, workload + ["--prefill-workers", str(cfg.prefill_workers)]
                )
                extra = {"comparison": comparison, "baseline_run": baseline}
                bench = BenchRun(args, cfg.run, slos, self.results, extra_params=extra)
                bench.deadline = share_ends
                bench.run()
            return bench
        except Exception as exc:  # noqa: BLE001 - one configuration's failure must not lose the others
            self.failures.append(f"{comparison} {cfg.run}: {exc!r}")
            log(f"!!! {comparison} {cfg.run} FAILED:\n{traceback.format_exc()}")
            return None

    def pd(self) -> None:
        n = 4 if len(self.gpus) >= 4 else 2
        configs = (
            [Config("1P1D", 1, 1), Config("0P2D", 0, 2)]
            if n == 2
            else [Config("1P3D", 1, 3), Config("2P2D", 2, 2), Config("3P1D", 3, 1), Config("0P4D", 0, 4)]
        )
        baseline = configs[-1].run
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(self.gpus[:n])) if self.gpus else None
        for cfg in configs:
            self.run_config(cfg, f"pd-{n}gpu", baseline, self.random_workload(), SLOS, env)

    def shared(self) -> None:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=self.gpus[0]) if self.gpus else None
        for cfg in (Config("1P1D-shared", 1, 1), Config("0P1D", 0, 1)):
            self.run_config(cfg, "shared-1gpu", "0P1D", self.random_workload(), SLOS, env)

    def tp(self) -> None:
        n = 4 if len(self.gpus) >= 4 else 2
        tp2 = ("--prefill-tp", "2", "--decode-tp", "2")
        configs = (
            [Config("0P1D-tp2", 0, 1, tp2), Config("0P2D", 0, 2)]
            if n == 2
            else [Config("1P1D-tp2", 1, 1, tp2), Config("2P2D", 2, 2)]
        )
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(self.gpus[:n])) if self.gpus else None
        for cfg in configs:
            self.run_config(cfg, f"tp-{n}gpu", configs[-1].run, self.random_workload(), SLOS, env)

    def random_workload(self) -> list[str]:
        o = self.opts
        rates = (
            ["--request-rate", o.rates]
            if o.rates != "sweep"
            else [
                "--request-rate",
                "sweep",
                "--sweep-start",
                str(o.sweep_start),
                "--sweep-max-rates",
                str(o.sweep_max_rates),
            ]
        )
        return [
            "--dataset-name",
            "random",
            "--input-len",
            str(o.input_len),
            "--output-len",
            str(o.output_len),
            *rates,
        ]

    def routing(self) -> None:
        o = self.opts
        working_set = o.routing_groups * math.ceil(o.routing_prefix_len / BLOCK_SIZE)
        per_node = max(
            math.ceil(working_set * 0.7),
            math.ceil((o.routing_prefix_len + o.routing_unique_len + o.output_len) / BLOCK_SIZE) + 2,
        )
        log(
            f"routing: working set {working_set} blocks; {per_node} blocks per node (two nodes: "
            f"{2 * per_node})"
        )
        workload = [
            "--dataset-name",
            "prefix",
            "--prefix-groups",
            str(o.routing_groups),
            "--prefix-len",
            str(o.routing_prefix_len),
            "--input-len",
            str(o.routing_unique_len),
            "--output-len",
            str(o.output_len),
            "--request-rate",
            str(o.routing_rate),
        ]
        node_flag = f"--node-arg=--num-gpu-blocks-override={per_node}"
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(self.gpus[:2])) if self.gpus else None
        for policy in ("cache_aware", "round_robin"):
            cfg = Config(policy, 0, 2, (node_flag, "--routing", policy))
            bench = self.run_config(cfg, "routing", "round_robin", workload, SLOS, env)
            if bench is not None and policy == "cache_aware":
                self.oracle(bench, per_node)

    def oracle(self, bench: BenchRun, per_node: int) -> None:
        """The hit fraction's ceiling: the LRU oracle on the very trace each rate sent."""
        for index, (rate, _) in enumerate(bench.figures):
            prompts = [r.prompt_ids for r in bench.workload(rate, index)]
            lru = lru_oracle_hit_fraction(prompts, BLOCK_SIZE, 2, per_node)
            upper = upper_bound_hit_fraction(prompts, BLOCK_SIZE)
            params = {**bench.params(rate), "blocks_per_node": per_node}
            self.results.add("prefix_hit_oracle_lru", lru, "fraction", params=params)
            self.results.add("prefix_hit_upper_bound", upper, "fraction", params=params)
            for rec in self.results.records:
                p = rec["params"]
                if (
                    rec["metric"] == "prefix_hit_fraction"
                    and p.get("comparison") == "routing"
                    and p.get("request_rate") == params["request_rate"]
                ):
                    rec["ceiling"], rec["ratio"] = lru, (rec["value"] / lru if lru else None)
            self.results.save()


def default_sections(gpus: list[str]) -> str:
    if len(gpus) == 1:
        return "shared"
    return "pd,routing" if gpus else "pd,routing,shared"


def parse_options(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="", help="pd,routing,shared,tp (default: what the GPUs seen allow)")
    p.add_argument("--model", default="", help="checkpoint folder (default: write a random-weight one)")
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rates", default="sweep", help="rate list (1,2,4) or sweep")
    p.add_argument("--sweep-start", type=float, default=1.0)
    p.add_argument("--sweep-max-rates", type=int, default=5)
    p.add_argument("--duration-per-rate", type=float, default=12.0, help="seconds of arrivals per rate")
    p.add_argument("--min-prompts", type=int, default=8)
    p.add_argument("--warmups", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=0.0,
        help="seconds a rate waits for its last requests "
        "after the last arrival (default: the larger of 10 s and --duration-per-rate)",
    )
    p.add_argument("--routing-rate", type=float, default=4.0)
    p.add_argument("--routing-groups", type=int, default=16)
    p.add_argument("--routing-prefix-len", type=int, default=1024)
    p.add_argument("--routing-unique-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=-1, help="default: 4096 on GPU, the model's on CPU")
    p.add_argument(
        "--time-budget",
        type=float,
        default=450.0,
        help="seconds from the start; no new rate or "
        "configuration starts after it (a started one still takes up to two durations and a shutdown)",
    )
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"))
    p.add_argument("--work-dir", default="", help="cluster logs (default: a folder under --out's parent tmp)")
    p.add_argument("--disable-tqdm", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    started = time.monotonic()
    opts = parse_options(argv)
    gpus = visible_gpus()
    sections = [s.strip() for s in (opts.sections or default_sections(gpus)).split(",") if s.strip()]
    unknown = set(sections) - set(CONFIGS_PER_SECTION)
    if unknown:
        raise SystemExit(f"--sections: unknown {', '.join(sorted(unknown))} (pd, routing, shared, tp)")
    if opts.max_model_len < 0:
        opts.max_model_len = 4096 if gpus else 0
    if not opts.work_dir:
        import tempfile

        opts.work_dir = tempfile.mkdtemp(prefix="pdserve-serving-bench-")
    slug, description = gpu_slug(gpus)
    log(f"devices: {description}; sections {','.join(sections)}; cluster logs in {opts.work_dir}")
    model = ensure_model(opts, gpus)
    results = Results("serving", opts.out, slug=slug, description=description, link=link_baselines)
    runner = Runner(opts, model, gpus, results, started)
    runner.configs_left = sum(
        CONFIGS_PER_SECTION[s] if s != "pd" else (4 if len(gpus) >= 4 else 2) for s in sections
    )
    try:
        for section in sections:
            getattr(runner, section)()
    finally:
        write_outputs(results)
    for failure in runner.failures:
        log(f"NOT MEASURED: {failure}")
    return 1 if runner.failures else 0


def write_outputs(results: Results) -> None:
    import json

    from pdserve.benchmarks.serving_plots import plot_serving

    results.save()
    with open(results.path, encoding="utf-8") as f:
        doc = json.load(f)
    md = os.path.splitext(results.path)[0] + ".md"
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown_report(doc, SLO_TEXT))
    log(f"report: {md}")
    plot_serving(results.path, os.path.splitext(results.path)[0] + ".png")


if __name__ == "__main__":
    sys.exit(main())
