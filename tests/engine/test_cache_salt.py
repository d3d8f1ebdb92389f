"""cache_salt enters the first block's hash: the engine's prefix cache and the proxy's index
(hash_prompt_blocks) agree on it, and requests with different salts share no cached tokens while one salt
shares its prefix."""

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.request import Request
from pdserve.wire.hashing import hash_prompt_blocks

PROMPT = list(range(10, 60))  # three full blocks of 16


def test_request_hashes_equal_the_proxys_salted_hashes():
    params = SamplingParams(cache_salt="tenant-a")
    r = Request("r", PROMPT, params, block_size=16)
    assert r.block_hashes == hash_prompt_blocks(PROMPT, 16, cache_salt="tenant-a")
    unsalted = hash_prompt_blocks(PROMPT, 16)
    assert not set(r.block_hashes) & set(unsalted)


def test_different_salts_share_no_cached_tokens(model_dirs):
    llm = LLM(model=model_dirs["llama"], device="cpu", block_size=16)
    base = SamplingParams(temperature=0, max_tokens=2)

    def cached(salt):
        out = llm.generate([{"prompt_token_ids": PROMPT}], base.clone(cache_salt=salt))
        return out[0].num_cached_tokens

    assert cached("a") == 0
    assert cached("b") == 0  # same tokens, other salt: no hit
    assert cached(None) == 0
    assert cached("a") == 48  # same salt: its whole cached prefix
