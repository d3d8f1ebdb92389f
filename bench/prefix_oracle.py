"""How much of a trace's prompts any router could serve from prefix caches: the yardstick for a routing
policy's hit fraction. Engines cache whole blocks, each identified by its tokens and everything before them (a
hash chain), so a request hits on the longest run of leading blocks some node still holds.

- upper_bound_hit_fraction: caches that never evict; the tokens of every full block whose prefix appeared
  earlier in the trace, over all prompt tokens. No router on any cache size beats it.
- lru_oracle_hit_fraction: N nodes of C blocks each with LRU eviction, and a router that knows every cache
  exactly: each request goes to the node holding its longest cached prefix (ties: the node whose cache holds
  fewest blocks, then the lowest index). Achievable with perfect knowledge on these caches; a cache-aware
  router that sees the nodes' events approaches it.
Neither counts a prompt's last token as cacheable differently from the others; engines that recompute it
differ by at most one block per request.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable


def block_chain(prompt: list[int], block_size: int) -> list[int]:
    """Hashes of the prompt's full blocks, each covering its prefix."""
    out, parent = [], 0
    for start in range(0, len(prompt) - block_size + 1, block_size):
        parent = hash((parent, tuple(prompt[start : start + block_size])))
        out.append(parent)
    return out


def upper_bound_hit_fraction(prompts: Iterable[list[int]], block_size: int) -> float:
    seen: set[int] = set()
    hit = total = 0
    for prompt in prompts:
        total += len(prompt)
        chain = block_chain(prompt, block_size)
        hit += block_size * sum(1 for h in chain if h in seen)
        seen.update(chain)
    return hit / total if total else 0.0


class LRUCache:
    def __init__(self, capacity_blocks: int):
        self.capacity = capacity_blocks
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def cached_prefix(self, chain: list[int]) -> int:
        n = 0
        for h in chain:
            if h not in self.blocks:
                break
            n += 1
        return n

    def touch(self, chain: list[int]) -> None:
        """The request's blocks are used (hits) or written (misses); the least recently used fall out. A
        prompt's later blocks are touched first, so its leading blocks (shared by more requests) are evicted
        last, as an engine's free queue does."""
        for h in reversed(chain[: self.capacity]):
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


def lru_oracle_hit_fraction(
    prompts: Iterable[list[int]], block_size: int, nodes: int, blocks_per_node: int
) -> float:
    caches = [LRUCache(blocks_per_node) for _ in range(nodes)]
    hit = total = 0
    for prompt in prompts:
        total += len(prompt)
        chain = block_chain(prompt, block_size)
        best = max(range(nodes), key=lambda i: (caches[i].cached_prefix(chain), -len(caches[i].blocks), -i))
        hit += block_size * caches[best].cached_prefix(chain)
        caches[best].touch(chain)
    return hit / total if total else 0.0
