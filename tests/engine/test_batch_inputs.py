"""Step inputs: the decode rows that CUDA graphs stage equal what the general path computes for the same
chunks."""

import random

import numpy as np
import torch

from pdserve.engine.batch_inputs import _slot_mapping, build_batch_inputs, decode_rows
from pdserve.engine.scheduler_output import ScheduledRequest


def random_decodes(seed: int, n: int, block_size: int) -> list[ScheduledRequest]:
    rng = random.Random(seed)
    free = list(range(500))
    rng.shuffle(free)
    chunks = []
    for i in range(n):
        computed = rng.randrange(0, 90)
        blocks = [free.pop() for _ in range(computed // block_size + 1)]
        chunks.append(
            ScheduledRequest(f"r{i}", [rng.randrange(1000)], computed, blocks, is_decode=True, samples=True)
        )
    return chunks


def test_decode_rows_match_the_general_slot_mapping():
    chunks = random_decodes(0, 13, block_size=16)
    rows = decode_rows(chunks, 16)
    assert np.array_equal(rows.slot_mapping, _slot_mapping(chunks, 16))
    assert rows.positions.tolist() == [c.num_computed_tokens for c in chunks]
    assert rows.seq_lens.tolist() == [c.num_computed_tokens + 1 for c in chunks]
    assert rows.input_ids.tolist() == [c.token_ids[0] for c in chunks]
    for row, chunk in enumerate(chunks):  # each table row holds the request's blocks, then zero padding
        width = len(chunk.block_ids)
        assert rows.block_tables[row, :width].tolist() == chunk.block_ids
        assert not rows.block_tables[row, width:].any()


def test_batch_inputs_use_the_same_decode_rows_before_prefills():
    chunks = random_decodes(1, 5, block_size=16)
    chunks.append(ScheduledRequest("p", [7, 8, 9], 20, [400, 401], is_decode=False, samples=True))
    batch = build_batch_inputs(chunks, 16, torch.device("cpu"))
    rows = decode_rows(chunks[:5], 16)
    assert batch.attn.num_decode_tokens == 5
    assert torch.equal(batch.attn.decode_seq_lens, torch.from_numpy(rows.seq_lens))
    assert torch.equal(batch.attn.slot_mapping[:5], torch.from_numpy(rows.slot_mapping))
    assert batch.attn.slot_mapping[5:].tolist() == [401 * 16 + 4, 401 * 16 + 5, 401 * 16 + 6]
    assert batch.last_token_index.tolist() == [0, 1, 2, 3, 4, 7]


def test_no_decodes_gives_empty_rows():
    rows = decode_rows([], 16)
    assert rows.slot_mapping.shape == (0,) and rows.seq_lens.shape == (0,)
