"""End to end through `pdserve up --prefill 1 --decode 1` (real processes, CPU) with the official openai
client: greedy output equals transformers' greedy continuation (disaggregated: prefill node -> KV transfer ->
decode node; and colocated), streaming and not, chat and completions; seeded n=2; stop strings; logprobs;
usage and cached tokens; timings; 200 concurrent streams."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.harness.servers import module_cluster, needs_nodes

pytestmark = [pytest.mark.slow, needs_nodes]

LONG = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 4).strip()
SHORT = "Hello"
N = 16


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    yield from module_cluster(tmp_path_factory, tiny_model, "cluster-1p1d")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def client(cluster):
    from openai import OpenAI

    return OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


@pytest.mark.parametrize("prompt,mode", [(LONG, "disaggregated"), (SHORT, "colocated")])
def test_completion_greedy_matches_transformers(client, model_name, tok, hf_reference, prompt, mode):
    expected = hf_reference(tok.encode(prompt), N)
    raw = client.completions.with_raw_response.create(model=model_name, prompt=prompt, max_tokens=N, **GREEDY)
    assert raw.headers["x-pdserve-route"].startswith(mode)
    r = raw.parse()
    choice = r.choices[0]
    assert choice.token_ids == expected
    assert choice.text == tok.decode(expected)
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == N
    assert r.usage.total_tokens == r.usage.prompt_tokens + N
    timings = json.loads(raw.headers["x-pdserve-timings"])
    assert set(timings) >= {
        "prefill_queue",
        "prefill",
        "transfer",
        "exposed_transfer",
        "decode_queue",
        "ttft",
    }
    if mode == "disaggregated":
        assert timings["transfer"] > 0


def test_completion_stream_matches_transformers(client, model_name, tok, hf_reference):
    expected = hf_reference(tok.encode(LONG), N)
    stream = client.completions.create(
        model=model_name,
        prompt=LONG,
        max_tokens=N,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    text, ids, usage, finish = "", [], None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            ids += chunk.choices[0].token_ids or []
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert ids == expected and text == tok.decode(expected) and finish == "length"
    assert usage.completion_tokens == N
    assert set(usage.model_extra["pdserve_timings"]) >= {"prefill", "transfer", "decode_queue"}


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_matches_transformers(client, model_name, tok, hf_reference, stream):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": LONG}]
    expected = hf_reference(tok.encode_chat(messages), N)
    if stream:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model=model_name, messages=messages, max_tokens=N, stream=True, **GREEDY
            )
            if c.choices
        )
    else:
        r = client.chat.completions.create(model=model_name, messages=messages, max_tokens=N, **GREEDY)
        text = r.choices[0].message.content
        assert r.choices[0].token_ids == expected
        assert r.usage.prompt_tokens == len(tok.encode_chat(messages))
    assert text == tok.decode(expected)


def test_n2_seeded_is_reproducible(client, model_name):
    kw = dict(model=model_name, prompt=LONG, max_tokens=8, n=2, seed=1234, temperature=1.0)
    first = client.completions.create(**kw)
    second = client.completions.create(**kw)
    a = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    b = [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert len(a) == 2 and a == b
    assert a[0] != a[1]  # seed + i: the two samples differ
    assert first.usage.completion_tokens == 16


def test_stop_string(client, model_name, tok, hf_reference):
    expected = tok.decode(hf_reference(tok.encode(LONG), N))
    # a stop string starting at the text of the 8th token, first found there
    cut = len(tok.decode(hf_reference(tok.encode(LONG), N)[:8]))
    stop = expected[cut : cut + 3]
    if not stop.strip() or expected.find(stop) != cut:
        pytest.skip(f"greedy text {expected!r} has no clean stop string at {cut}")
    r = client.completions.create(model=model_name, prompt=LONG, max_tokens=N, stop=[stop], **GREEDY)
    assert r.choices[0].text == expected[:cut] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < N  # up to the token that completed the stop string


def test_logprobs(client, model_name, tok, hf_reference):
    expected = hf_reference(tok.encode(LONG), N)
    r = client.completions.create(model=model_name, prompt=LONG, max_tokens=N, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == N
    for tok_lp, top in zip(lp.token_logprobs, lp.top_logprobs, strict=False):
        assert tok_lp <= 0 and 3 <= len(top) <= 4
        assert tok_lp == pytest.approx(
            max(top.values()), abs=1e-4
        )  # greedy: the sampled token is the top one
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in expected]
    chat = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": LONG}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_cached_tokens_on_a_repeated_long_prompt(client, model_name):
    prompt = "A repeated prompt about caching key value blocks across requests in a serving system. " * 5
    first = client.completions.create(model=model_name, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 64
    second = client.completions.create(model=model_name, prompt=prompt, max_tokens=2, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.choices[0].text == first.choices[0].text


def test_200_concurrent_streams(cluster, model_name, tok, hf_reference):
    import httpx
    from openai import AsyncOpenAI

    prompts = [f"Stream number {i}: " + LONG[: 20 + 37 * i] for i in range(8)]
    expected = [tok.decode(hf_reference(tok.encode(p), 12)) for p in prompts]

    async def go():
        http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=250, max_keepalive_connections=250),
            timeout=httpx.Timeout(300.0),
        )
        client = AsyncOpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, http_client=http)

        async def one(k: int) -> tuple[int, str]:
            i = k % len(prompts)
            stream = await client.completions.create(
                model=model_name,
                prompt=prompts[i],
                max_tokens=12,
                stream=True,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            text = ""
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
            return i, text

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(k) for k in range(200))), 400)
        finally:
            await http.aclose()

    results = asyncio.run(go())
    assert len(results) == 200
    wrong = [(i, text) for i, text in results if text != expected[i]]
    assert not wrong, f"{len(wrong)} of 200 streams differ, e.g. {wrong[:2]} vs {expected[wrong[0][0]]!r}"
