"""What the producer and consumer sides share: config, handshake, links, the reaper (timeouts and heartbeats).

A node builds `ConnectorConfig` from its engine config and `--kv-transfer-config` (`from_kv_transfer`), then a
`KVProducer` (prefill node) or `KVConsumer` (decode node); see those modules for the calls. Control messages
go over signed TCP links; `kv_connector` picks the one-sided data plane (tcp | cuda_ipc,
kvconnector.transport). Heartbeats: each side sends one on a link idle for `heartbeat` seconds (timeout / 3,
at most 1 s) and closes a link silent for `timeout`, which aborts that peer's requests; so a frozen peer is
caught like a dead one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from pdserve.kvconnector.head_layout import HeadLayout
from pdserve.kvconnector.metrics import KVMetrics
from pdserve.kvconnector.scheduler_side import DEFAULT_KV_TIMEOUT, Finished
from pdserve.kvconnector.transport import DataPlaneConfig, create_data_plane, dtype_name
from pdserve.wire.frames import DEFAULT_MAX_BODY, Abort, Handshake, Heartbeat, SignedCodec, resolve_secret
from pdserve.wire.hashing import HASH_ALGORITHM

log = logging.getLogger(__name__)

OnComplete = Callable[[str, bool, dict], None]  # (request_id, ok, timings incl. "cause"), exactly once


@dataclass(frozen=True)
class ConnectorConfig:
    model: str
    dtype: str  # torch dtype name: bfloat16 | float16 | float32
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_connector: str = "tcp"
    layer_windows: tuple[int, ...] = ()  # per layer: 0 full attention, else its sliding window (ships less)
    kv_ip: str = "127.0.0.1"
    kv_port: int = 0  # consumer: listen port (0: ephemeral)
    secret: Optional[str] = None  # --kv-secret, else $PDSERVE_KV_SECRET, else the dev secret
    timeout: float = DEFAULT_KV_TIMEOUT  # --kv-timeout: seconds without progress before a request is aborted
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    hash_algorithm: str = HASH_ALGORITHM
    max_body: int = DEFAULT_MAX_BODY
    extra: dict = field(default_factory=dict)

    @property
    def heartbeat(self) -> float:
        return min(1.0, self.timeout / 3)

    @classmethod
    def from_kv_transfer(
        cls,
        kvt,
        *,
        model: str,
        dtype: torch.dtype | str,
        block_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        layer_windows: tuple[int, ...] = (),
        secret: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> "ConnectorConfig":
        """From engine.config.KVTransferConfig; kv_secret / kv_timeout may also sit in its extra."""
        extra = dict(kvt.extra)
        return cls(
            model=model,
            dtype=dtype if isinstance(dtype, str) else dtype_name(dtype),
            block_size=block_size,
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            layer_windows=tuple(layer_windows),
            kv_connector=kvt.kv_connector,
            kv_ip=kvt.kv_ip,
            kv_port=kvt.kv_port,
            secret=secret if secret is not None else extra.pop("kv_secret", None),
            timeout=float(timeout if timeout is not None else extra.pop("kv_timeout", DEFAULT_KV_TIMEOUT)),
            extra=extra,
        )


class KVConnectorBase:
    """Base of KVProducer / KVConsumer: codec, data plane, our handshake, metrics, reaper thread."""

    role = "kv_both"

    def __init__(self, config: ConnectorConfig, kv_caches, on_complete: Optional[OnComplete], registry=None):
        """kv_caches: one rank's caches (engine/kv_cache.py's tensor, or a list of layers), or a HeadLayout of
        a tensor-parallel node's ranks."""
        self.config = config
        self.layout = HeadLayout.of(kv_caches, config.num_kv_heads)
        self.caches = self.layout.layers
        self._check_caches()
        self.on_complete = on_complete
        self.codec = SignedCodec(resolve_secret(config.secret, config.kv_ip), max_body=config.max_body)
        self.device = self.caches[0].device
        c = self.caches[0]
        # K and V of one block, one layer, every head
        self.block_bytes = c.shape[0] * c.shape[2] * config.num_kv_heads * c.shape[4] * c.element_size()
        self.data_plane = create_data_plane(
            config.kv_connector, DataPlaneConfig(config.kv_ip, str(self.device), config.extra), self.layout
        )
        self.metrics = KVMetrics(
            "producer" if self.role == "kv_producer" else "consumer", config.kv_connector, registry
        )
        self.metrics.links.set_function(self._open_links)
        self.handshake = Handshake(
            engine_id=config.engine_id,
            role=self.role,
            model=config.model,
            dtype=config.dtype,
            block_size=config.block_size,
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            hash_algorithm=config.hash_algorithm,
            transport=config.kv_connector,
            layer_windows=list(config.layer_windows or (0,) * config.num_layers),
            device_uuid=_device_uuid(self.device),
        )  # the consumer adds its data plane's export
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name=f"kv-reaper-{self.role}", daemon=True)

    def _check_caches(self) -> None:
        cfg = self.config
        if self.layout.num_kv_heads != cfg.num_kv_heads:
            raise ValueError(
                f"KV caches hold {self.layout.num_kv_heads} heads, the config says {cfg.num_kv_heads}"
            )
        for rank in self.layout.ranks:
            c = rank.layers
            want = (2, cfg.block_size, rank.num_heads, cfg.head_dim)
            got = (c[0].shape[0], *c[0].shape[2:]) if c else ()
            if len(c) != cfg.num_layers or tuple(got) != want or dtype_name(c[0].dtype) != cfg.dtype:
                raise ValueError(
                    f"KV caches ({len(c)} layers of {[tuple(c[0].shape)] if c else []} "
                    f"{c[0].dtype if c else ''}) do not match the config ({cfg.num_layers} layers, "
                    f"per block {want}, {cfg.dtype})"
                )

    def check_peer(self, theirs: Handshake) -> str:
        """'' when we can work with this peer, else why not (layout differences, transport refusal)."""
        diff = self.handshake.layout_mismatch(theirs)
        if diff:
            return f"KV layout mismatch with peer {theirs.engine_id}: {diff}"
        return self.data_plane.check_peer(self.handshake, theirs)

    def _open_links(self) -> int:
        """Handshaken links now open (read at each scrape, from the HTTP thread)."""
        try:
            return sum(1 for link in self.links() if link.peer is not None and not link.closed)
        except RuntimeError:  # the link table changed under the copy; the next scrape reads it again
            return 0

    def links(self) -> Sequence:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ reaper

    def _reap_loop(self) -> None:
        tick = min(0.05, self.config.timeout / 20)
        while not self._closed.wait(tick):
            try:
                self._reap_once()
            except Exception:
                log.exception("KV reaper failed")

    def _reap_once(self) -> None:
        for f in self.scheduler.expire():
            self._end_failed(f)
        now = time.monotonic()
        for link in list(self.links()):
            if link.closed or link.peer is None:
                continue
            if now - link.last_rx > self.config.timeout:
                link.close(f"peer silent for {now - link.last_rx:.1f}s")
            elif now - link.last_tx > self.config.heartbeat:
                try:
                    link.send(Heartbeat(engine_id=self.config.engine_id, ts=time.time()), blocking=False)
                except ConnectionError:
                    pass

    def _send_abort(self, f: Finished) -> None:
        link = f.peer
        if link is not None and not link.closed:
            try:
                link.send(Abort(request_id=f.request_id, reason=f"{f.cause}: {f.detail}"))
            except ConnectionError:
                pass

    def _end_failed(self, f: Finished) -> None:
        raise NotImplementedError

    def _on_drop(self, link, reason: str) -> None:
        self.metrics.dropped(reason)

    def _notify(self, f: Finished, nbytes: int) -> None:
        self.metrics.inflight.dec()
        timings = self.metrics.finished(f.request_id, f.ok, f.cause, f.timings, nbytes)
        if not f.ok:
            log.warning("KV transfer of %s failed (%s): %s", f.request_id, f.cause, f.detail)
        if self.on_complete is not None:
            try:
                self.on_complete(f.request_id, f.ok, timings)
            except Exception:
                log.exception("on_complete(%s) failed", f.request_id)

    def timings(self, request_id: str) -> Optional[dict]:
        """A finished request's transfer timings (wall-clock marks and transfer_s / exposed_s), for the
        proxy."""
        return self.metrics.timings(request_id)

    def abort(self, request_id: str, reason: str = "abort") -> bool:
        """Abort at any point. False when the request is unknown or already finished."""
        f = self.scheduler.abort(request_id, "abort", reason)
        if f is None:
            return False
        self._end_failed(f)
        return True

    def close(self) -> None:
        self._closed.set()
        for rid in self.scheduler.active():
            self.abort(rid, "connector closed")
        for link in list(self.links()):
            link.close("connector closed")
        self.data_plane.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _device_uuid(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    try:
        return str(torch.cuda.get_device_properties(device).uuid)
    except Exception:
        return f"cuda:{device.index}@{os.uname().nodename}"
