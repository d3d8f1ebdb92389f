"""prompt_logprobs and echo with logprobs, shaped as vLLM answers, at the proxy (FakeNode behind it, which
sends synthetic records: position i's token has logprob -i/100 and rank 3, its top ids are i + 10 and i + 11
with -0.25 and -0.75). The values themselves are checked against transformers through real nodes in
tests/e2e/test_prompt_logprobs_cluster.py."""

from __future__ import annotations

import pytest

from pdserve.wire.detokenizer import decode_token
from pdserve.wire.node_messages import Generate
from tests.proxy.test_api import post, sse_events

PROMPT = [5, 6, 7, 8]


@pytest.fixture
def setup(fake_nodes, proxy_factory, tokenizer_dir):
    from pdserve.wire.tokenizer import load_tokenizer

    node = fake_nodes("d0", "both")
    server = proxy_factory([node])
    server.wait_nodes(1)
    return node, server, load_tokenizer(tokenizer_dir)


def expected(tok, prompt: list[int], k: int) -> list:
    def item(tid, lp, rank):
        return {"logprob": lp, "rank": rank, "decoded_token": decode_token(tok, tid)}

    out: list = [None]
    for i, token in enumerate(prompt[1:], start=1):
        entry = {str(token): item(token, -i / 100, 3)}
        for rank, (tid, lp) in enumerate(zip([i + 10, i + 11][:k], [-0.25, -0.75][:k], strict=True), start=1):
            entry.setdefault(str(tid), item(tid, lp, rank))
        out.append(entry)
    return out


def test_completion_choices_carry_them_and_one_sample_computes_them(setup):
    node, server, tok = setup
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "n": 2, "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["prompt_logprobs"] == expected(tok, PROMPT, 1)
    asked = sorted(str(m.params["prompt_logprobs"]) for m in node.messages(Generate)[-2:])
    assert asked == ["1", "None"]  # the other sample shares sample 0's records


def test_zero_gives_only_the_prompt_tokens(setup):
    _, server, tok = setup
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 0})
    assert r.json()["choices"][0]["prompt_logprobs"] == expected(tok, PROMPT, 0)
    assert all(len(e) == 1 for e in r.json()["choices"][0]["prompt_logprobs"][1:])


def test_chat_has_them_at_the_top_as_vllm(setup):
    node, server, tok = setup
    r = post(
        server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prompt_logprobs": 2},
    )
    assert r.status_code == 200, r.text
    prompt = node.messages(Generate)[-1].prompt_token_ids
    assert r.json()["prompt_logprobs"] == expected(tok, prompt, 2)
    assert "prompt_logprobs" not in r.json()["choices"][0]


def test_echo_with_logprobs_starts_with_the_prompt(setup):
    node, server, tok = setup
    body = {"prompt": PROMPT, "max_tokens": 2, "echo": True, "logprobs": 1}
    lp = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    assert node.messages(Generate)[-1].params["prompt_logprobs"] == 1  # echo + logprobs asks, as in vLLM
    generated = [300, 301]
    assert lp["tokens"] == [decode_token(tok, t) for t in PROMPT + generated]
    assert lp["token_logprobs"] == [None, -0.01, -0.02, -0.03, -0.5, -0.5]
    assert lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1] == {decode_token(tok, 11): -0.25, decode_token(tok, 6): -0.01}
    offsets = [0]
    for token in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp["text_offset"] == offsets


def test_echo_with_logprobs_streams_the_prompt_first(setup):
    _, server, tok = setup
    body = {"prompt": PROMPT, "max_tokens": 2, "echo": True, "logprobs": 1, "stream": True}
    with httpx_stream(server, body) as r:
        chunks = [e for e in sse_events(r) if e != "[DONE]" and e["choices"]]
    first = chunks[0]["choices"][0]["logprobs"]
    assert first["tokens"] == [decode_token(tok, t) for t in PROMPT]
    assert first["token_logprobs"] == [None, -0.01, -0.02, -0.03]
    after = chunks[1]["choices"][0]["logprobs"]
    assert after["text_offset"][0] == sum(len(t) for t in first["tokens"])  # offsets run on past the prompt
    assert all("prompt_logprobs" not in c["choices"][0] for c in chunks)


def test_stream_refuses_them_as_vllm(setup):
    _, server, _ = setup
    r = post(server, "/v1/completions", {"prompt": "hi", "stream": True, "prompt_logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    with httpx_stream(server, {"prompt": "hi", "max_tokens": 1, "stream": True, "prompt_logprobs": 0}) as r:
        assert r.status_code == 200  # 0 asks for nothing a stream would carry: let through, as vLLM does


def httpx_stream(server, body):
    import httpx

    return httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=10)
