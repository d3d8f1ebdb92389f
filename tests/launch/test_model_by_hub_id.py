"""`--model org/name`, as vLLM takes it: every command (generate, prefill/decode, proxy, up, bench's
--tokenizer) and `LLM(model=...)` find a hub id in the local Hugging Face cache ($HF_HOME), offline, and serve
it under the id; an id the cache lacks is one error line, exit status 2, naming the folder looked in.

There is no network here, so the cache is written by the test, in huggingface_hub's layout, holding the tiny
llama checkpoint (tests/harness/hub_cache.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from pdserve.wire.errors import ConfigError
from tests.harness.hub_cache import HUB_ENV_VARS, hub_env, write_hub_snapshot
from tests.harness.servers import ROOT, UpCluster, free_port, needs_nodes, running, stop_process, wait_for

REPO = "pdserve-test/tiny-llama"
ABSENT = "pdserve-test/not-downloaded"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, model_dir) -> str:
    """An HF_HOME whose hub cache holds the tiny llama as pdserve-test/tiny-llama (blobs + symlinks)."""
    home = str(tmp_path_factory.mktemp("hf-home"))
    write_hub_snapshot(os.path.join(home, "hub"), REPO, model_dir)
    return home


@pytest.fixture
def hub_environ(hf_home, monkeypatch) -> str:
    """This process's environment names the test cache (children started from here inherit it)."""
    for name in HUB_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", hf_home)
    return hf_home


def snapshot_of(hf_home: str) -> str:
    return os.path.join(hf_home, "hub", "models--pdserve-test--tiny-llama", "snapshots")


def absent_dir(hf_home: str) -> str:
    return os.path.join(hf_home, "hub", "models--pdserve-test--not-downloaded")


def pdserve(hf_home: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pdserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**hub_env(hf_home), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""},
    )


