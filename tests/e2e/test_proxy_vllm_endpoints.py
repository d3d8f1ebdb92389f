"""vLLM's small endpoints on the proxy: /tokenize, /detokenize, /version, /ping; several --served-model-name;
--max-logprobs. Errors are OpenAI-shaped with the right status."""

from __future__ import annotations

import httpx
import pytest


@pytest.fixture
def server(fake_nodes, proxy_factory):
    node = fake_nodes("d0", "both")
    server = proxy_factory([node], served_model_names=("main-name", "alias"), max_logprobs=2)
    server.wait_nodes(1)
    return server


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=10)


def test_tokenize_and_detokenize_round_trip(server):
    r = post(server, "/tokenize", {"model": "alias", "prompt": "Hello world", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0 and len(body["token_strs"]) == body["count"]
    assert body["max_model_len"] > 0
    text = post(server, "/detokenize", {"model": "main-name", "tokens": body["tokens"]}).json()["prompt"]
    assert "Hello world" in text
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 0 and chat["token_strs"] is None


@pytest.mark.parametrize(
    "path,body,status",
    [
        ("/tokenize", {"prompt": 3}, 400),
        ("/tokenize", {}, 400),
        ("/tokenize", {"prompt": "x", "messages": []}, 400),
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404),
        ("/detokenize", {"tokens": [10**9]}, 400),
        ("/detokenize", {"tokens": "abc"}, 400),
    ],
)
def test_bad_tokenize_requests(server, path, body, status):
    r = post(server, path, body)
    assert r.status_code == status
    assert "error" in r.json()


def test_version_ping_models(server):
    assert httpx.get(server.url + "/version", timeout=5).json()["version"]
    assert httpx.get(server.url + "/ping", timeout=5).status_code == 200
    assert httpx.post(server.url + "/ping", timeout=5).status_code == 200
    ids = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=5).json()["data"]]
    assert ids == ["main-name", "alias"]


def test_ping_is_503_without_nodes(proxy_factory):
    server = proxy_factory([])
    assert httpx.get(server.url + "/ping", timeout=5).status_code == 503


def test_max_logprobs(server):
    r = post(server, "/v1/completions", {"model": "alias", "prompt": "hi", "max_tokens": 2, "logprobs": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = post(server, "/v1/completions", {"model": "alias", "prompt": "hi", "max_tokens": 2, "logprobs": 2})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "main-name"
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "prompt_logprobs": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
    chat = {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 3}
    r = post(server, "/v1/chat/completions", chat)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
