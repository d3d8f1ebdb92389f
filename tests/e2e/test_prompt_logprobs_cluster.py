"""prompt_logprobs and echo with logprobs end to end through `pdserve up --prefill 1 --decode 1` (real
processes, CPU) with the official openai client, disaggregated (a long prompt: the prefill node computes the
records, the decode node relays them) and colocated (a shorter one). Nodes prefill in chunks of 16 tokens, so
every prompt here takes several chunks. Every value equals transformers' log_softmax over the same
checkpoint's logits."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.harness.servers import UpCluster, needs_nodes

pytestmark = [pytest.mark.slow, needs_nodes]

LONG = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 4).strip()
MEDIUM = "One two three four five six seven eight nine ten eleven twelve"  # under 32 tokens: colocated
MODES = [(LONG, "disaggregated"), (MEDIUM, "colocated")]
CHAT_MODES = [(LONG, "disaggregated"), ("One two three four", "colocated")]  # the template adds tokens
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    c = UpCluster(
        tmp_path_factory.mktemp("cluster-plp"), tiny_model, 1, 1, ("--node-arg=--max-num-batched-tokens=16",)
    )
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    from openai import OpenAI

    return OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_model):
    """prompt ids -> [P - 1, V] float32: row i - 1 is the log_softmax predicting prompt token i."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def logprobs(prompt: list[int]):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)[:-1]

    return logprobs


def extra(**fields) -> dict:
    """A fresh salt, so nothing is cached under it and the route depends on the prompt's length alone."""
    return {"cache_salt": uuid.uuid4().hex, "return_token_ids": True, **fields}


def check_vllm_shape(got: list, prompt: list[int], ref, k: int) -> None:
    assert len(got) == len(prompt) and got[0] is None
    for i in range(1, len(prompt)):
        row, token = ref[i - 1], prompt[i]
        top_values, top_ids = row.topk(k)
        assert set(got[i]) == {str(t) for t in top_ids.tolist()} | {str(token)}, i
        mine = got[i][str(token)]
        assert mine["rank"] == int((row > row[token]).sum()) + 1, i
        assert mine["logprob"] == pytest.approx(float(row[token]), abs=TOLERANCE), i
        assert isinstance(mine["decoded_token"], str)
        for rank, (tid, value) in enumerate(zip(top_ids.tolist(), top_values.tolist(), strict=True), start=1):
            assert got[i][str(tid)]["rank"] == rank, i
            assert got[i][str(tid)]["logprob"] == pytest.approx(value, abs=TOLERANCE), i


def body_of(raw) -> dict:
    return json.loads(raw.http_response.text)


@pytest.mark.parametrize("prompt,mode", MODES)
def test_completion_prompt_logprobs_match_transformers(client, reference, prompt, mode):
    raw = client.completions.with_raw_response.create(
        model="tiny-llama", prompt=prompt, max_tokens=4, temperature=0, extra_body=extra(prompt_logprobs=3)
    )
    assert raw.headers["x-pdserve-route"].startswith(mode)
    choice = body_of(raw)["choices"][0]
    ids = choice["prompt_token_ids"]
    assert len(ids) > 16  # several prefill chunks
    check_vllm_shape(choice["prompt_logprobs"], ids, reference(ids), 3)


@pytest.mark.parametrize("prompt,mode", CHAT_MODES)
def test_chat_prompt_logprobs_match_transformers(client, reference, prompt, mode):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=3,
        temperature=0,
        extra_body=extra(prompt_logprobs=2),
    )
    assert raw.headers["x-pdserve-route"].startswith(mode)
    body = body_of(raw)
    ids = body["choices"][0]["prompt_token_ids"]
    assert len(ids) > 16  # several prefill chunks
    check_vllm_shape(body["prompt_logprobs"], ids, reference(ids), 2)


@pytest.mark.parametrize("prompt,mode", MODES)
def test_echo_with_logprobs_returns_prompt_then_generated(client, reference, prompt, mode):
    def complete(**fields):
        raw = client.completions.with_raw_response.create(
            model="tiny-llama",
            prompt=prompt,
            max_tokens=4,
            temperature=0,
            logprobs=2,
            extra_body=extra(ignore_eos=True),
            **fields,
        )
        assert raw.headers["x-pdserve-route"].startswith(mode)
        return raw.parse().choices[0]

    echoed, plain = complete(echo=True), complete()
    ids, generated = echoed.prompt_token_ids, plain.token_ids
    ref = reference(ids)
    lp = echoed.logprobs
    assert len(lp.tokens) == len(ids) + len(generated)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1][ids[i]]), abs=TOLERANCE), i
        assert len(lp.top_logprobs[i]) <= 3  # the prompt's token and the top 2 (fewer when they coincide)
    tail = len(ids)
    assert lp.tokens[tail:] == plain.logprobs.tokens
    assert lp.token_logprobs[tail:] == pytest.approx(plain.logprobs.token_logprobs, abs=TOLERANCE)
    assert echoed.text.startswith(prompt) and echoed.text[len(prompt) :] == plain.text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
