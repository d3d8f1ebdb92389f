"""Where a model lives: a local folder, or a Hugging Face hub id (`org/name`) already in the local hub cache.

Every command resolves its --model once, where it parses it, so everything after sees a folder. The lookup
never goes to the network (huggingface_hub's `local_files_only`): a model must be downloaded beforehand, into
the cache the environment names ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub). Torch-free:
the proxy resolves its --model here too.
"""

from __future__ import annotations

import argparse
import os
import re

from pdserve.wire.errors import ConfigError

# A hub repo id: `name` or `org/name`, of letters, digits, `-`, `_` and `.` (huggingface_hub's rule). A string
# of any other shape (an absolute path, `./x`, `a/b/c`) is only ever a folder.
_HUB_ID = re.compile(r"[A-Za-z0-9_.-]{1,96}(/[A-Za-z0-9_.-]{1,96})?")


def looks_like_hub_id(model: str) -> bool:
    if not _HUB_ID.fullmatch(model) or ".." in model or "--" in model:
        return False
    return not any(part in (".", "") or part.startswith((".", "-")) for part in model.split("/"))


def hub_cache_dir() -> str:
    """The hub cache huggingface_hub reads, from the environment as it is now (huggingface_hub reads it once,
    at import): $HF_HUB_CACHE, else $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expanduser(os.path.expandvars(cache))


def hub_model_dir(model: str, cache: str | None = None) -> str:
    """The folder the hub cache keeps `org/name` in: <cache>/models--org--name."""
    return os.path.join(cache or hub_cache_dir(), "models--" + model.replace("/", "--"))


def is_hub_model(model: str) -> bool:
    """True when `model` would be looked up in the hub cache: not an existing folder, and shaped as an id."""
    return bool(model) and not os.path.isdir(model) and looks_like_hub_id(model)


def resolve_model(model: str, flag: str = "--model", revision: str | None = None) -> str:
    """A folder for `model`: the folder itself when it exists (a folder always wins), else the cached
    snapshot of the hub id `model` at `revision` (default: main), looked up offline. Anything else comes back
    unchanged, for the checkpoint loader to report as a missing folder. An id the cache does not hold is a
    ConfigError naming the folder it looked in."""
    if not is_hub_model(model):
        return model
    cache = hub_cache_dir()
    where = hub_model_dir(model, cache)
    try:
        from huggingface_hub import snapshot_download  # torch-free; imported only for an id
    except ImportError:
        raise ConfigError(f"{flag} {model!r} is not a folder (a hub id needs huggingface_hub)") from None
    try:
        folder = snapshot_download(repo_id=model, revision=revision, cache_dir=cache, local_files_only=True)
    except (OSError, ValueError) as exc:  # LocalEntryNotFoundError, a bad id, an incomplete snapshot
        held = "an incomplete snapshot" if "Incomplete" in type(exc).__name__ else "no snapshot"
        rev = f" at revision {revision!r}" if revision else ""
        raise ConfigError(
            f"{flag} {model!r} is not a folder, and the Hugging Face hub cache holds {held} of it{rev}: "
            f"looked in {where} (offline: download it first, e.g. `hf download {model}`, into the cache that "
            "$HF_HOME or $HF_HUB_CACHE names)"
        ) from None
    if not os.path.isdir(folder):
        raise ConfigError(f"{flag} {model!r}: the hub cache names {folder}, which is not a folder")
    return folder


def resolve_model_flag(args: argparse.Namespace, flag: str = "--model") -> None:
    """args.model -> a folder, in place. A hub id also becomes the served model name when
    --served-model-name gives none (as vLLM names a model by the id typed); a folder keeps its default (the
    folder's name)."""
    typed = args.model
    if not is_hub_model(typed):
        return
    args.model = resolve_model(typed, flag)
    if hasattr(args, "served_model_name") and not args.served_model_name:
        args.served_model_name = [typed]
