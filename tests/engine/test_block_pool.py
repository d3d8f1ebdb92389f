"""BlockPool: accounting, LRU eviction order, prefix-cache registration, and KV events.

The property test drives random allocate / free / hit / cache / evict / reset sequences against a model of who
holds which block, and replays the emitted events into an index that must mirror the pool's hashed blocks.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pdserve.engine.block_pool import BlockPool, NoFreeBlocksError
from pdserve.wire.hashing import external_block_hash, hash_prompt_blocks
from pdserve.wire.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

BS = 4


def _hashes(tokens, bs=BS):
    return hash_prompt_blocks(tokens, bs)


def test_counters_and_allocate_free():
    pool = BlockPool(8, block_size=BS)
    blocks = pool.allocate(3)
    assert [b.ref_count for b in blocks] == [1, 1, 1]
    assert (pool.num_free, pool.num_used, pool.num_cached) == (5, 3, 0)
    pool.free(blocks)
    assert (pool.num_free, pool.num_used, pool.num_cached) == (8, 0, 0)
    pool.check_invariants()
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(9)
    with pytest.raises(RuntimeError):
        pool.free(blocks)  # double free


def test_cached_blocks_survive_free_and_hit():
    pool = BlockPool(4, block_size=BS)
    tokens = list(range(8))
    hashes = _hashes(tokens)
    blocks = pool.allocate(2)
    pool.cache_full_blocks(hashes, blocks, 0, 2, tokens)
    pool.free(blocks)
    assert (pool.num_free, pool.num_used, pool.num_cached) == (2, 0, 2)
    hit = pool.get_cached_block(hashes[0])
    assert hit is blocks[0]
    pool.touch([hit])
    assert (pool.num_used, pool.num_cached) == (1, 1)
    pool.check_invariants()


def test_free_blocks_go_before_cached_and_tail_is_evicted_first():
    pool = BlockPool(4, block_size=BS)
    tokens = list(range(12))
    hashes = _hashes(tokens)
    blocks = pool.allocate(3)
    pool.cache_full_blocks(hashes, blocks, 0, 3, tokens)
    pool.free(blocks)
    # One plain free block exists: it is handed out before any cached block is evicted.
    first = pool.allocate(1)[0]
    assert first.block_id == 3 and pool.num_cached == 3
    # Then eviction starts from the chain's tail (freed in reverse order).
    evicted = pool.allocate(1)[0]
    assert evicted is blocks[2] and evicted.block_hash is None
    assert pool.get_cached_block(hashes[0]) is blocks[0]
    assert pool.get_cached_block(hashes[2]) is None
    pool.check_invariants()


def test_first_holder_of_a_hash_wins():
    pool = BlockPool(4, block_size=BS)
    tokens = list(range(4))
    hashes = _hashes(tokens)
    a, b = pool.allocate(1), pool.allocate(1)
    pool.cache_full_blocks(hashes, a, 0, 1, tokens)
    pool.cache_full_blocks(hashes, b, 0, 1, tokens)
    assert a[0].block_hash == hashes[0] and b[0].block_hash is None
    pool.free(b)
    assert pool.num_free == 3  # the duplicate holds nothing reusable
    pool.check_invariants()


def test_events_cover_stored_runs_evictions_and_reset():
    pool = BlockPool(3, block_size=BS, emit_events=True)
    tokens = list(range(12))
    hashes = _hashes(tokens)
    blocks = pool.allocate(3)
    pool.cache_full_blocks(hashes, blocks, 0, 2, tokens)
    pool.cache_full_blocks(hashes, blocks, 2, 3, tokens)
    stored1, stored2 = pool.take_events()
    assert stored1 == BlockStored(
        block_hashes=[external_block_hash(h) for h in hashes[:2]],
        parent_block_hash=None,
        token_ids=tokens[:8],
        block_size=BS,
    )
    assert stored2.parent_block_hash == external_block_hash(hashes[1]) and stored2.token_ids == tokens[8:]
    assert pool.take_events() == []
    pool.free(blocks)
    pool.allocate(2)
    (removed,) = pool.take_events()
    assert removed == BlockRemoved(
        block_hashes=[external_block_hash(hashes[2]), external_block_hash(hashes[1])]
    )
    assert pool.reset_prefix_cache()
    assert pool.take_events() == [AllBlocksCleared()]
    assert pool.num_cached == 0 and pool.get_cached_block(hashes[0]) is None
    pool.check_invariants()


def test_caching_disabled():
    pool = BlockPool(2, enable_caching=False, block_size=BS, emit_events=True)
    tokens = list(range(4))
    blocks = pool.allocate(1)
    pool.cache_full_blocks(_hashes(tokens), blocks, 0, 1, tokens)
    assert blocks[0].block_hash is None and pool.take_events() == []


class PoolMachine(RuleBasedStateMachine):
    """Owners hold lists of blocks; a block's ref_count must equal how many owners hold it, and allocate must
    only ever return blocks no owner holds."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(12, block_size=2, emit_events=True)
        self.owners: dict[int, list] = {}
        self.next_owner = 0
        self.index: set[int] = set()  # the global index, rebuilt from events only

    def _new_owner(self, blocks):
        self.owners[self.next_owner] = blocks
        self.next_owner += 1

    @rule(n=st.integers(0, 6))
    def allocate(self, n):
        if n > self.pool.num_available:
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate(n)
            return
        held = {b.block_id for blocks in self.owners.values() for b in blocks}
        blocks = self.pool.allocate(n)
        assert not held & {b.block_id for b in blocks}, "handed a held block to a second owner"
        assert len({b.block_id for b in blocks}) == n
        self._new_owner(blocks)

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free(self, data):
        owner = data.draw(st.sampled_from(sorted(self.owners)))
        self.pool.free(self.owners.pop(owner))

    @precondition(lambda self: self.owners)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 3), min_size=2, max_size=12))
    def cache(self, data, tokens):
        owner = data.draw(st.sampled_from(sorted(self.owners)))
        blocks = self.owners[owner]
        hashes = hash_prompt_blocks(tokens, 2)
        n = min(len(hashes), len(blocks))
        start = data.draw(st.integers(0, n))
        self.pool.cache_full_blocks(hashes, blocks, start, n, tokens)

    @rule(tokens=st.lists(st.integers(0, 3), min_size=2, max_size=12))
    def hit(self, tokens):
        hits = []
        for h in hash_prompt_blocks(tokens, 2):
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        self.pool.touch(hits)
        self._new_owner(hits)

    @rule()
    def reset(self):
        self.pool.reset_prefix_cache()

    @invariant()
    def accounting(self):
        pool = self.pool
        pool.check_invariants()
        assert pool.num_free + pool.num_used + pool.num_cached == pool.num_blocks
        refs: dict[int, int] = {}
        for blocks in self.owners.values():
            for b in blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        assert {b.block_id: b.ref_count for b in pool.blocks if b.ref_count} == refs

    @invariant()
    def events_mirror_pool(self):
        for event in self.pool.take_events():
            if isinstance(event, BlockStored):
                assert len(event.token_ids) == event.block_size * len(event.block_hashes)
                assert not self.index & set(event.block_hashes)
                self.index |= set(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                assert set(event.block_hashes) <= self.index
                self.index -= set(event.block_hashes)
            else:
                self.index.clear()
        assert self.index == {external_block_hash(b.block_hash) for b in self.pool.blocks if b.block_hash}


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
