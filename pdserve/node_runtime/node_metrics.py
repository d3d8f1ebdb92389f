"""The node's Prometheus series (its own registry, so several nodes can live in one test process).

Gauges are read at scrape time from the engine loop's latest snapshot (one consistent view, so
free + used + cached == total holds in every scrape):
    pdserve_node_requests_waiting / _running            the engine scheduler's queues
    pdserve_node_requests_pending_kv                    decode: reserved, waiting for the prefill node's KV
    pdserve_node_requests_prefilling                    prefill: prefilling or transferring for a decode node
    pdserve_node_kv_blocks_free / _used / _cached / _total
    pdserve_node_kv_cache_usage                         used / total
Counters:
    pdserve_node_requests_finished_total{finish_reason}  stop | length | abort
    pdserve_node_requests_aborted_total{cause}           client | client_gone | deadline | kv | prefill_failed
                                                         | error
    pdserve_node_requests_rejected_total{status}         400 | 429 | 503
    pdserve_node_dropped_frames_total{reason}            truncated | version | oversized | hmac | schema |
                                                         garbage
    pdserve_node_preemptions_total, pdserve_node_prefix_cache_queried_tokens_total / _hit_tokens_total
The KV connector's own series (kvconnector.metrics) are appended to /metrics from its registry.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pdserve.wire.frames import DROP_REASONS

# The label values the node counts under, each at 0 from the first scrape (a panel then shows 0, not no data).
ABORT_CAUSES = ("client", "client_gone", "deadline", "error", "rejected", "shutdown", "decode_node")
REJECT_STATUSES = ("400", "429", "503")


class NodeMetrics:
    def __init__(self, snapshot: Callable[[], object], extra_gauges: Callable[[], dict] = dict):
        self.registry = CollectorRegistry()
        self.extra_registries: list[CollectorRegistry] = []
        reg = self.registry
        self.finished = Counter(
            "pdserve_node_requests_finished",
            "requests that ended, by finish reason",
            ["finish_reason"],
            registry=reg,
        )
        self.aborted = Counter(
            "pdserve_node_requests_aborted", "requests ended early, by cause", ["cause"], registry=reg
        )
        self.rejected = Counter(
            "pdserve_node_requests_rejected", "requests refused, by status", ["status"], registry=reg
        )
        self.dropped = Counter(
            "pdserve_node_dropped_frames", "malformed or unsigned frames dropped", ["reason"], registry=reg
        )
        for counter, values in (
            (self.aborted, ABORT_CAUSES),
            (self.rejected, REJECT_STATUSES),
            (self.dropped, DROP_REASONS + ("unexpected",)),
        ):
            for value in values:
                counter.labels(value)
        reg.register(_SnapshotCollector(snapshot, extra_gauges))

    def render(self) -> bytes:
        return b"".join(generate_latest(r) for r in [self.registry, *self.extra_registries])


class _SnapshotCollector:
    def __init__(self, snapshot, extra_gauges):
        self.snapshot, self.extra_gauges = snapshot, extra_gauges

    def collect(self) -> Iterable:
        s = self.snapshot()
        gauges = {
            "pdserve_node_requests_waiting": ("requests waiting in the engine scheduler", s.num_waiting),
            "pdserve_node_requests_running": ("requests in the running batch", s.num_running),
            "pdserve_node_kv_blocks_free": ("KV blocks holding nothing", s.num_free_blocks),
            "pdserve_node_kv_blocks_used": ("KV blocks held by requests", s.num_used_blocks),
            "pdserve_node_kv_blocks_cached": ("KV blocks kept only as prefix hits", s.num_cached_blocks),
            "pdserve_node_kv_blocks_total": ("KV blocks in the cache", s.num_total_blocks),
            "pdserve_node_kv_cache_usage": (
                "used / total KV blocks",
                s.num_used_blocks / s.num_total_blocks if s.num_total_blocks else 0.0,
            ),
        }
        for name, (doc, value) in {**gauges, **self.extra_gauges()}.items():
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (
            ("pdserve_node_preemptions", "requests preempted by recompute", s.num_preemptions),
            ("pdserve_node_prefix_cache_queried_tokens", "prompt tokens looked up", s.prefix_queried_tokens),
            ("pdserve_node_prefix_cache_hit_tokens", "prompt tokens found cached", s.prefix_hit_tokens),
        ):
            yield CounterMetricFamily(name, doc, value=value)
