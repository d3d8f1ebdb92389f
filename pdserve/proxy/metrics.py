"""The proxy's Prometheus series (its own CollectorRegistry, so several apps in one test process never
collide).

pdserve_proxy_requests_total{endpoint,status}        counter, answered requests by HTTP status
pdserve_proxy_request_seconds{endpoint}              histogram, arrival -> last byte
pdserve_proxy_ttft_seconds                           histogram, arrival -> first token (per choice)
pdserve_proxy_inflight_requests                      gauge
pdserve_proxy_prompt_tokens_total / _cached_tokens_total / _generation_tokens_total
pdserve_proxy_routing_decisions_total{policy,mode,reason}
pdserve_proxy_retries_total{reason}                  re-sends to another node before the first token
pdserve_proxy_aborts_total{reason}                   aborts sent to nodes: client_gone, stop_string, timeout
pdserve_proxy_node_errors_total{status}              errors nodes answered with
pdserve_proxy_nodes_live{role}                       gauge, from heartbeats
pdserve_proxy_nodes_dead_total                       counter
pdserve_proxy_dropped_frames_total{reason}           malformed or unsigned frames from nodes
pdserve_proxy_index_blocks                           gauge, blocks in the (local) prefix index
pdserve_proxy_redis_up                               gauge, 1 when the Redis index is usable (absent without)
pdserve_proxy_redis_errors_total                     counter, failed Redis operations
pdserve_proxy_transfer_seconds / _exposed_transfer_seconds / _prefill_seconds    histograms, per disaggregated
                                                     request, from the nodes' timings
pdserve_proxy_node_kv_cache_usage_perc{node,role}    gauge, each live node's used / total KV blocks
pdserve_proxy_node_requests{node,role,state}         gauge, each live node's running / waiting (heartbeats)

vLLM's series (wire/vllm_metrics.py, engine="proxy") are the cluster seen as one vLLM server: request
latencies as the client sees them, tokens and finish reasons from the proxy's requests, scheduler state and
KV usage summed over the live nodes' heartbeats (so blocks returning after a disconnect show here too).
"""

from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pdserve.wire.frames import DROP_REASONS
from pdserve.wire.vllm_metrics import EngineState, VllmMetrics

# The label values the proxy counts under, each at 0 from the first scrape (a panel shows 0, not no data).
RETRY_REASONS = ("unreachable", "decode_node_lost", "prefill_node_lost")  # and node_error_<status>
ABORT_REASONS = ("client_gone", "stop_string", "timeout", "error")
NODE_ERROR_STATUSES = ("400", "429", "503", "504")

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


