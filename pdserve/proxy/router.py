"""Which (prefill, decode) pair serves a request, and whether to disaggregate at all.

`score_pair` is the whole policy for cache_aware routing: one pure function of a pair's terms and the weights
in RouterConfig. `Router.decide` builds the terms of every live pair from the prefix index's matches and the
nodes' loads, applies conditional disaggregation, and returns a `Decision` that can be logged with its terms.

Conditional disaggregation: the prompt is prefilled on the decode node itself ("colocated") when fewer than
`disagg_min_tokens` tokens would have to be computed there, i.e. a short prompt, or one the decode node
already holds nearly all of; also when no prefill node is alive. Only nodes with role decode or both decode.

round_robin (the baseline): decode and prefill nodes each in turn, blind to the cache; short prompts (by
length alone) stay colocated so the two policies differ only in cache awareness.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

from pdserve.proxy.config import RouterConfig, RouterWeights
from pdserve.proxy.nodes import NodeState

log = logging.getLogger(__name__)


class NoRoute(Exception):
    """No live node can serve this request."""


@dataclass(frozen=True, slots=True)
class PairTerms:
    prompt_tokens: int
    prefill_hit_tokens: int  # prompt tokens cached on P (the leading blocks it holds)
    decode_hit_tokens: int  # prompt tokens D already holds
    prefill_queue: int  # requests waiting on P
    decode_load: int  # requests waiting or running on D
    decode_free: float  # fraction of D's blocks free
    decode_fits: bool  # D has room for the prompt's uncached blocks
    prefill_backlog_tokens: int = 0  # uncached prompt tokens of this proxy's requests still prefilling on P


def score_pair(t: PairTerms, w: RouterWeights) -> float:
    """Higher is better. Hits and P's backlog are fractions of the prompt; loads count requests.

    The hit and backlog terms at weight 1 each rank prefill nodes by the tokens P must compute before this
    request's first token (its backlog plus our uncached part): a prefix claim is worth only the compute it
    saves, so a holder whose queue holds more than that loses the request to an idler node."""
    n = max(t.prompt_tokens, 1)
    return (
        w.prefill_hit * t.prefill_hit_tokens / n
        + w.decode_hit * t.decode_hit_tokens / n
        - w.prefill_backlog * t.prefill_backlog_tokens / n
        - w.prefill_queue * t.prefill_queue
        - w.decode_load * t.decode_load
        + w.decode_free * t.decode_free
        - (0.0 if t.decode_fits else w.decode_full)
    )


@dataclass(frozen=True, slots=True)
class Decision:
    mode: str  # colocated | disaggregated
    decode: NodeState
    prefill: Optional[NodeState]  # None when colocated
    terms: Optional[PairTerms]
    score: float
    reason: str  # why this mode

    @property
    def prefill_node(self) -> NodeState:
        return self.prefill if self.prefill is not None else self.decode

    def describe(self) -> str:
        p = self.prefill.node_id if self.prefill is not None else "-"
        terms = asdict(self.terms) if self.terms is not None else {}
        return (
            f"mode={self.mode} prefill={p} decode={self.decode.node_id} score={self.score:.3f} "
            f"reason={self.reason} terms={terms}"
        )


class Router:
    def __init__(self, config: RouterConfig):
        if config.policy not in ("cache_aware", "round_robin"):
            raise ValueError(f"unknown routing policy {config.policy!r}")
        self.config = config
        self._rr_decode = 0
        self._rr_prefill = 0
        self._tie = 0

    def decide(
        self,
        prompt_tokens: int,
        hits: dict[str, int],
        block_size: int,
        prefillers: list[NodeState],
        decoders: list[NodeState],
        exclude: Iterable[str] = (),
    ) -> Decision:
        """hits: node id -> leading prompt blocks it holds. exclude: node ids not to use (failed this
        request)."""
        excluded = set(exclude)
        decoders = [d for d in decoders if d.node_id not in excluded]
        prefillers = [p for p in prefillers if p.node_id not in excluded]
        if not decoders:
            raise NoRoute("no live decode node" + (" left to retry on" if excluded else ""))
        if self.config.policy == "round_robin":
            return self._round_robin(prompt_tokens, block_size, prefillers, decoders)
        return self._cache_aware(prompt_tokens, hits, block_size, prefillers, decoders)

    def _terms(
        self, prompt_tokens: int, hits: dict[str, int], block_size: int, p: NodeState, d: NodeState
    ) -> PairTerms:
        # The last prompt token is always computed (its logits give the first token), so hits stop before it.
        cap = max(prompt_tokens - 1, 0)
        p_hit = min(hits.get(p.node_id, 0) * block_size, cap)
        d_hit = min(hits.get(d.node_id, 0) * block_size, cap)
        need_blocks = -(-(prompt_tokens - d_hit) // max(block_size, 1))
        return PairTerms(
            prompt_tokens,
            p_hit,
            d_hit,
            p.prefill_queue,
            d.decode_load,
            d.free_fraction,
            d.total_blocks == 0 or d.free_blocks >= need_blocks,
            p.pending_prefill_tokens,
        )

    def _cache_aware(
        self,
        prompt_tokens: int,
        hits: dict[str, int],
        block_size: int,
        prefillers: list[NodeState],
        decoders: list[NodeState],
    ) -> Decision:
        w, min_tokens = self.config.weights, self.config.disagg_min_tokens
        candidates: list[tuple[float, int, Decision]] = []
        self._tie += 1
        for d in decoders:
            colocated_terms = self._terms(prompt_tokens, hits, block_size, d, d)
            uncached_on_d = prompt_tokens - colocated_terms.decode_hit_tokens
            others = [p for p in prefillers if p is not d]
            if uncached_on_d < min_tokens or not others:
                reason = (
                    "short"
                    if prompt_tokens < min_tokens
                    else "decode_holds_prefix"
                    if uncached_on_d < min_tokens
                    else "no_prefill_node"
                )
                candidates.append(
                    (
                        score_pair(colocated_terms, w),
                        0,
                        Decision(
                            "colocated", d, None, colocated_terms, score_pair(colocated_terms, w), reason
                        ),
                    )
                )
                continue
            for p in others:
                t = self._terms(prompt_tokens, hits, block_size, p, d)
                s = score_pair(t, w)
                candidates.append((s, 0, Decision("disaggregated", d, p, t, s, "scored")))
        # Equal scores (no hits, equal loads): rotate so ties spread over the nodes.
        n = len(candidates)
        best = max(range(n), key=lambda i: (candidates[i][0], -((i - self._tie) % n)))
        return candidates[best][2]

    def _round_robin(
        self, prompt_tokens: int, block_size: int, prefillers: list[NodeState], decoders: list[NodeState]
    ) -> Decision:
        d = decoders[self._rr_decode % len(decoders)]
        self._rr_decode += 1
        others = [p for p in prefillers if p is not d]
        if prompt_tokens < self.config.disagg_min_tokens or not others:
            reason = "short" if prompt_tokens < self.config.disagg_min_tokens else "no_prefill_node"
            return Decision("colocated", d, None, None, 0.0, reason)
        p = others[self._rr_prefill % len(others)]
        self._rr_prefill += 1
        return Decision("disaggregated", d, p, None, 0.0, "round_robin")
