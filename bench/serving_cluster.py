"""A `pdserve up` cluster started by a benchmark: one subprocess, ready once its --state-file appears, stopped
with SIGTERM (then SIGKILL of its process group) however the benchmark ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from typing import Optional

from pdserve.benchmarks.results import log


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(
        self,
        work_dir: str,
        model: str,
        prefill: int,
        decode: int,
        extra: tuple[str, ...] = (),
        startup_timeout_s: float = 900.0,
        env: Optional[dict] = None,
    ):
        self.work_dir = work_dir
        os.makedirs(work_dir, exist_ok=True)
        self.state_file = os.path.join(work_dir, "cluster.json")
        self.out_path = os.path.join(work_dir, "up.out")
        from pdserve.launch.up_process import up_command

        self.argv = up_command(
            prefill,
            decode,
            model,
            free_port(),
            self.state_file,
            os.path.join(work_dir, "logs"),
            "--startup-timeout",
            str(startup_timeout_s),
            *extra,
        )
        self.startup_timeout_s = startup_timeout_s
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.info: dict = {}

    @property
    def url(self) -> str:
        return self.info["url"]

    def start(self) -> "LocalCluster":
        log(f"starting: {' '.join(self.argv[3:])}")
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
            )
        deadline = time.monotonic() + self.startup_timeout_s + 30
        while not os.path.exists(self.state_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pdserve up did not come up; its output:\n{self.output()[-3000:]}")
            time.sleep(0.2)
        with open(self.state_file) as f:
            self.info = json.load(f)
        log(f"cluster ready at {self.url}")
        return self

    def output(self) -> str:
        try:
            with open(self.out_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        from pdserve.launch.up_process import stop_up_process

        if self.proc is not None:
            stop_up_process(self.proc)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
