"""The proxy's HTTP surface through a real uvicorn: validation, error statuses, auth, models, health, metrics,
streaming and JSON relaying, n, stop strings, logprobs, usage, timings, disconnects and retries.

The nodes here are FakeNodes (real ZMQ sockets and signed frames, scripted answers), so every proxy behaviour
is checked fast and exactly; test_proxy_cluster.py runs the same paths against real nodes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from pdserve.wire.node_messages import Abort, Generate
from tests.harness.fake_node import Script
from tests.harness.servers import ROOT, wait_for


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=kw.pop("timeout", 10), **kw)


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_proxy_import_is_torch_free():
    code = (
        "import sys; import pdserve.proxy.app, pdserve.proxy.cli, pdserve.proxy.redis_index, "
        "pdserve.wire.node_messages; "
        "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.fixture
def one_node(fake_nodes, proxy_factory):
    node = fake_nodes("d0", "both")
    server = proxy_factory([node])
    server.wait_nodes(1)
    return node, server


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "temperature": 3}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "logprobs": 50}, "logprobs"),
        ({"prompt": "hi", "stop": [1, 2]}, "stop"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"prompt": "hi", "seed": "x"}, "seed"),
        ({"prompt": "hi", "top_k": -5}, "top_k"),
        ({"prompt": "hi", "seed": 2**70}, "seed"),  # past int64: the wire could not carry it
        ({"prompt": "hi", "top_k": 2**64}, "top_k"),
        ({"prompt": "hi", "stop_token_ids": [2**65]}, "stop_token_ids"),
        ({"prompt": "hi", "presence_penalty": 5}, "presence_penalty"),  # outside OpenAI's [-2, 2]
        ({"prompt": "hi", "stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, 2, 99999]}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_completion_bad_params_are_400(one_node, body, param):
    _, server = one_node
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_chat_bad_params_are_400(one_node, body, param):
    _, server = one_node
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_json_is_400(one_node):
    _, server = one_node
    r = httpx.post(
        server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"[1, 2]")
    assert r.status_code == 400


def test_unknown_model_is_404(one_node):
    _, server = one_node
    r = post(server, "/v1/completions", {"model": "gpt-17", "prompt": "hi"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    name = server.state.model_name
    assert (
        post(server, "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2}).status_code == 200
    )


def test_prompt_over_max_model_len_is_400(one_node):
    _, server = one_node
    long_prompt = list(range(10, 10 + 250))  # max_position_embeddings is 256
    r = post(server, "/v1/completions", {"prompt": long_prompt, "max_tokens": 10})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(server, "/v1/completions", {"prompt": list(range(10, 10 + 256)), "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert post(server, "/v1/completions", {"prompt": long_prompt, "max_tokens": 6}).status_code == 200


def test_api_key(fake_nodes, proxy_factory):
    node = fake_nodes("d0", "both")
    server = proxy_factory([node], api_key="sekrit")
    server.wait_nodes(1)
    body = {"prompt": "hi", "max_tokens": 2}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert post(server, "/v1/completions", body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(server.url + "/v1/models").status_code == 401
    ok = {"Authorization": "Bearer sekrit"}
    assert post(server, "/v1/completions", body, headers=ok).status_code == 200
    assert httpx.get(server.url + "/v1/models", headers=ok).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_no_live_node_is_503(proxy_factory, fake_nodes):
    server = proxy_factory([])
    r = post(server, "/v1/completions", {"prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_live_node"
    assert httpx.get(server.url + "/health").status_code == 503


def test_queue_full_is_429(fake_nodes, proxy_factory):
    node = fake_nodes("d0", "both")
    node.script = Script(hang=True)
    server = proxy_factory([node], max_queue=1)
    server.wait_nodes(1)
    import threading

    t = threading.Thread(
        target=lambda: _ignore(lambda: post(server, "/v1/completions", {"prompt": "hi"}, timeout=3))
    )
    t.start()
    wait_for(lambda: server.state.inflight == 1, 5, what="one request in flight")
    r = post(server, "/v1/completions", {"prompt": "hi"})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    t.join()


def _ignore(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001
        pass


def test_node_errors_pass_through(fake_nodes, proxy_factory):
    node = fake_nodes("d0", "both")
    node.script = Script(error=(429, "the node's queue is full", False))
    server = proxy_factory([node])
    server.wait_nodes(1)
    r = post(server, "/v1/completions", {"prompt": "hi"})
    assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]


def test_models_health_metrics(one_node):
    node, server = one_node
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == server.state.model_name
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["nodes"][0]["node_id"] == "d0"
    post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    text = httpx.get(server.url + "/metrics").text
    assert 'pdserve_proxy_requests_total{endpoint="completions",status="200"} 1.0' in text
    assert 'pdserve_proxy_nodes_live{role="both"} 1.0' in text
    assert "pdserve_proxy_routing_decisions_total" in text


# --------------------------------------------------------------------------------------------------- relaying


def test_completion_json(one_node, tokenizer_dir):
    from pdserve.wire.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    node, server = one_node
    node.script = Script(cached_tokens=3)
    r = post(server, "/v1/completions", {"prompt": "hello world", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["text"] == tok.decode([300, 301, 302, 303, 304]) and choice["finish_reason"] == "length"
    prompt_len = len(tok.encode("hello world"))
    assert body["usage"] == {
        "prompt_tokens": prompt_len,
        "completion_tokens": 5,
        "total_tokens": prompt_len + 5,
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    timings = json.loads(r.headers["x-pdserve-timings"])
    assert timings["transfer"] == pytest.approx(0.003) and timings["total"] > 0
    assert "colocated:d0->d0" in r.headers["x-pdserve-route"]
    gen = node.messages(Generate)[-1]
    assert gen.prompt_token_ids == tok.encode("hello world") and gen.mode == "colocated"
    assert gen.params["temperature"] == 0 and gen.params["max_tokens"] == 5 and 0 < gen.deadline_s <= 600


def test_chat_stream_with_usage(one_node, tokenizer_dir):
    from pdserve.wire.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    node, server = one_node
    node.script = Script(per_message=2, delay_s=0.01)
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == tok.decode(list(range(300, 307)))
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 7
    assert usage["prompt_tokens"] == len(tok.encode_chat([{"role": "user", "content": "hi"}]))
    assert set(usage["pdserve_timings"]) >= {
        "prefill_queue",
        "prefill",
        "transfer",
        "exposed_transfer",
        "decode_queue",
        "ttft",
        "total",
    }
    gen = node.messages(Generate)[-1]
    assert gen.prompt_token_ids == tok.encode_chat([{"role": "user", "content": "hi"}])


def test_stream_without_usage_puts_timings_on_the_last_chunk(one_node):
    _, server = one_node
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True}
    ) as r:
        events = sse_events(r)
    last = events[-2]
    assert last["choices"][0]["finish_reason"] == "length" and "pdserve_timings" in last["usage"]
    assert all("usage" not in e for e in events[:-2])


def test_stop_string_cuts_and_aborts(one_node, tokenizer_dir):
    from pdserve.wire.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    node, server = one_node
    ids = tok.encode("one two three four five six seven", add_special_tokens=False)
    node.script = Script(tokens=ids + ids, delay_s=0.02)
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2 * len(ids), "stop": [" four"]})
    choice = r.json()["choices"][0]
    assert choice["text"] == "one two three" and choice["finish_reason"] == "stop"
    assert r.json()["usage"]["completion_tokens"] < len(ids)
    wait_for(lambda: node.messages(Abort), 5, what="abort after the stop string")
    # streamed: no delta ever shows text past the stop
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"prompt": "x", "max_tokens": 2 * len(ids), "stop": " four", "stream": True},
    ) as r:
        events = sse_events(r)
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert text == "one two three"


def test_n_seeded_fans_out(one_node):
    node, server = one_node
    body = {"prompt": "x", "max_tokens": 4, "n": 3, "seed": 11, "temperature": 1.0}
    first = post(server, "/v1/completions", body).json()
    again = post(server, "/v1/completions", body).json()
    texts = [c["text"] for c in sorted(first["choices"], key=lambda c: c["index"])]
    assert texts == [c["text"] for c in sorted(again["choices"], key=lambda c: c["index"])]
    assert len(set(texts)) == 3  # seed + j: samples differ
    seeds = sorted(m.params["seed"] for m in node.messages(Generate)[-3:])
    assert seeds == [11, 12, 13] and all(m.params["n"] == 1 for m in node.messages(Generate))
    assert first["usage"]["completion_tokens"] == 12


def test_batch_prompts(one_node):
    _, server = one_node
    r = post(server, "/v1/completions", {"prompt": ["a", "b c"], "max_tokens": 2, "n": 2}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]


def test_logprobs_shapes(one_node):
    node, server = one_node
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3, "logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and lp["token_logprobs"] == [-0.5] * 3
    assert all(len(t) == 2 for t in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    assert node.messages(Generate)[-1].params["logprobs"] == 2
    r = post(
        server,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 1,
        },
    ).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and content[0]["logprob"] == -0.5 and len(content[0]["top_logprobs"]) == 1
    assert isinstance(content[0]["bytes"], list)
    r = post(
        server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    )
    assert r.json()["choices"][0]["logprobs"] is None
    assert node.messages(Generate)[-1].params["logprobs"] is None


def test_client_disconnect_aborts(fake_nodes, proxy_factory):
    node = fake_nodes("d0", "both")
    node.script = Script(delay_s=0.2)
    server = proxy_factory([node])
    server.wait_nodes(1)
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 200, "stream": True}
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    aborts = wait_for(lambda: node.messages(Abort), 5, what="abort after disconnect")
    assert aborts[0].request_id.startswith("cmpl-")
    # non-streaming: hang up while the node is still generating
    node.script = Script(hang=True)
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", {"prompt": "x", "max_tokens": 5}, timeout=0.5)
    wait_for(lambda: len(node.messages(Abort)) >= 2, 5, what="abort after a JSON client left")
    wait_for(lambda: server.state.inflight == 0, 5, what="queue slot released")


def test_retryable_error_goes_to_another_prefill_node(fake_nodes, proxy_factory):
    p0 = fake_nodes("p0", "prefill")
    p1 = fake_nodes("p1", "prefill")
    d0 = fake_nodes("d0", "decode")
    server = proxy_factory([p0, p1, d0], router={"disagg_min_tokens": 4})
    server.wait_nodes(3)
    ok, fail = Script(), Script(error=(503, "prefill node died before the first token", True))
    d0._script_for = lambda rid: ok if rid.endswith(".r1") else fail
    r = post(
        server, "/v1/completions", {"prompt": "a long enough prompt for disaggregation", "max_tokens": 3}
    )
    assert r.status_code == 200, r.text
    gens = d0.messages(Generate)
    assert len(gens) == 2 and gens[1].request_id == gens[0].request_id + ".r1"
    assert gens[0].mode == gens[1].mode == "disaggregated" and gens[0].prefill_rpc != gens[1].prefill_rpc
    assert (
        'pdserve_proxy_retries_total{reason="node_error_503"} 1.0' in httpx.get(server.url + "/metrics").text
    )


def test_dead_decode_node_gives_clear_error(fake_nodes, proxy_factory):
    d0 = fake_nodes("d0", "both")
    d0.script = Script(delay_s=0.05)
    server = proxy_factory([d0], request_timeout_s=30)
    server.wait_nodes(1)
    import threading

    result = {}
    t = threading.Thread(
        target=lambda: result.setdefault(
            "r", post(server, "/v1/completions", {"prompt": "x", "max_tokens": 200}, timeout=20)
        )
    )
    t.start()
    wait_for(lambda: d0.messages(Generate), 5, what="the request reaching the node")
    time.sleep(0.2)
    d0.beating = False
    d0.script = Script(hang=True)
    d0.active.clear()  # the node stops streaming, as a killed one would
    started = time.monotonic()
    t.join(15)
    assert not t.is_alive()
    r = result["r"]
    assert r.status_code == 503 and "stopped responding" in r.json()["error"]["message"]
    assert time.monotonic() - started < 5
    assert httpx.get(server.url + "/health").status_code == 503