_TRANSFER_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class ProxyMetrics:
    def __init__(self, model_name: str = "", max_model_len: int = 2048) -> None:
        r = self.registry = CollectorRegistry()
        self.nodes: Callable[[], list] = list  # the live nodes (proxy.nodes.NodeState), set by the app
        self.prefix_queries = 0  # prompt tokens of answered requests (the cluster's prefix-cache lookups)
        self.prefix_hits = 0  # of those, found cached on the node that served them
        self.planner = None  # the planner's wish (watch_planner), if the proxy computes one
        self.vllm = VllmMetrics(r, model_name, "proxy", max_model_len, state=self._engine_state)
        self.requests = Counter(
            "pdserve_proxy_requests", "Answered requests", ["endpoint", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "pdserve_proxy_request_seconds",
            "Arrival to last byte",
            ["endpoint"],
            buckets=_SECONDS,
            registry=r,
        )
        self.ttft = Histogram(
            "pdserve_proxy_ttft_seconds", "Arrival to first token", buckets=_SECONDS, registry=r
        )
        self.inflight = Gauge("pdserve_proxy_inflight_requests", "Requests in flight", registry=r)
        self.prompt_tokens = Counter("pdserve_proxy_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter(
            "pdserve_proxy_cached_tokens", "Prompt tokens found in cache", registry=r
        )
        self.generation_tokens = Counter("pdserve_proxy_generation_tokens", "Generated tokens", registry=r)
        self.decisions = Counter(
            "pdserve_proxy_routing_decisions", "Routing decisions", ["policy", "mode", "reason"], registry=r
        )
        self.retries = Counter(
            "pdserve_proxy_retries", "Re-sends before the first token", ["reason"], registry=r
        )
        self.aborts = Counter("pdserve_proxy_aborts", "Aborts sent to nodes", ["reason"], registry=r)
        self.node_errors = Counter(
            "pdserve_proxy_node_errors", "Errors answered by nodes", ["status"], registry=r
        )
        self.nodes_live = Gauge("pdserve_proxy_nodes_live", "Live nodes", ["role"], registry=r)
        self.nodes_dead = Counter("pdserve_proxy_nodes_dead", "Nodes declared dead", registry=r)
        self.dropped_frames = Counter(
            "pdserve_proxy_dropped_frames", "Dropped frames from nodes", ["reason"], registry=r
        )
        for counter, values in (
            (self.retries, RETRY_REASONS),
            (self.aborts, ABORT_REASONS),
            (self.node_errors, NODE_ERROR_STATUSES),
            (self.dropped_frames, DROP_REASONS),
        ):
            for value in values:
                counter.labels(value)
        self.index_blocks = Gauge("pdserve_proxy_index_blocks", "Blocks in the prefix index", registry=r)
        self.transfer = Histogram(
            "pdserve_proxy_transfer_seconds",
            "KV transfer of a disaggregated request, first chunk to done",
            buckets=_TRANSFER_SECONDS,
            registry=r,
        )
        self.exposed_transfer = Histogram(
            "pdserve_proxy_exposed_transfer_seconds",
            "KV transfer left after the prefill's last layer (what the request waited for)",
            buckets=_TRANSFER_SECONDS,
            registry=r,
        )
        self.prefill = Histogram(
            "pdserve_proxy_prefill_seconds",
            "Prefill compute on the node that ran it",
            buckets=_SECONDS,
            registry=r,
        )
        r.register(_NodesCollector(lambda: self.nodes()))
        self.redis_up: Optional[Gauge] = None

    def watch_index(self, num_blocks: Callable[[], int]) -> None:
        self.index_blocks.set_function(num_blocks)

    def watch_redis(self, up: Callable[[], bool], errors: Callable[[], int]) -> None:
        self.redis_up = Gauge(
            "pdserve_proxy_redis_up", "1 when the Redis prefix index is usable", registry=self.registry
        )
        self.redis_up.set_function(lambda: 1.0 if up() else 0.0)
        self.registry.register(
            _CountCollector("pdserve_proxy_redis_errors", "Failed Redis operations", errors)
        )

    def watch_planner(self, wish, live_nodes: Callable[[], int]) -> None:
        """Export the planner's wish (proxy/planner_wish.py), computed at each scrape."""
        from pdserve.proxy.planner_wish import PlannerCollector

        self.planner = wish  # told of every answered request (proxy/serving.py)
        self.registry.register(PlannerCollector(wish, live_nodes))

    def node_timings(self, timings: dict) -> None:
        """A finished request's node timings (wire.node_messages.TIMING_KEYS)."""
        if timings.get("transfer"):
            self.transfer.observe(float(timings["transfer"]))
            self.exposed_transfer.observe(float(timings.get("exposed_transfer", 0.0)))
        if timings.get("prefill"):
            self.prefill.observe(float(timings["prefill"]))

    def _engine_state(self) -> EngineState:
        nodes = self.nodes()
        total = sum(n.total_blocks for n in nodes)
        used = sum(max(n.total_blocks - n.free_blocks, 0) for n in nodes)
        return EngineState(
            running=sum(n.num_running for n in nodes),
            waiting=sum(n.num_waiting for n in nodes),
            kv_cache_usage=used / total if total else 0.0,
            prefix_queries=self.prefix_queries,
            prefix_hits=self.prefix_hits,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CountCollector:
    """A counter whose value another object keeps (a monotonic count read at scrape time)."""

    def __init__(self, name: str, doc: str, value: Callable[[], int]):
        self.name, self.doc, self.value = name, doc, value

    def collect(self):
        yield CounterMetricFamily(self.name, self.doc, value=float(self.value()))


class _NodesCollector:
    def __init__(self, nodes: Callable[[], list]):
        self.nodes = nodes

    def collect(self):
        usage = GaugeMetricFamily(
            "pdserve_proxy_node_kv_cache_usage_perc",
            "A live node's used / total KV blocks, from its last heartbeat",
            labels=["node", "role"],
        )
        reqs = GaugeMetricFamily(
            "pdserve_proxy_node_requests",
            "A live node's requests by state, from its last heartbeat",
            labels=["node", "role", "state"],
        )
        for n in self.nodes():
            used = max(n.total_blocks - n.free_blocks, 0)
            usage.add_metric([n.node_id, n.role], used / n.total_blocks if n.total_blocks else 0.0)
            reqs.add_metric([n.node_id, n.role, "running"], n.num_running)
            reqs.add_metric([n.node_id, n.role, "waiting"], n.num_waiting)
        yield usage
        yield reqs
