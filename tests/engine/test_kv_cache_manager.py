"""KVCacheManager: prefix hits never cover the last token, allocation is all-or-nothing, free returns
everything."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.request import Request
from pdserve.wire.hashing import hash_prompt_blocks

BS = 4


def make(num_blocks=8, caching=True):
    pool = BlockPool(num_blocks, enable_caching=caching, block_size=BS)
    return pool, KVCacheManager(pool, BS, max_model_len=64)


def req(rid, tokens, max_tokens=4):
    return Request(rid, list(tokens), SimpleNamespace(max_tokens=max_tokens), block_size=BS)


def run_prompt(kv, r):
    """Allocate and 'compute' the whole prompt, registering its blocks."""
    hits, n = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - n, hits)
    r.num_computed_tokens = r.num_tokens
    kv.cache_blocks(r, r.num_computed_tokens)
    return n


def test_request_hashes_match_shared_function_and_grow_with_outputs():
    r = req("a", range(7))
    assert r.block_hashes == hash_prompt_blocks(list(range(7)), BS)
    r.append_output_token(7)
    assert r.block_hashes == hash_prompt_blocks(list(range(8)), BS) and len(r.block_hashes) == 2


def test_block_size_is_adopted_from_the_cache():
    _, kv = make()
    a = Request("a", list(range(10)), SimpleNamespace(max_tokens=1))
    assert a.block_size is None and a.block_hashes == []
    run_prompt(kv, a)
    assert a.block_hashes == hash_prompt_blocks(list(range(10)), BS)
    with pytest.raises(ValueError):
        a.set_block_size(BS * 2)


def test_prefix_hit_and_block_table():
    pool, kv = make()
    a = req("a", range(10))
    assert run_prompt(kv, a) == 0
    assert kv.block_table(a) == [0, 1, 2]
    b = req("b", list(range(8)) + [99, 98, 97])
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [blk.block_id for blk in hits] == [0, 1]
    assert kv.allocate_slots(b, b.num_tokens - n, hits)
    assert kv.block_table(b)[:2] == [0, 1] and len(kv.block_table(b)) == 3
    assert pool.blocks[0].ref_count == 2
    pool.check_invariants()


def test_hit_never_covers_the_last_token():
    _, kv = make()
    a = req("a", range(8))
    run_prompt(kv, a)
    same = req("b", range(8))  # block-aligned and fully cached: the last block must still be computed
    _, n = kv.get_computed_blocks(same)
    assert n == 4


def test_allocate_is_all_or_nothing_and_counts_revived_hits():
    pool, kv = make(num_blocks=4)
    a = req("a", range(8))
    run_prompt(kv, a)
    kv.free(a)
    assert pool.num_cached == 2 and pool.num_free == 2
    b = req("b", list(range(8)) + list(range(100, 112)))  # 2 hit blocks + 3 new > 4 blocks
    hits, n = kv.get_computed_blocks(b)
    assert n == 8
    assert not kv.allocate_slots(b, b.num_tokens - n, hits)
    assert kv.block_table(b) == [] and pool.num_used == 0 and pool.num_cached == 2
    pool.check_invariants()


def test_free_and_caching_disabled():
    pool, kv = make(caching=False)
    a = req("a", range(10))
    assert run_prompt(kv, a) == 0
    assert run_prompt(kv, req("b", range(10))) == 0
    kv.free(a)
    kv.free("b")
    kv.free("b")  # idempotent
    assert pool.num_free == pool.num_blocks
    pool.check_invariants()


def test_allocate_for_externally_filled_kv_then_cache():
    """Decode-node shape: reserve slots for a prompt computed elsewhere, register it once the KV landed."""
    pool, kv = make()
    r = req("remote", range(9))
    assert kv.allocate_slots(r, r.num_tokens)
    assert len(kv.block_table(r)) == 3
    kv.cache_blocks(r, r.num_tokens)
    assert pool.get_cached_block(r.block_hashes[1]).block_id == kv.block_table(r)[1]
    with pytest.raises(ValueError):
        kv.allocate_slots(req("huge", range(10)), 100)


def accounting(pool) -> bool:
    return pool.num_free + pool.num_used + pool.num_cached == pool.num_blocks


@pytest.mark.parametrize("computed,released", [(13, 0), (14, 0), (15, 1), (18, 1), (19, 2)])
def test_out_of_window_release_at_the_edge(computed, released):
    """Window 12, block 4: once n tokens are computed, every later query sits at p >= n and sees keys from
    n - 11 on, so block i (tokens 4i..4i+3) is dead once 4i + 4 <= n - 11: none at n = 14, block 0 at 15."""
    pool = BlockPool(16, enable_caching=True, block_size=BS)
    kv = KVCacheManager(pool, BS, max_model_len=64, free_window=12)
    r = req("a", range(100, 100 + computed))
    assert kv.allocate_slots(r, computed, [])
    r.num_computed_tokens = computed
    kv.cache_blocks(r, computed)
    used, before = pool.num_used, kv.block_table(r)
    kv.release_out_of_window(r)
    # released entries show the dead id (never read: any valid id will do), the others are untouched
    assert kv.block_table(r) == [0] * released + before[released:] and pool.num_used == used - released
    assert kv.num_blocks_held(r) == -(-computed // BS) and accounting(pool)
    kv.free(r)  # released entries are skipped, the rest go back
    assert pool.num_used == 0 and accounting(pool)


def test_released_blocks_stay_prefix_hits_and_later_ones_are_still_cached():
    """A block released out of the window was hashed first: a new request with the same prefix hits it (its KV
    is whole on this node). Blocks filled after a release still reach the cache."""
    pool = BlockPool(16, enable_caching=True, block_size=BS)
    kv = KVCacheManager(pool, BS, max_model_len=64, free_window=4)
    a = req("a", range(100, 116))
    assert run_prompt(kv, a) == 0
    kv.release_out_of_window(a)  # 16 computed, window 4: blocks 0..2 dead
    assert kv.block_table(a)[:3] == [0, 0, 0]
    kv.free(a)
    b = req("b", range(100, 117))
    hits, n = kv.get_computed_blocks(b)
    assert n == 16 and accounting(pool)


def test_skip_caching_keeps_a_request_out_of_the_prefix_cache():
    """A decode node's window-shipped request lacks its sliding layers' early KV: none of its blocks may
    become a hit for a later prompt, however full they are."""
    pool, kv = make()
    a = req("a", range(100, 112))
    kv.skip_caching("a")
    run_prompt(kv, a)
    kv.free(a)
    b = req("b", range(100, 113))
    assert kv.get_computed_blocks(b)[1] == 0 and pool.num_cached == 0 and accounting(pool)
    c = req("c", range(100, 112))  # skip_caching ended with request a: c's blocks are cached as usual
    run_prompt(kv, c)
    kv.free(c)
    assert kv.get_computed_blocks(req("d", range(100, 113)))[1] == 12
