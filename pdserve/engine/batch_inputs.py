"""Turn one scheduler step into the flat tensors a forward pass takes.

Tokens of all scheduled requests are laid end to end, decodes first (one token each), then prefill chunks, as
`engine/attention_metadata.py` describes. Built on the host with numpy, copied to the device once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.attention_metadata import AttentionMetadata
from pdserve.engine.scheduler_output import ScheduledRequest


@dataclass(slots=True)
class BatchInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    last_token_index: torch.Tensor  # [num_chunks] int64: each chunk's last row in the flat batch


def _block_table(chunks: list[ScheduledRequest]) -> np.ndarray:
    width = max((len(c.block_ids) for c in chunks), default=0)
    table = np.zeros((len(chunks), max(width, 1)), dtype=np.int32)
    for row, chunk in enumerate(chunks):
        table[row, : len(chunk.block_ids)] = chunk.block_ids
    return table


@dataclass(slots=True)
class DecodeRows:
    """Host arrays for decode chunks (one new token each), shared by eager steps and CUDA-graph staging."""

    input_ids: np.ndarray  # [n] int64
    positions: np.ndarray  # [n] int64, == tokens already computed
    slot_mapping: np.ndarray  # [n] int64
    seq_lens: np.ndarray  # [n] int32, context including the new token
    block_tables: np.ndarray  # [n, widest table] int32, zero-padded


def decode_rows(chunks: list[ScheduledRequest], block_size: int) -> DecodeRows:
    n = len(chunks)
    positions = np.fromiter((c.num_computed_tokens for c in chunks), dtype=np.int64, count=n)
    table = _block_table(chunks)
    slots = (
        table[np.arange(n), positions // block_size].astype(np.int64) * block_size + positions % block_size
    )
    return DecodeRows(
        input_ids=np.fromiter((c.token_ids[0] for c in chunks), dtype=np.int64, count=n),
        positions=positions,
        slot_mapping=slots,
        seq_lens=(positions + 1).astype(np.int32),
        block_tables=table,
    )


def _slot_mapping(chunks: list[ScheduledRequest], block_size: int) -> np.ndarray:
    parts = []
    for chunk in chunks:
        pos = np.arange(chunk.num_computed_tokens, chunk.num_computed_tokens + len(chunk.token_ids))
        blocks = np.asarray(chunk.block_ids, dtype=np.int64)[pos // block_size]
        parts.append(blocks * block_size + pos % block_size)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def build_batch_inputs(chunks: list[ScheduledRequest], block_size: int, device: torch.device) -> BatchInputs:
    """chunks must list decodes before prefills."""
    decodes = [c for c in chunks if c.is_decode]
    prefills = [c for c in chunks if not c.is_decode]
    assert chunks[: len(decodes)] == decodes, "decodes must come first"

    # 1. Flat token ids and their positions.
    input_ids = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int64)
    positions = np.concatenate(
        [np.arange(c.num_computed_tokens, c.num_computed_tokens + len(c.token_ids)) for c in chunks]
    )
    # 2. Where each token's K/V goes.
    slots = _slot_mapping(chunks, block_size)
    # 3. Per-sequence tables and lengths for the two attention kernels.
    q_lens = np.array([len(c.token_ids) for c in prefills], dtype=np.int32)
    cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    ends = np.cumsum([len(c.token_ids) for c in chunks]) - 1
    decode = decode_rows(decodes, block_size)

    def dev(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)

    attn = AttentionMetadata(
        slot_mapping=dev(slots.astype(np.int64)),
        num_decode_tokens=len(decodes),
        decode_block_tables=dev(decode.block_tables),
        decode_seq_lens=dev(decode.seq_lens),
        prefill_block_tables=dev(_block_table(prefills)),
        prefill_cu_query_lens=dev(cu_q),
        prefill_seq_lens=dev(
            np.array([c.num_computed_tokens + len(c.token_ids) for c in prefills], dtype=np.int32)
        ),
        max_prefill_query_len=int(q_lens.max()) if len(q_lens) else 0,
    )
    return BatchInputs(
        input_ids=dev(input_ids),
        positions=dev(positions.astype(np.int64)),
        attn=attn,
        last_token_index=dev(ends.astype(np.int64)),
    )
