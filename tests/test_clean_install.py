"""A clean install, as a user makes one: the wheel holds the one package `pdserve`; `pip install .` (not
editable) into an empty venv; then, from a folder outside the checkout, `pdserve make-model`, `pdserve up`,
one completion through the official openai client, and `pdserve bench` against it.

The venv takes the lock's versions as constraints (the lock pins torch's CPU build, which pip finds on local
disk; any other torch would be a multi-GB CUDA download), and only what pdserve itself needs: no test extra.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.harness.servers import UpCluster

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements-cpu.lock"


def run(argv: list, cwd, timeout: float = 900) -> str:
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=clean_env()
    )
    assert result.returncode == 0, f"{argv}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def clean_env() -> dict:
    """This environment minus what would point the new install back at the checkout or this venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def copy_source(dst: pathlib.Path) -> pathlib.Path:
    """The checkout's files as git sees them (tracked, and untracked but not ignored): what a clone holds."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(source copy, built wheel, the empty venv after `pip install .`)."""
    tmp = tmp_path_factory.mktemp("clean")
    src = copy_source(tmp / "src")
    dist = tmp / "dist"
    venv = tmp / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    run([base_python, "-m", "venv", venv], tmp)
    pip = [venv / "bin" / "python", "-m", "pip", "--quiet"]
    run([*pip, "wheel", "--no-deps", "--wheel-dir", dist, src], tmp)
    run([*pip, "install", "--constraint", LOCK, src], tmp)
    return src, next(dist.glob("pdserve-*.whl")), venv


def test_the_wheel_holds_only_pdserve(installed):
    _, wheel, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        top = {name.split("/")[0] for name in zf.namelist()}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"pdserve"}, sorted(top)
    assert len(dist_info) == 1, sorted(top)


def test_the_install_runs_from_outside_the_checkout(installed, tmp_path):
    src, _, venv = installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([venv / "bin" / "python", "-c", "import pdserve; print(pdserve.__file__)"], elsewhere)
    assert pathlib.Path(where.strip()).is_relative_to(venv), where  # the installed copy, not a checkout
    tops = run([venv / "bin" / "python", "-c", PACKAGES_OF_PDSERVE], elsewhere)
    assert json.loads(tops) == ["pdserve"], tops

    pdserve = venv / "bin" / "pdserve"
    run([pdserve, "make-model", "models/tiny", "--family", "llama", "--preset", "tiny"], elsewhere)
    model = str(elsewhere / "models" / "tiny")
    cluster = UpCluster(tmp_path / "up", model, 1, 1, pdserve=(str(pdserve),), cwd=elsewhere)
    try:
        from openai import OpenAI

        client = OpenAI(base_url=cluster.base_url, api_key="unused", timeout=120)
        reply = client.completions.create(
            model=client.models.list().data[0].id, prompt="The quick brown fox", max_tokens=8, temperature=0
        )
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8, reply

        out = run(
            [pdserve, "bench", "--base-url", cluster.url, "--input-len", "24", "--output-len", "4"]
            + ["--num-prompts", "4", "--request-rate", "inf", "--disable-tqdm"],
            elsewhere,
            timeout=300,
        )
        assert re.search(r"Successful requests\s+4\b", out) and re.search(r"Failed requests\s+0\b", out), out
    finally:
        cluster.stop()


PACKAGES_OF_PDSERVE = (
    "import importlib.metadata as m, json; "
    "print(json.dumps(sorted(k for k, v in m.packages_distributions().items() if 'pdserve' in v)))"
)
