"""Transfer metrics (prometheus-client) and per-request transfer timings kept for the proxy (torch-free).

Series (label `role`: producer | consumer; `transport`: tcp | cuda_ipc | nixl):
    pdserve_kv_bytes_sent_total / pdserve_kv_bytes_received_total      counters
    pdserve_kv_chunk_seconds                                           histogram, one data-plane chunk
    pdserve_kv_transfer_seconds                                        histogram, a request's first chunk to
    done
    pdserve_kv_exposed_transfer_seconds                                histogram, last layer computed to done
    pdserve_kv_achieved_gbps                                           gauge, the last request's bytes /
    transfer time
    pdserve_kv_request_bytes                                           histogram, KV bytes of one finished
    request
    pdserve_kv_inflight_transfers                                      gauge, requests between reserve and end
    pdserve_kv_links                                                   gauge, handshaken KV links now open
    pdserve_kv_failures_total{cause}                                   counter: timeout, peer_lost, abort, ...
    pdserve_kv_dropped_frames_total{reason}                            counter: truncated, version, oversized,
    ...
Each connector gets its own CollectorRegistry unless one is passed (several connectors in one test process
would otherwise collide); a node passes prometheus_client.REGISTRY, or its own, to serve them on /metrics.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.wire.frames import DROP_REASONS

_BYTES = tuple(float(1 << k) for k in range(16, 35, 2))  # 64 KiB .. 16 GiB, x4
# scheduler_side's Finished causes, each at 0 from the first scrape (a panel then shows 0, not no data)
FAILURE_CAUSES = ("timeout", "peer_lost", "abort", "remote_abort", "error")
_SECONDS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class KVMetrics:
    def __init__(
        self,
        role: str,
        transport: str,
        registry: Optional[CollectorRegistry] = None,
        keep_timings: int = 10000,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = {"role": role, "transport": transport}
        names = list(labels)
        reg = self.registry

        def make(kind, name, doc, extra=(), **kw):
            metric = kind(name, doc, names + list(extra), registry=reg, **kw)
            return metric if extra else metric.labels(**labels)

        self.bytes_sent = make(Counter, "pdserve_kv_bytes_sent", "KV bytes handed to the data plane")
        self.bytes_received = make(Counter, "pdserve_kv_bytes_received", "KV bytes received and scattered")
        self.chunk_seconds = make(
            Histogram, "pdserve_kv_chunk_seconds", "one chunk on the data plane", buckets=_SECONDS
        )
        self.transfer_seconds = make(
            Histogram,
            "pdserve_kv_transfer_seconds",
            "a request's KV transfer, first chunk to done",
            buckets=_SECONDS,
        )
        self.exposed_seconds = make(
            Histogram,
            "pdserve_kv_exposed_transfer_seconds",
            "transfer left after the prefill's last layer",
            buckets=_SECONDS,
        )
        self.request_bytes = make(
            Histogram, "pdserve_kv_request_bytes", "KV bytes moved for one finished request", buckets=_BYTES
        )
        self.gbps = make(Gauge, "pdserve_kv_achieved_gbps", "the last finished request's transfer rate, GB/s")
        self.inflight = make(Gauge, "pdserve_kv_inflight_transfers", "requests with a transfer under way")
        self.links = make(Gauge, "pdserve_kv_links", "handshaken KV links open to peers")
        self._failures = make(
            Counter, "pdserve_kv_failures", "transfers that failed, by cause", extra=("cause",)
        )
        self._drops = make(
            Counter, "pdserve_kv_dropped_frames", "malformed frames dropped, by reason", extra=("reason",)
        )
        self._labels = labels
        for cause in FAILURE_CAUSES:
            self._failures.labels(cause=cause, **labels)
        for reason in DROP_REASONS:
            self._drops.labels(reason=reason, **labels)
        self._timings: OrderedDict[str, dict] = OrderedDict()
        self._keep = keep_timings
        self._lock = threading.Lock()

    def failure(self, cause: str) -> None:
        self._failures.labels(cause=cause, **self._labels).inc()

    def dropped(self, reason: str) -> None:
        self._drops.labels(reason=reason, **self._labels).inc()

    def failures(self, cause: str) -> float:
        return (
            self.registry.get_sample_value("pdserve_kv_failures_total", {"cause": cause, **self._labels})
            or 0.0
        )

    def drops(self, reason: str) -> float:
        return (
            self.registry.get_sample_value(
                "pdserve_kv_dropped_frames_total", {"reason": reason, **self._labels}
            )
            or 0.0
        )

    def finished(self, request_id: str, ok: bool, cause: str, timings: dict, nbytes: int) -> dict:
        """Record a request's end; returns its timings with the derived figures (seconds)."""
        t = dict(timings)
        t.update(ok=ok, cause=cause, bytes=nbytes)
        start = t.get("first_send", t.get("first_chunk"))
        end = t.get("done", t.get("landed"))
        if ok and start is not None and end is not None:
            t["transfer_s"] = max(end - start, 0.0)
            self.transfer_seconds.observe(t["transfer_s"])
            if nbytes:
                self.request_bytes.observe(nbytes)
            if t["transfer_s"] > 0 and nbytes:
                self.gbps.set(nbytes / t["transfer_s"] / 1e9)
        if ok and "exposed_gpu_s" in t:  # measured on the device: last layer computed -> last copy landed
            t["exposed_s"] = t["exposed_gpu_s"]
        elif ok and end is not None and "last_layer" in t:
            t["exposed_s"] = max(end - t["last_layer"], 0.0)
        if "exposed_s" in t:
            self.exposed_seconds.observe(t["exposed_s"])
        if not ok:
            self.failure(cause or "error")
        with self._lock:
            self._timings[request_id] = t
            while len(self._timings) > self._keep:
                self._timings.popitem(last=False)
        return t

    def timings(self, request_id: str) -> Optional[dict]:
        """Wall-clock marks (time.time()) and derived seconds of a finished request, for the proxy."""
        with self._lock:
            return self._timings.get(request_id)


def now() -> float:
    return time.time()
