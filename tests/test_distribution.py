"""pdserve installs one top-level name, `pdserve`, and lives beside what its users also import.

transformers 5.25 found the repository's old top-level `kernels` package, took it for Hugging Face's kernel
hub library (the `kernels` distribution, a dependency of transformers since 5.25), and imported names from it:
the suite failed on a fresh machine. These tests keep it from coming back: the distribution maps no other
name, no folder at the repository's root could be imported in place of a dependency, and transformers loads
and generates beside pdserve in one process, with Hugging Face's `kernels` installed and without it.
"""

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Folders at the repository's root that are not installed; each must stay out of the import namespace of any
# dependency (a `tests` or `bench` package of a dependency would be shadowed when the root is on sys.path).
ROOT_FOLDERS_NOT_INSTALLED = {"tests", "bench", "deploy", "docs", "models"}


def test_the_distribution_maps_only_pdserve():
    names = sorted(
        name for name, dists in importlib.metadata.packages_distributions().items() if "pdserve" in dists
    )
    assert names == ["pdserve"], names


def test_no_folder_at_the_root_is_a_package_but_pdserve_and_the_uninstalled_ones():
    """A new top-level package would go into the import path of anyone running from a checkout."""
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= {"pdserve"} | ROOT_FOLDERS_NOT_INSTALLED, sorted(packages)


def test_no_dependency_is_shadowed_by_a_root_folder():
    """The root's uninstalled packages must not bear a name that an installed distribution provides."""
    provided = importlib.metadata.packages_distributions()
    clashes = {name: provided[name] for name in ROOT_FOLDERS_NOT_INSTALLED if name in provided}
    assert not clashes, clashes


# Runs in a fresh interpreter, with the repository root first on sys.path (as for anyone running from a
# checkout, where the old top-level `kernels` was found): transformers and pdserve in one process, the same
# greedy tokens from both. argv: case, checkpoint, repository root[, a site-packages folder to use instead].
COEXIST = """
import importlib.metadata, importlib.util, pathlib, site, sys
case, path, root, *view = sys.argv[1:]
if view:
    site.addsitedir(view[0])  # runs under -S: this folder, .pth files included, is all of site-packages
sys.path.insert(0, root)
import torch, transformers
from transformers.utils import import_utils
spec = importlib.util.find_spec("kernels")
if case == "with-kernels":
    where = pathlib.Path(importlib.metadata.distribution("kernels").locate_file(""))
    assert spec is not None and pathlib.Path(spec.origin).is_relative_to(where), (spec, where)
else:
    assert spec is None, spec
assert import_utils.is_kernels_available() == (case == "with-kernels")
from transformers import AutoModelForCausalLM, AutoTokenizer
from pdserve import LLM, SamplingParams
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
ids = tok("The quick brown fox", return_tensors="pt").input_ids
hf = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
ours = LLM(model=path, device="cpu", dtype="float32").generate(
    [{"prompt_token_ids": ids[0].tolist()}], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
)[0].outputs[0].token_ids
assert list(ours) == hf, (ours, hf)
print("ok", transformers.__version__, hf)
"""


def site_without(tmp_path: pathlib.Path, distribution: str) -> pathlib.Path:
    """A view of this environment's site-packages without one distribution: a folder of links to every entry
    but that distribution's files and metadata, as if it had never been installed."""
    dist = importlib.metadata.distribution(distribution)
    site = pathlib.Path(dist.locate_file(""))
    hidden = {pathlib.PurePath(str(f)).parts[0] for f in dist.files or ()}
    assert hidden, f"{distribution} lists no files"
    view = tmp_path / "site-packages"
    view.mkdir()
    for entry in site.iterdir():
        if entry.name not in hidden:
            (view / entry.name).symlink_to(entry)
    return view


def run_coexist(tmp_path: pathlib.Path, model_dir: str, case: str, view: list[str], **env_vars: str) -> str:
    script = tmp_path / "coexist.py"
    script.write_text(COEXIST)
    flags = ["-S"] if view else []
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env_vars)
    result = subprocess.run(
        [sys.executable, *flags, str(script), case, model_dir, str(ROOT), *view],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok"), result.stdout
    return result.stdout


@pytest.mark.slow
def test_transformers_generates_beside_pdserve_with_hub_kernels_installed(model_dir, tmp_path):
    """transformers' defaults: since 5.25 it kernelizes layers with the hub's kernels whenever it can."""
    pytest.importorskip("kernels", reason="Hugging Face's kernels distribution is not installed here")
    run_coexist(tmp_path, model_dir, "with-kernels", [])


@pytest.mark.slow
def test_transformers_generates_beside_pdserve_without_hub_kernels(model_dir, tmp_path):
    """Without the distribution, transformers 5.25 refuses from_pretrained unless hub kernels are switched off
    (USE_HUB_KERNELS=NO, as its own test utilities do); before 5.25 that was the default."""
    try:
        view = [str(site_without(tmp_path, "kernels"))]
    except importlib.metadata.PackageNotFoundError:
        view = []  # not installed to begin with: this environment is the case itself
    run_coexist(tmp_path, model_dir, "without-kernels", view, USE_HUB_KERNELS="NO")
