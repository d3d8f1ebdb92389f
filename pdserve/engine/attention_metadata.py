"""What the model runner tells each attention layer about the batch it is running.

A step's tokens are flattened into one sequence of T tokens, decode requests first (one token each), then the
prefill chunks. Every layer writes the step's K/V through `slot_mapping` before attending, so attention reads
the chunk's own keys from the paged cache like any cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset; -1 skips the write (padding)
    num_decode_tokens: int  # the first num_decode_tokens tokens are decodes, one per sequence
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [num_decodes] int32, context length including the new token
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int32
    prefill_cu_query_lens: (
        torch.Tensor
    )  # [num_prefills + 1] int32, offsets into the prefill part of the tokens
    prefill_seq_lens: torch.Tensor  # [num_prefills] int32, context length including this chunk
    max_prefill_query_len: int = 0

    @property
    def num_decodes(self) -> int:
        return self.num_decode_tokens

    @property
    def num_prefills(self) -> int:
        return int(self.prefill_seq_lens.shape[0])
