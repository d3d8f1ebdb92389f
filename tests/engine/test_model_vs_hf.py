"""Our decoder, run through the paged KV cache, gives Hugging Face's logits (fp32) for the same checkpoint:
a whole-prompt prefill, decode steps, a prefill split in two chunks, and a step mixing a decode with a
prefill."""

import itertools

import pytest
import torch

from pdserve.engine.attention_metadata import AttentionMetadata
from pdserve.engine.models.loader import load_model

BLOCK = 8
NUM_BLOCKS = 32
ATOL = 1e-4
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


@pytest.fixture(scope="module")
def dirs(model_dirs, tmp_path_factory):
    from pdserve.tools.make_model import make_model

    path = tmp_path_factory.mktemp("rope") / "tiny-llama3-rope"
    make_model(
        str(path),
        family="llama",
        preset="tiny",
        seed=1,
        config_overrides={"rope_scaling": LLAMA3_ROPE},
        progress=False,
    )
    return {**model_dirs, "llama3-rope": str(path)}


@pytest.fixture(
    scope="module",
    params=["llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3", "mixtral", "qwen3_moe", "llama3-rope"],
)
def pair(request, dirs):
    from transformers import AutoModelForCausalLM

    path = dirs[request.param]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours, arch = load_model(path, torch.float32, "cpu", progress=False)
    return hf, ours, arch


def new_cache(arch):
    shape = (2, NUM_BLOCKS, BLOCK, arch.num_key_value_heads, arch.head_dim)
    return [torch.zeros(shape) for _ in range(arch.num_hidden_layers)]


def step(model, caches, chunks):
    """chunks: (token_ids, start position, block_ids, is_decode), decodes first -> hidden [T, H]."""
    ids, pos, slots = [], [], []
    for tokens, start, blocks, _ in chunks:
        for i, token in enumerate(tokens):
            p = start + i
            ids.append(token)
            pos.append(p)
            slots.append(blocks[p // BLOCK] * BLOCK + p % BLOCK)
    decodes = [c for c in chunks if c[3]]
    prefills = [c for c in chunks if not c[3]]

    def table(group):
        width = max((len(c[2]) for c in group), default=1)
        rows = [c[2] + [0] * (width - len(c[2])) for c in group]
        return torch.tensor(rows, dtype=torch.int32).reshape(len(group), width)

    q_lens = [len(c[0]) for c in prefills]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        num_decode_tokens=len(decodes),
        decode_block_tables=table(decodes),
        decode_seq_lens=torch.tensor([c[1] + 1 for c in decodes], dtype=torch.int32),
        prefill_block_tables=table(prefills),
        prefill_cu_query_lens=torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32),
        prefill_seq_lens=torch.tensor([c[1] + len(c[0]) for c in prefills], dtype=torch.int32),
        max_prefill_query_len=max(q_lens, default=0),
    )
    with torch.inference_mode():
        return model(torch.tensor(ids), torch.tensor(pos), caches, meta)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids])).logits[0].float()


PROMPT = [int(x) for x in torch.randint(5, 1000, (29,), generator=torch.Generator().manual_seed(7))]
OTHER = [int(x) for x in torch.randint(5, 1000, (13,), generator=torch.Generator().manual_seed(8))]
BLOCKS_A = [5, 2, 9, 30, 11]  # deliberately scattered
BLOCKS_B = [7, 1, 20]


def test_prefill_then_decode_steps(pair):
    hf, ours, arch = pair
    caches = new_cache(arch)
    hidden = step(ours, caches, [(PROMPT, 0, BLOCKS_A, False)])
    logits = ours.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (len(PROMPT), arch.vocab_size)
    torch.testing.assert_close(logits, hf_logits(hf, PROMPT), atol=ATOL, rtol=0)
    seq = list(PROMPT)
    for _ in range(3):
        seq.append(int(logits[-1].argmax()))
        logits = ours.compute_logits(step(ours, caches, [([seq[-1]], len(seq) - 1, BLOCKS_A, True)]))
        torch.testing.assert_close(logits[0], hf_logits(hf, seq)[-1], atol=ATOL, rtol=0)


def test_two_chunk_prefill(pair):
    hf, ours, arch = pair
    caches = new_cache(arch)
    split = 11  # not on a block boundary
    step(ours, caches, [(PROMPT[:split], 0, BLOCKS_A, False)])
    logits = ours.compute_logits(step(ours, caches, [(PROMPT[split:], split, BLOCKS_A, False)]))
    torch.testing.assert_close(logits, hf_logits(hf, PROMPT)[split:], atol=ATOL, rtol=0)


def test_step_mixing_a_decode_and_two_prefills(pair):
    hf, ours, arch = pair
    caches = new_cache(arch)
    step(ours, caches, [(PROMPT[:-1], 0, BLOCKS_A, False)])
    step(ours, caches, [(OTHER[:5], 0, BLOCKS_B, False)])
    fresh = [3, 17, 400]
    hidden = step(
        ours,
        caches,
        [
            ([PROMPT[-1]], len(PROMPT) - 1, BLOCKS_A, True),
            (OTHER[5:], 5, BLOCKS_B, False),
            (fresh, 0, [12], False),
        ],
    )
    logits = ours.compute_logits(hidden)
    torch.testing.assert_close(logits[0], hf_logits(hf, PROMPT)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1 : 1 + len(OTHER) - 5], hf_logits(hf, OTHER)[5:], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[-3:], hf_logits(hf, fresh), atol=ATOL, rtol=0)


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pdserve.engine.checkpoint import RopeScaling
    from pdserve.engine.models.layers import rope_inv_freq

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling=dict(scaling),
        max_position_embeddings=131072,
    )
    expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_inv_freq(128, 500000.0, RopeScaling(**scaling))
    assert attention_factor == 1.0
    torch.testing.assert_close(ours, expected.float(), atol=0, rtol=0)
