"""Driving a `pdserve up` from outside it, as the serving benchmark and the tests do: its command line, and
its stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def up_command(
    prefill: int,
    decode: int,
    model: str,
    port: int,
    state_file: str,
    log_dir: str,
    *extra: str,
    pdserve: tuple[str, ...] = (sys.executable, "-m", "pdserve"),
) -> list[str]:
    """The argv that starts `pdserve up` (by default with this interpreter; `pdserve` names another install's
    command), writing its endpoints to state_file (for the benchmarks and tests that run a cluster in a
    subprocess; stop it with stop_up_process)."""
    return [
        *pdserve,
        "up",
        "--prefill",
        str(prefill),
        "--decode",
        str(decode),
        "--model",
        model,
        "--port",
        str(port),
        "--state-file",
        state_file,
        "--log-dir",
        log_dir,
        *extra,
    ]


def stop_up_process(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """Stop a `pdserve up` started in a session of its own: SIGTERM (it stops its children itself), then,
    after grace_s, SIGKILL to its whole process group."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
