"""The proxy's settings: one frozen dataclass per component, defaults here, flags in proxy/cli.py."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RouterWeights:
    """Weights of the (prefill, decode) pair score (proxy/router.py: score_pair). Higher score wins.

    Every term is normalised to about [0, 1] so the weights read as "how many prompt-fractions is this worth":
    with the defaults, a prefill node holding the whole prompt beats an idle one unless the uncached tokens
    this proxy has queued on it come to more than about one prompt, or its queue holds ~4 more requests than
    the idle one's (the queue term also sees other proxies' requests, through heartbeats).
    """

    prefill_hit: float = 1.0  # fraction of the prompt cached on P (compute saved)
    prefill_backlog: float = 1.0  # this proxy's uncached tokens queued on P, in prompts (compute to wait for)
    decode_hit: float = 0.5  # fraction of the prompt D already holds (bytes not moved, blocks not reserved)
    prefill_queue: float = 0.25  # per request waiting on P
    decode_load: float = 0.05  # per request waiting or running on D
    decode_free: float = 0.5  # fraction of D's KV blocks free
    decode_full: float = 100.0  # penalty when D cannot hold the prompt's uncached blocks


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "cache_aware"  # cache_aware | round_robin
    weights: RouterWeights = field(default_factory=RouterWeights)
    # Conditional disaggregation: prefill on the decode node itself when fewer than this many prompt tokens
    # would have to be computed there (a short prompt, or one D already holds mostly). Two blocks of 16: below
    # that the transfer's fixed cost (reserve round trip, handshake) is more than the compute it saves.
    disagg_min_tokens: int = 32
    log_decisions: bool = False


@dataclass(frozen=True)
class PlannerGoals:
    """--planner-*: the profile and goals the planner's wish is computed from (proxy/planner_wish.py)."""

    profile_path: str
    ttft_ms: float = 1000.0
    itl_ms: float = 50.0
    gpus: int = 0  # 0: the live nodes times the profile's GPUs per node
    window_s: float = 60.0


@dataclass(frozen=True)
class ProxyConfig:
    model: str  # checkpoint folder (tokenizer, chat template, config.json)
    served_model_name: str = ""  # the name clients ask for; default: the folder's basename
    served_model_names: tuple[
        str, ...
    ] = ()  # every name clients may ask for (the first is served_model_name)
    max_logprobs: int = 20  # most logprobs / top_logprobs a request may ask for (400 above)
    shutdown_timeout_s: float = 30.0  # on SIGTERM: stop accepting, let open streams finish this long
    host: str = "127.0.0.1"
    port: int = 8000
    node_events: tuple[str, ...] = ()  # the nodes' events endpoints (tcp://host:port)
    redis_url: str = ""
    api_key: str = ""
    max_model_len: int = 0  # 0: from the checkpoint's config.json
    max_queue: int = 1024  # requests in flight in this proxy before 429
    max_request_bytes: int = 8 << 20  # a larger body is a 413 before it is read whole
    max_seqs_per_request: int = 256  # prompts x n in one request (400 above)
    max_seqs_per_key: int = 2048  # concurrent sequences of one API key (429 above)
    request_timeout_s: float = 600.0  # whole request budget; the nodes get it as deadline_s
    first_message_timeout_s: float = 0.0  # 0: request_timeout_s
    max_retries: int = 2  # re-sends to another prefill node after a retryable error before the first token
    heartbeat_misses: int = 3  # a node silent for this many heartbeat intervals is dead
    kv_secret: str = ""
    proxy_id: str = ""  # DEALER identity; default: proxy-<pid>-<random>
    chat_template: str = ""  # --chat-template: a file or the template itself; "" = the checkpoint's
    generation_config: str = "auto"  # --generation-config: auto | vllm | a folder (vLLM's meanings)
    router: RouterConfig = field(default_factory=RouterConfig)
    planner: PlannerGoals | None = None  # export the planner's wish (pdserve:desired_*_nodes)
