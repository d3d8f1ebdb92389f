"""Bad input at the command line: one clear error line and exit status 2, never a traceback."""

import json
import os
import shutil
import subprocess
import sys

import pytest


def pdserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pdserve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_missing_model_folder(tmp_path):
    assert_one_line_error(
        pdserve("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"), "does not exist"
    )


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    assert_one_line_error(
        pdserve("generate", "--model", str(tmp_path), "--prompt", "hi"), "GPT2LMHeadModel", "not supported"
    )


def test_corrupt_weights(tmp_path, model_dirs):
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["llama"], broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    assert_one_line_error(pdserve("generate", "--model", str(broken), "--prompt", "hi"), "model.safetensors")


def test_prompt_longer_than_max_model_len(model_dirs):
    result = pdserve(
        "generate",
        "--model",
        model_dirs["llama"],
        "--max-model-len",
        "20",
        "--max-tokens",
        "4",
        "--prompt",
        "word " * 40,
    )
    assert_one_line_error(result, "--max-model-len 20")


@pytest.mark.parametrize(
    "flag,value", [("--block-size", "12"), ("--max-num-seqs", "0"), ("--kv-transfer-config", "{not json")]
)
def test_bad_flags(model_dirs, flag, value):
    assert_one_line_error(
        pdserve("generate", "--model", model_dirs["llama"], flag, value, "--prompt", "hi"), flag
    )


def test_generate_prints_text(model_dirs):
    result = pdserve(
        "generate",
        "--model",
        model_dirs["llama"],
        "--prompt",
        "Hello",
        "--max-tokens",
        "5",
        "--ignore-eos",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(record["token_ids"]) == 5 and record["finish_reason"] == "length"
