"""Which KV blocks a sliding-window layer still reads: one rule for the block manager, the KV producer and the
consumer, so the three agree to the block.

A layer with window W lets the query at position p see keys p - W < j <= p. Once a request has n tokens
computed, every later query sits at p >= n, so keys before n - W + 1 are never read again, and block i (tokens
[i*B, (i+1)*B)) is dead once (i+1)*B <= n - W + 1.

- **Freeing** (engine/kv_cache_manager.py): when every layer slides, dead blocks go back to the pool (still
  prefix-cache hits until evicted). When some layers attend globally (Gemma 2 and 3), a block holds every
  layer's KV, so the global layers keep it: see docs/architecture.md for why we keep one block table.
- **Shipping** (kvconnector): a prompt of n tokens leaves the decode node reading from position n - W + 1 on
  (its first step is at position n), so a sliding layer's blocks before `first_window_block(n, W, B)` are not
  sent. The decode node then holds blocks whose sliding layers are empty; it never offers them to its prefix
  cache (`KVCacheManager.skip_caching`), since a later prompt with a shorter shared prefix would read them.
"""

from __future__ import annotations


def first_live_position(num_computed_tokens: int, window: int) -> int:
    """The earliest key position any later query of a window-`window` layer can see."""
    return max(0, num_computed_tokens - window + 1)


def first_window_block(num_computed_tokens: int, window: int, block_size: int) -> int:
    """Blocks [0, this) are never read again by a layer of this window (0 for window 0: full attention)."""
    if window <= 0:
        return 0
    return first_live_position(num_computed_tokens, window) // block_size


def shipped_from(layer_windows, num_tokens: int, block_size: int) -> list[int]:
    """Per layer, the first prompt block (an index into the prompt's block table) the decode node will read:
    0 for full-attention layers."""
    return [first_window_block(num_tokens, w, block_size) for w in layer_windows]


def all_layers_slide(layer_windows) -> int:
    """The window blocks may be freed by: the largest window when every layer slides, else 0 (never free)."""
    return max(layer_windows) if layer_windows and all(layer_windows) else 0
