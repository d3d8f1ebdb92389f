"""vLLM's Prometheus series with vLLM's names, labels, meanings and buckets (torch-free: the proxy uses it).

Every series carries `model_name` (the first --served-model-name) and `engine` (vLLM's engine index; a
node is engine "0", as a one-engine vLLM server is; the proxy's aggregate view is engine "proxy", so a query
can tell them apart). Two views serve these names:
    a node's /metrics     what its engine did: scheduler state, KV usage, prefix cache, preemptions, and
                          the requests a proxy sent it (a decode node's; a prefill node serves none itself)
    the proxy's /metrics  what one vLLM server would show for the whole cluster: request latencies
                          measured where the client sees them, tokens, finish reasons, and scheduler and
                          KV state summed over the live nodes' heartbeats
Scrape one view per dashboard (or keep them apart by `job`/`engine`): summing both counts every request twice.

State (read at scrape time from `state()`):
    vllm:num_requests_running / vllm:num_requests_waiting / vllm:kv_cache_usage_perc    gauges
    vllm:prefix_cache_queries_total / vllm:prefix_cache_hits_total (tokens) / vllm:num_preemptions_total
Per request (observed by the owner when a request ends; ITL per output token as tokens arrive):
    vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
    vllm:request_time_per_output_token_seconds,
    vllm:e2e_request_latency_seconds, vllm:request_queue_time_seconds, vllm:request_inference_time_seconds,
    vllm:request_prefill_time_seconds, vllm:request_decode_time_seconds            histograms (seconds)
    vllm:request_prompt_tokens, vllm:request_generation_tokens, vllm:request_max_num_generation_tokens,
    vllm:request_params_max_tokens, vllm:request_params_n                          histograms (counts)
    vllm:request_success_total{finished_reason}, vllm:prompt_tokens_total, vllm:generation_tokens_total
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LABELS = ("model_name", "engine")
FINISH_REASONS = ("stop", "length", "abort")

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)  # fmt: skip


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets, bounded by max_model_len)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out) or (1,)
            out.append(m * scale)
        scale *= 10


@dataclass
class EngineState:
    """What the state series show at one scrape."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # used / total blocks, 0..1 (cached-only blocks count as free, as in vLLM)
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of those, found cached
    preemptions: int = 0


@dataclass
class FinishedRequest:
    """One request's (one choice's) life, for the per-request histograms. Times are seconds on one clock."""

    arrival: float
    finished: float
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    scheduled: Optional[float] = None  # first scheduled (end of queueing); None: arrival
    first_token: Optional[float] = None  # None: no token came
    max_tokens: Optional[int] = None


class VllmMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        model_name: str,
        engine: str,
        max_model_len: int,
        state: Optional[Callable[[], EngineState]] = None,
    ):
        self.labels = {"model_name": model_name, "engine": engine}
        r, lab = registry, list(LABELS)
        count_buckets = buckets_1_2_5(max(int(max_model_len), 1))

        def hist(name, doc, buckets):
            return Histogram(name, doc, lab, buckets=buckets, registry=r).labels(**self.labels)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist(
            "vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", TOKEN_LATENCY_BUCKETS
        )
        self.tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Per request: (e2e latency - TTFT) / (output tokens - 1); 0 with at most one output token.",
            TOKEN_LATENCY_BUCKETS,
        )
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds", "E2E request latency in seconds.", REQUEST_LATENCY_BUCKETS
        )
        self.queue = hist(
            "vllm:request_queue_time_seconds",
            "Time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.inference = hist(
            "vllm:request_inference_time_seconds",
            "Time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prefill = hist(
            "vllm:request_prefill_time_seconds",
            "Time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.decode = hist(
            "vllm:request_decode_time_seconds",
            "Time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prompt_len = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", count_buckets
        )
        self.generation_len = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", count_buckets
        )
        self.max_generation = hist(
            "vllm:request_max_num_generation_tokens",
            "Maximum number of generation tokens in a request's sequences (its choices).",
            count_buckets,
        )
        self.max_tokens_param = hist(
            "vllm:request_params_max_tokens", "The max_tokens request parameter.", count_buckets
        )
        self.n_param = hist("vllm:request_params_n", "The n request parameter.", (1, 2, 5, 10, 20))
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", lab, registry=r
        ).labels(**self.labels)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", lab, registry=r
        ).labels(**self.labels)
        self._success = Counter(
            "vllm:request_success", "Count of finished requests.", [*lab, "finished_reason"], registry=r
        )
        for reason in FINISH_REASONS:  # present from the first scrape, as in vLLM
            self._success.labels(finished_reason=reason, **self.labels)
        if state is not None:
            r.register(_StateCollector(state, self.labels))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(max(seconds, 0.0))

    def tokens_arrived(self, gap_s: float, num_tokens: int) -> None:
        """num_tokens more output tokens after a gap: one ITL observation per token (the gap shared out)."""
        if num_tokens > 0:
            self.generation_tokens.inc(num_tokens)
            each = max(gap_s, 0.0) / num_tokens
            for _ in range(num_tokens):
                self.itl.observe(each)

    def finished(self, req: FinishedRequest) -> None:
        reason = req.finish_reason if req.finish_reason in FINISH_REASONS else "abort"
        self._success.labels(finished_reason=reason, **self.labels).inc()
        scheduled = req.arrival if req.scheduled is None else max(req.scheduled, req.arrival)
        end = max(req.finished, scheduled)
        self.e2e.observe(max(end - req.arrival, 0.0))
        self.queue.observe(scheduled - req.arrival)
        self.inference.observe(end - scheduled)
        first = req.first_token
        self.prefill.observe(max((first if first is not None else end) - scheduled, 0.0))
        self.decode.observe(max(end - first, 0.0) if first is not None else 0.0)
        tpot = (
            (end - first) / (req.generation_tokens - 1)
            if first is not None and req.generation_tokens > 1
            else 0.0
        )
        self.tpot.observe(max(tpot, 0.0))
        self.prompt_len.observe(req.prompt_tokens)
        self.generation_len.observe(req.generation_tokens)
        if req.max_tokens:
            self.max_tokens_param.observe(req.max_tokens)

    def request_group(self, n: int, max_generation_tokens: int) -> None:
        """Once per client request: its n and the longest of its choices."""
        self.n_param.observe(n)
        self.max_generation.observe(max_generation_tokens)


class _StateCollector:
    def __init__(self, state: Callable[[], EngineState], labels: dict):
        self.state, self.labels = state, labels

    def collect(self) -> Iterable:
        s = self.state()
        names, values = list(self.labels), list(self.labels.values())
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", s.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            yield g
        for name, doc, value in (
            (
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                s.prefix_queries,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                s.prefix_hits,
            ),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", s.preemptions),
        ):
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            yield c
