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
pdserve_proxy_redis_errors_total                     counter (a gauge function over the index's count)
"""

from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ProxyMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
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
        self.index_blocks = Gauge("pdserve_proxy_index_blocks", "Blocks in the prefix index", registry=r)
        self.redis_up: Optional[Gauge] = None
        self.redis_errors: Optional[Gauge] = None

    def watch_index(self, num_blocks: Callable[[], int]) -> None:
        self.index_blocks.set_function(num_blocks)

    def watch_redis(self, up: Callable[[], bool], errors: Callable[[], int]) -> None:
        self.redis_up = Gauge(
            "pdserve_proxy_redis_up", "1 when the Redis prefix index is usable", registry=self.registry
        )
        self.redis_up.set_function(lambda: 1.0 if up() else 0.0)
        self.redis_errors = Gauge(
            "pdserve_proxy_redis_errors_total", "Failed Redis operations", registry=self.registry
        )
        self.redis_errors.set_function(lambda: float(errors()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
