"""A Hugging Face hub cache written by hand, in huggingface_hub's layout, for tests of `--model org/name`
(there is no network to download into one):

    <cache>/models--org--name/refs/<revision>        the commit hash (no newline)
    <cache>/models--org--name/blobs/<sha256>         each file's bytes, named by their hash
    <cache>/models--org--name/snapshots/<commit>/F   a relative symlink to ../../blobs/<sha256> (or a copy)
"""

from __future__ import annotations

import hashlib
import os
import shutil

HUB_ENV_VARS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME")


def write_hub_snapshot(
    cache: str, repo_id: str, source: str, revision: str = "main", symlinks: bool = True
) -> str:
    """Put the files of folder `source` into `cache` as snapshot of `repo_id` at `revision`; -> the
    snapshot folder. The commit hash is derived from the files, so the same source gives the same one."""
    files = sorted(
        os.path.relpath(os.path.join(d, f), source) for d, _, names in os.walk(source) for f in names
    )
    commit = hashlib.sha1()
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    blobs = []
    for rel in files:
        with open(os.path.join(source, rel), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        commit.update(f"{rel}\0{digest}\0".encode())
        blobs.append((rel, digest))
    commit_hash = commit.hexdigest()  # 40 hex digits, as a git commit's
    snapshot = os.path.join(repo, "snapshots", commit_hash)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for rel, digest in blobs:
        blob = os.path.join(repo, "blobs", digest)
        if not os.path.exists(blob):
            shutil.copyfile(os.path.join(source, rel), blob)
        target = os.path.join(snapshot, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.lexists(target):
            os.remove(target)
        if symlinks:
            os.symlink(os.path.relpath(blob, os.path.dirname(target)), target)
        else:
            shutil.copyfile(blob, target)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", revision), "w") as f:
        f.write(commit_hash)
    return snapshot


def hub_env(hf_home: str, base: dict | None = None) -> dict:
    """An environment whose hub cache is <hf_home>/hub and nothing else (no other cache variable set)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in HUB_ENV_VARS}
    env["HF_HOME"] = hf_home
    return env
