"""Every new family served by `pdserve up` over P/D (one prefill node, one decode node, KV over tcp), against
one colocated node of the same checkpoint, through the official openai client: the same text for completions
and chat, the tokens transformers' greedy gives, and, for the sliding-window families, KV shipped only for the
window (the decode node's received bytes are counted against the rule in wire/sliding_window.py)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.wire.sliding_window import shipped_from
from tests.harness.servers import UpCluster, needs_nodes

pytestmark = [pytest.mark.slow, needs_nodes]

FAMILIES = ["mistral", "qwen3", "gemma2", "gemma3", "mixtral", "qwen3_moe"]
MAX_TOKENS = 12
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}
PROMPT = " ".join(
    ["The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun."] * 3
)
CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": PROMPT},
]
RECEIVED = 'pdserve_kv_bytes_received_total{role="consumer",transport="tcp"}'


def hf_greedy(model_dir: str, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def expected_kv_bytes(model_dir: str, num_tokens: int, block_size: int = 16) -> int:
    """(layer, block) pieces the rule ships for a prompt, times one piece's bytes (K and V, fp32)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    from pdserve.engine.checkpoint import load_arch_config

    arch = load_arch_config(model_dir)
    blocks = -(-num_tokens // block_size)
    pieces = sum(blocks - skip for skip in shipped_from(arch.layer_windows, num_tokens, block_size))
    return pieces * 2 * block_size * config["num_key_value_heads"] * config["head_dim"] * 4


@pytest.fixture(scope="module", params=FAMILIES)
def clusters(request, model_dirs, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"family-{family}")
    with ThreadPoolExecutor(2) as pool:
        started = [
            pool.submit(UpCluster, root / name, model_dirs[family], p, 1)
            for name, p in (("pd", 1), ("co", 0))
        ]
        made = []
        for future in started:
            try:
                made.append(future.result())
            except Exception:
                for cluster in made:
                    cluster.stop(check=False)
                raise
    pd, co = made
    try:
        yield family, pd, co
    finally:
        pd.stop()
        co.stop()


def client_of(cluster):
    from openai import OpenAI

    return OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=120)


def test_completion_over_pd_equals_colocated_and_transformers(clusters, model_dirs):
    family, pd, co = clusters
    from pdserve.wire.tokenizer import load_tokenizer

    prompt_ids = load_tokenizer(model_dirs[family]).encode(PROMPT)
    answers = {}
    for name, cluster in (("pd", pd), ("co", co)):
        client = client_of(cluster)
        model = client.models.list().data[0].id
        raw = client.completions.with_raw_response.create(
            model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, **GREEDY
        )
        route = raw.headers["x-pdserve-route"]
        assert route.startswith("disaggregated" if name == "pd" else "colocated"), route
        answers[name] = raw.parse().choices[0]
    assert answers["pd"].text == answers["co"].text
    assert (
        answers["pd"].token_ids
        == answers["co"].token_ids
        == hf_greedy(model_dirs[family], prompt_ids, MAX_TOKENS)
    )
    decode = next(n["name"] for n in pd.info["nodes"] if n["role"] == "decode")
    received = metric(pd.node_metrics(decode), RECEIVED)
    assert received == expected_kv_bytes(model_dirs[family], len(prompt_ids))


def test_chat_over_pd_equals_colocated(clusters):
    _, pd, co = clusters
    texts = []
    for cluster in (pd, co):
        client = client_of(cluster)
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=MAX_TOKENS, **GREEDY)
        assert r.choices[0].finish_reason == "length"
        texts.append(r.choices[0].message.content)
    assert texts[0] == texts[1] and texts[0]