def assert_names_where_it_looked(result: subprocess.CompletedProcess, hf_home: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert absent_dir(hf_home) in errors[0] and repr(ABSENT) in errors[0], errors[0]


@pytest.fixture(scope="module")
def reference_ids(model_dir) -> list[int]:
    """Greedy token ids of the tiny llama, loaded from its folder."""
    from pdserve.engine.llm import LLM
    from pdserve.wire.sampling_params import SamplingParams

    llm = LLM(model=model_dir, device="cpu", dtype="float32")
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    return list(out[0].outputs[0].token_ids)


# ------------------------------------------------------------------------------------------------ generate


def test_generate_by_hub_id(hf_home, reference_ids):
    result = pdserve(
        hf_home,
        "generate",
        "--model",
        REPO,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--prompt",
        PROMPT,
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["token_ids"] == reference_ids  # the same checkpoint as the folder


def test_generate_with_an_id_not_in_the_cache(hf_home):
    result = pdserve(hf_home, "generate", "--model", ABSENT, "--device", "cpu", "--prompt", "hi")
    assert_names_where_it_looked(result, hf_home)


def test_generate_with_a_missing_folder_still_says_so(hf_home, tmp_path):
    result = pdserve(hf_home, "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert result.returncode == 2 and "does not exist" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------- offline LLM


def test_llm_by_hub_id(hub_environ, reference_ids):
    from pdserve.engine.llm import LLM
    from pdserve.wire.sampling_params import SamplingParams

    llm = LLM(model=REPO, device="cpu", dtype="float32")
    assert llm.config.model.model.startswith(snapshot_of(hub_environ))
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert list(out[0].outputs[0].token_ids) == reference_ids


def test_llm_with_an_id_not_in_the_cache(hub_environ):
    from pdserve.engine.llm import LLM

    with pytest.raises(ConfigError) as info:
        LLM(model=ABSENT, device="cpu")
    assert absent_dir(hub_environ) in str(info.value)


# -------------------------------------------------------------------------------------------------- proxy


def _models(url: str):
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
            return json.load(r)
    except OSError:
        return None


def test_proxy_serves_a_hub_id_under_its_name(hf_home, tmp_path):
    port = free_port()
    log_path = tmp_path / "proxy.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve", "proxy", "--model", REPO, "--port", str(port)],
            cwd=ROOT,
            env={**hub_env(hf_home), "PDSERVE_KV_SECRET": "hub-id-test-secret"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        models = wait_for(
            lambda: _models(url) or (proc.poll() is not None and {"exited": log_path.read_text()}),
            60,
            what="the proxy's /v1/models",
        )
        assert "exited" not in models, models
        assert [m["id"] for m in models["data"]] == [REPO]  # the id typed, as vLLM lists it
        assert models["data"][0]["root"].startswith(snapshot_of(hf_home))
    finally:
        stop_process(proc)


def test_proxy_with_an_id_not_in_the_cache(hf_home):
    result = pdserve(hf_home, "proxy", "--model", ABSENT, "--port", "0", timeout=60)
    assert_names_where_it_looked(result, hf_home)


# -------------------------------------------------------------------------------------------------- nodes


@needs_nodes
@pytest.mark.slow
def test_decode_node_by_hub_id(hub_environ, tmp_path):
    from tests.harness.nodes import start_node, wait_healthy

    node = start_node("decode", REPO, str(tmp_path))
    try:
        wait_healthy(node)
        with urllib.request.urlopen(node.http + "/metrics", timeout=5) as r:
            text = r.read().decode()
        assert re.search(rf'^vllm:\w+\{{[^}}]*model_name="{re.escape(REPO)}"', text, re.M), text[:2000]
    finally:
        node.stop()


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_node_with_an_id_not_in_the_cache(hf_home, role):
    result = pdserve(hf_home, role, "--model", ABSENT, "--device", "cpu", timeout=120)
    assert_names_where_it_looked(result, hf_home)


# ----------------------------------------------------------------------------------------------------- up


@needs_nodes
@pytest.mark.slow
def test_up_resolves_once_and_serves_the_id(hub_environ, tmp_path):
    """The parent resolves; every child gets the snapshot folder, and the id as its served name."""
    with running(UpCluster(tmp_path / "up", REPO, 0, 1, ("--device", "cpu"))) as cluster:
        folder = cluster.info["model"]
        assert folder.startswith(snapshot_of(hub_environ)), folder
        for pid in [n["pid"] for n in cluster.info["nodes"]] + [cluster.info["proxy"]["pid"]]:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")
            assert argv[argv.index("--model") + 1] == folder
            assert argv[argv.index("--served-model-name") + 1] == REPO
        models = _models(cluster.url)
        assert [m["id"] for m in models["data"]] == [REPO]
        body = json.dumps({"model": REPO, "prompt": PROMPT, "max_tokens": 3, "temperature": 0}).encode()
        request = urllib.request.Request(
            cluster.base_url + "/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            reply = json.load(r)
        assert reply["model"] == REPO and reply["choices"][0]["finish_reason"] == "length"


def test_up_with_an_id_not_in_the_cache(hf_home, tmp_path):
    result = pdserve(
        hf_home, "up", "--model", ABSENT, "--device", "cpu", "--log-dir", str(tmp_path), timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert absent_dir(hf_home) in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".log")]  # nothing was started


# -------------------------------------------------------------------------------------------------- bench


def test_bench_tokenizer_by_hub_id(hub_environ, model_dir):
    from pdserve.benchmarks.workloads import load_tokenizer

    by_id, by_folder = load_tokenizer(REPO), load_tokenizer(model_dir)
    assert by_id.get_vocab() == by_folder.get_vocab()
    assert load_tokenizer(os.path.join(model_dir, "tokenizer.json")).get_vocab() == by_folder.get_vocab()
    with pytest.raises(ConfigError, match=re.escape(absent_dir(hub_environ))):
        load_tokenizer(ABSENT)


def test_bench_with_a_tokenizer_id_not_in_the_cache(hf_home):
    port = free_port()  # nothing listens: the tokenizer is refused before any request
    result = pdserve(
        hf_home, "bench", "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", ABSENT, timeout=60
    )
    assert_names_where_it_looked(result, hf_home)
    assert "--tokenizer" in result.stderr
