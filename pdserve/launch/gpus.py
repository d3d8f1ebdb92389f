"""Which GPUs `pdserve up` may place nodes on, and what each node is shown of them (torch-free)."""

from __future__ import annotations

import os
import shutil
import subprocess


def visible_gpus() -> list[str]:
    """GPU indices this process may use, without importing torch (nvidia-smi, CUDA_VISIBLE_DEVICES)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def own_gpus_first(own: list[str], cluster: list[str]) -> str:
    """CUDA_VISIBLE_DEVICES for a node on GPUs `own` (one per tensor-parallel rank): they first (cuda:0.. in
    the node), then the cluster's others."""
    others = [g for g in dict.fromkeys(cluster) if g not in own]
    return ",".join([*own, *others])
