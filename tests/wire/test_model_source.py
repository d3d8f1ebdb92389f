"""wire.model_source: --model as a folder (always wins) or a Hugging Face hub id found offline in the cache
the environment names; an id the cache lacks is one ConfigError naming the folder looked in; never the
network, never torch."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import pytest

from pdserve.wire.errors import ConfigError
from pdserve.wire.model_source import hub_cache_dir, looks_like_hub_id, resolve_model, resolve_model_flag
from tests.harness.hub_cache import HUB_ENV_VARS, hub_env, write_hub_snapshot

REPO = "pdserve-test/tiny-llama"


@pytest.fixture
def source(tmp_path):
    """A stand-in checkpoint folder (resolution looks at the layout, not at the weights)."""
    path = tmp_path / "src"
    (path / "sub").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (path / "sub" / "extra.txt").write_text("x")
    return str(path)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    for name in HUB_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    return str(home)


def test_a_folder_comes_back_as_it_is(source, hf_home):
    assert resolve_model(source) == source


def test_a_folder_wins_over_a_cached_id_of_the_same_spelling(source, hf_home, tmp_path, monkeypatch):
    write_hub_snapshot(os.path.join(hf_home, "hub"), REPO, source)
    (tmp_path / "pdserve-test" / "tiny-llama").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(REPO) == REPO


@pytest.mark.parametrize("symlinks", [True, False])
def test_an_id_resolves_to_its_snapshot_under_hf_home(source, hf_home, symlinks):
    snapshot = write_hub_snapshot(os.path.join(hf_home, "hub"), REPO, source, symlinks=symlinks)
    folder = resolve_model(REPO)
    assert os.path.realpath(folder) == os.path.realpath(snapshot)
    assert os.path.basename(os.path.dirname(folder)) == "snapshots"
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    assert os.path.isfile(os.path.join(folder, "sub", "extra.txt"))


def test_hf_hub_cache_overrides_hf_home(source, hf_home, tmp_path, monkeypatch):
    write_hub_snapshot(os.path.join(hf_home, "hub"), REPO, source)
    other = str(tmp_path / "other-cache")
    monkeypatch.setenv("HF_HUB_CACHE", other)
    assert hub_cache_dir() == other
    with pytest.raises(ConfigError, match="models--pdserve-test--tiny-llama"):
        resolve_model(REPO)  # HF_HOME's cache holds it, but HF_HUB_CACHE names another one
    snapshot = write_hub_snapshot(other, REPO, source)
    assert os.path.realpath(resolve_model(REPO)) == os.path.realpath(snapshot)


def test_a_revision_is_looked_up_in_refs(source, hf_home, tmp_path):
    cache = os.path.join(hf_home, "hub")
    main = write_hub_snapshot(cache, REPO, source)
    (tmp_path / "src" / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    v2 = write_hub_snapshot(cache, REPO, source, revision="v2")
    assert main != v2
    assert os.path.realpath(resolve_model(REPO, revision="v2")) == os.path.realpath(v2)
    assert os.path.realpath(resolve_model(REPO)) == os.path.realpath(main)
    with pytest.raises(ConfigError, match="revision 'v3'"):
        resolve_model(REPO, revision="v3")


def test_an_unknown_id_names_where_it_looked(hf_home):
    where = os.path.join(hf_home, "hub", "models--pdserve-test--no-such-model")
    with pytest.raises(ConfigError) as info:
        resolve_model("pdserve-test/no-such-model")
    message = str(info.value)
    assert where in message and "'pdserve-test/no-such-model'" in message and "--model" in message
    with pytest.raises(ConfigError, match="--tokenizer 'gpt2'"):
        resolve_model("gpt2", "--tokenizer")  # a bare name is an id too (as the hub's gpt2)


def test_a_repo_with_no_ref_is_not_found(source, hf_home):
    write_hub_snapshot(os.path.join(hf_home, "hub"), REPO, source, revision="other")
    with pytest.raises(ConfigError, match="holds no snapshot"):
        resolve_model(REPO)  # refs/main is missing: nothing says which snapshot main is


@pytest.mark.parametrize("path", ["/no/such/folder", "./no-such-folder", "a/b/c", "../up", "x/", ""])
def test_what_is_not_an_id_comes_back_unchanged(path, hf_home):
    """Left for the checkpoint loader to report as a missing folder, as before."""
    assert not looks_like_hub_id(path)
    assert resolve_model(path) == path


def test_ids_are_told_from_paths():
    for good in ("gpt2", "org/name", "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-0.5B", "a_b/c.d"):
        assert looks_like_hub_id(good), good
    for bad in ("org/name/extra", "/org/name", "org//name", "org/-x", ".hidden/x", "org/a--b", "a b/c"):
        assert not looks_like_hub_id(bad), bad


def test_no_network_is_touched(source, hf_home, monkeypatch):
    write_hub_snapshot(os.path.join(hf_home, "hub"), REPO, source)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline by local_files_only alone
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    tried = []

    def refuse(*args, **kwargs):
        tried.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert resolve_model(REPO)
    with pytest.raises(ConfigError):
        resolve_model("pdserve-test/not-cached")
    assert tried == []


def test_flag_resolution_names_the_model_by_the_id(source, hf_home):
    snapshot = write_hub_snapshot(os.path.join(hf_home, "hub"), REPO, source)
    args = argparse.Namespace(model=REPO, served_model_name=[])
    resolve_model_flag(args)
    assert os.path.realpath(args.model) == os.path.realpath(snapshot)
    assert args.served_model_name == [REPO]  # as vLLM: the model is called what the user typed

    args = argparse.Namespace(model=REPO, served_model_name=["alias"])
    resolve_model_flag(args)
    assert args.served_model_name == ["alias"]  # --served-model-name still says

    args = argparse.Namespace(model=source, served_model_name=None)
    resolve_model_flag(args)
    assert (args.model, args.served_model_name) == (source, None)  # a folder: as before

    args = argparse.Namespace(model="pdserve-test/absent", served_model_name=None)
    with pytest.raises(ConfigError, match="models--pdserve-test--absent"):
        resolve_model_flag(args)


def test_the_proxy_resolves_an_id_without_torch(source, tmp_path):
    """`pdserve proxy --model ORG/NAME` parses, resolves (huggingface_hub imported) and names the model by
    the id, with torch never imported."""
    home = str(tmp_path / "hf-home")
    write_hub_snapshot(os.path.join(home, "hub"), REPO, source)
    code = (
        "import argparse, sys\n"
        "from pdserve.proxy.cli import add_proxy_args, config_from_args\n"
        "import pdserve.proxy.app\n"
        "p = argparse.ArgumentParser(); add_proxy_args(p)\n"
        f"cfg = config_from_args(p.parse_args(['--model', {REPO!r}]))\n"
        "assert 'huggingface_hub' in sys.modules\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(cfg.model); print(cfg.served_model_name)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=hub_env(home), timeout=120
    )
    assert out.returncode == 0, out.stderr
    model, name = out.stdout.split()
    assert model.startswith(os.path.realpath(os.path.join(home, "hub", "models--pdserve-test--tiny-llama")))
    assert name == REPO
