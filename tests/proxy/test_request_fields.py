"""Every vLLM request field is honoured or refused by name, at the proxy (FakeNode behind it): refused fields
answer 400 naming them; honoured ones reach the node in the Generate's params or shape its prompt
(chat_template_kwargs, continue_final_message, add_special_tokens, truncate_prompt_tokens, --chat-template,
--generation-config); echo, request_id and continuous_usage_stats shape the response; unknown keys pass."""

from __future__ import annotations

import json

import pytest

from pdserve.wire.node_messages import Generate
from tests.proxy.test_api import post, sse_events

TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
MSGS = [{"role": "user", "content": "hi there"}]


@pytest.fixture
def node_and_proxy(fake_nodes, proxy_factory, tmp_path, tokenizer_dir):
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generation_config.json").write_text(
        json.dumps({"temperature": 0.3, "top_k": 7, "do_sample": True})
    )
    node = fake_nodes("d0", "both")
    server = proxy_factory([node], chat_template=TEMPLATE, generation_config=str(gen))
    server.wait_nodes(1)
    return node, server


def last_generate(node) -> Generate:
    return node.messages(Generate)[-1]


@pytest.mark.parametrize(
    "field,value",
    [
        ("use_beam_search", True),
        ("logits_processors", ["my.module:Proc"]),
        ("prompt_logprobs", -1),  # vLLM's whole vocabulary: not served
        ("prompt_logprobs", -2),
        ("prompt_logprobs", 21),
        ("prompt_logprobs", "3"),
        ("prompt_logprobs", 1.5),
        ("priority", 3),
        ("length_penalty", 0.5),
        ("return_tokens_as_token_ids", True),
        ("kv_transfer_params", {"do_remote_decode": True}),
        ("structural_tag", "{}"),
        ("chat_template", "{{ messages }}"),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
        ("response_format", {"type": "yaml"}),
        ("guided_regex", "(unclosed"),
        ("guided_json", {"type": "object", "properties": {"a": {"type": "nosuchtype"}}}),
        ("logit_bias", {"99999": 1}),
        ("allowed_token_ids", [5, 99999]),
        ("bad_words", [""]),
        ("cache_salt", ""),
        ("presence_penalty", 3),
        ("repetition_penalty", 0),
        ("truncate_prompt_tokens", 0),
    ],
)
def test_refused_fields_name_themselves(node_and_proxy, field, value):
    _, server = node_and_proxy
    r = post(server, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.text
    assert field in r.json()["error"]["message"]


def test_honoured_fields_reach_the_node(node_and_proxy):
    node, server = node_and_proxy
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = {
        "prompt": "hello",
        "max_tokens": 2,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.2,
        "logit_bias": {"17": 5, "18": -300},
        "allowed_token_ids": [17, 18, 19],
        "bad_words": ["hello"],
        "cache_salt": "tenant-1",
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        "priority": 0,
        "some_future_field": 1,  # unknown: logged once, ignored
    }
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    p = last_generate(node).params
    assert (p["presence_penalty"], p["frequency_penalty"], p["repetition_penalty"]) == (0.5, -0.5, 1.2)
    assert p["logit_bias"] == {17: 5.0, 18: -100.0}  # clamped to OpenAI's range
    assert p["allowed_token_ids"] == [17, 18, 19] and p["cache_salt"] == "tenant-1"
    assert p["bad_words"] == ["hello"] and p["bad_words_token_ids"]
    assert p["structured"] == {"json": schema}
    assert (p["temperature"], p["top_k"]) == (0.3, 7)  # --generation-config defaults
    for field, spec in [
        ("guided_json", {"json": schema}),
        ("guided_regex", {"regex": "[ab]+"}),
        ("guided_choice", {"choice": ["x", "y"]}),
        ("guided_grammar", {"grammar": 'start: "a"+'}),
        ("guided_grammar", {"grammar": 'root ::= "a" "b"*'}),  # GBNF, as xgrammar takes it
    ]:
        value = next(iter(spec.values()))
        r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value, "temperature": 1})
        assert r.status_code == 200, r.text
        assert last_generate(node).params["structured"] == spec
        assert last_generate(node).params["temperature"] == 1.0  # the request's value beats the default
    r = post(
        server,
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 2, "guided_json": schema, "guided_regex": "a"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] in ("guided_json", "guided_regex")


def test_chat_template_fields_shape_the_prompt(node_and_proxy):
    node, server = node_and_proxy
    tok = server.state.tokenizer

    def prompt_of(**body) -> list[int]:
        r = post(server, "/v1/chat/completions", {"max_tokens": 2, **body})
        assert r.status_code == 200, r.text
        return last_generate(node).prompt_token_ids

    assert prompt_of(messages=MSGS) == tok.encode(
        "<user>hi there</user><assistant>", add_special_tokens=False
    )
    no_think = prompt_of(messages=MSGS, chat_template_kwargs={"enable_thinking": False})
    assert no_think == tok.encode("<user>hi there</user><no-think><assistant>", add_special_tokens=False)
    cont = prompt_of(
        messages=MSGS + [{"role": "assistant", "content": "The answer is"}], continue_final_message=True
    )
    assert cont == tok.encode("<user>hi there</user><assistant>The answer is", add_special_tokens=False)
    special = prompt_of(messages=MSGS, add_special_tokens=True)
    assert special == tok.encode("<user>hi there</user><assistant>", add_special_tokens=True)
    r = post(
        server,
        "/v1/chat/completions",
        {"messages": MSGS + [{"role": "assistant", "content": "Sure:"}], "max_tokens": 2, "echo": True},
    )
    assert r.json()["choices"][0]["message"]["content"].startswith("Sure:")
    cut = prompt_of(messages=MSGS, truncate_prompt_tokens=3)
    assert cut == tok.encode("<user>hi there</user><assistant>", add_special_tokens=False)[-3:]


def test_completion_extensions(node_and_proxy):
    node, server = node_and_proxy
    tok = server.state.tokenizer
    r = post(
        server,
        "/v1/completions",
        {"prompt": "hello world", "max_tokens": 3, "echo": True, "request_id": "abc"},
    )
    body = r.json()
    assert body["id"] == "cmpl-abc"
    assert body["choices"][0]["text"].startswith("hello world") and len(body["choices"][0]["text"]) > 11
    r = post(
        server, "/v1/completions", {"prompt": "hello world", "max_tokens": 2, "add_special_tokens": False}
    )
    assert last_generate(node).prompt_token_ids == tok.encode("hello world", add_special_tokens=False)
    r = post(
        server, "/v1/completions", {"prompt": "a b c d e f", "max_tokens": 2, "truncate_prompt_tokens": 2}
    )
    assert last_generate(node).prompt_token_ids == tok.encode("a b c d e f")[-2:]
    with __import__("httpx").stream(
        "POST",
        server.url + "/v1/completions",
        json={
            "prompt": "hi",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
        timeout=10,
    ) as resp:
        events = [e for e in sse_events(resp) if e != "[DONE]"]
    token_chunks = [e for e in events if e["choices"]]
    assert token_chunks and all(e["usage"] is not None for e in token_chunks)
    assert [e["usage"]["completion_tokens"] for e in token_chunks] == sorted(
        e["usage"]["completion_tokens"] for e in token_chunks
    )
