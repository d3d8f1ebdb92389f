"""A node's own settings (the node CLI's flags beyond the engine's): where it binds, its role, its limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pdserve.kvconnector.scheduler_side import DEFAULT_KV_TIMEOUT


@dataclass(frozen=True)
class NodeOptions:
    host: str = "127.0.0.1"
    rpc_port: int = 0
    events_port: int = 0
    http_port: int = 0
    node_id: str = ""
    role: str = "kv_both"  # kv_producer | kv_consumer | kv_both
    kv_timeout: float = DEFAULT_KV_TIMEOUT
    kv_secret: Optional[str] = None
    max_num_waiting: int = 1024  # engine queue depth beyond which generate/prefill answer 429
    served_model_names: tuple[
        str, ...
    ] = ()  # the first is `model_name` on vllm:* series (default: folder name)
    max_logprobs: int = 20  # most logprobs a request may ask for (400 above)
    shutdown_timeout: float = 30.0  # seconds a drain waits for in-flight requests before failing them
    kv_events: Optional[dict] = None  # --kv-events-config, checked: {"endpoint", "topic", "hwm"} when enabled
    warmup: bool = True  # run the served shapes once before binding RPC/HTTP (node_runtime/warmup.py)
