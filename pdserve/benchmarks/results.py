"""What every benchmark shares that needs no torch: progress logging and result files. The `pdserve bench`
client writes through it, and so do the GPU benchmarks under the repository's bench/ (bench/common.py adds
their timing and the ceilings measured in the same run).

Results: `<out>/<bench>-<device>-<YYYYMMDD>.json`, one object `{"bench", "device", "date", "commit",
"command", "records": [{"metric", "value", "unit", "ceiling", "ratio", "baseline", "params"}]}`, rewritten
after every record so a crash loses nothing. A file already there is merged into (same metric and params: the
newer record wins), so one benchmark can be split over several runs on the same day; `merge_files` joins files
that came back from different machines' runs.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import time
from typing import Callable

# The checkout this package runs from, when it runs from one (an installed copy has no git: see git_commit).
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORD_KEYS = ("metric", "value", "unit", "ceiling", "ratio", "baseline", "params")

# --------------------------------------------------------------------------------------------------- logging

_T0 = time.perf_counter()
_LOG_FILE: str | None = None


def set_log_file(path: str | None) -> None:
    global _LOG_FILE
    _LOG_FILE = path


def log(msg: str) -> None:
    line = f"[{time.perf_counter() - _T0:7.1f}s] {msg}"
    print(line, flush=True)
    if _LOG_FILE:
        try:
            with open(_LOG_FILE, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            pass


def elapsed() -> float:
    return time.perf_counter() - _T0


# --------------------------------------------------------------------------------------------------- results


def git_commit() -> str:
    """The checkout's commit (with -dirty for uncommitted changes), or the package's version when it runs from
    an installed copy."""
    if not os.path.exists(os.path.join(SOURCE_ROOT, ".git")):  # a folder, or a file in a worktree
        from importlib.metadata import version

        return f"pdserve-{version('pdserve')}"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=SOURCE_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=SOURCE_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def command_line() -> str:
    return " ".join(
        [
            os.path.relpath(sys.argv[0], SOURCE_ROOT)
            if sys.argv and os.path.isabs(sys.argv[0])
            else (sys.argv[0] if sys.argv else "")
        ]
        + sys.argv[1:]
    )


# Params that are measured or derived rather than chosen: not part of a record's identity.
VOLATILE_PARAMS = frozenset(
    {
        "n",
        "steps",
        "seconds",
        "min_ms",
        "max_ms",
        "new_tokens_run",
        "speedup_vs_hf",
        "hf_capped",
        "capped",
        "matches_ref",
        "skipped",
        "note",
        "max_abs_diff",
        "ref_max_abs",
    }
)


def record_key(record: dict) -> str:
    """What makes two records the same measurement, so a rerun replaces it: the metric and the params that
    were chosen (floats are taken for measurements, and the names in VOLATILE_PARAMS)."""
    p = record.get("params") or {}
    chosen = {k: v for k, v in p.items() if k not in VOLATILE_PARAMS and not isinstance(v, float)}
    return record["metric"] + "|" + json.dumps(chosen, sort_keys=True, default=str)


def make_record(metric: str, value, unit: str, ceiling=None, ratio=None, baseline=None, params=None) -> dict:
    return {
        "metric": metric,
        "value": value,
        "unit": unit,
        "ceiling": ceiling,
        "ratio": ratio,
        "baseline": baseline,
        "params": dict(params or {}),
    }


class Results:
    """The run's records; the JSON file is rewritten after every change.

    `link` (optional) is called with the record list before each write, to fill `baseline` fields from records
    that came later (the Hugging Face baseline runs after our engine has been freed)."""

    def __init__(
        self,
        bench: str,
        out_dir: str,
        slug: str,
        description: str | None = None,
        link: Callable[[list[dict]], None] | None = None,
        commit: str | None = None,
        filename: str | None = None,
    ):
        # slug: the device as the file name has it ('h200', 'h200x2', 'cpu'); description: its long name.
        self.bench, self.device_slug = bench, slug
        self.date = _dt.date.today().strftime("%Y%m%d")
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, filename or f"{bench}-{self.device_slug}-{self.date}.json")
        self.link = link
        self.commit = (
            commit or os.environ.get("PDSERVE_COMMIT") or git_commit()
        )  # a copy without .git: say it
        self.records: list[dict] = []
        self.commands: list[str] = []
        if os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    old = json.load(f)
                self.records = [r for r in old.get("records", []) if isinstance(r, dict) and "metric" in r]
                self.commands = [c for c in str(old.get("command", "")).split(" ; ") if c]
                log(f"merging into {self.path} ({len(self.records)} records already there)")
            except Exception as exc:  # a torn file from a killed run: keep it aside, start fresh
                log(f"could not read {self.path} ({exc}); moving it aside")
                os.replace(self.path, self.path + ".bad")
        self.commands.append(command_line())
        self.device_description = description or slug

    def add(
        self,
        metric: str,
        value,
        unit: str,
        ceiling=None,
        ratio=None,
        baseline=None,
        params=None,
        quiet: bool = False,
    ) -> dict:
        rec = make_record(metric, value, unit, ceiling, ratio, baseline, params)
        key = record_key(rec)
        self.records = [r for r in self.records if record_key(r) != key] + [rec]
        if not quiet:
            log(
                f"  RESULT {metric} = {fmt(value)} {unit}  (ceiling {fmt(ceiling)}, ratio {fmt(ratio)}, "
                f"baseline {fmt(baseline)})  {json.dumps(rec['params'], default=str)}"
            )
        self.save()
        return rec

    def save(self) -> None:
        if self.link is not None:
            try:
                self.link(self.records)
            except Exception as exc:
                log(f"  (linking baselines failed: {exc!r})")
        doc = {
            "bench": self.bench,
            "device": self.device_slug,
            "date": self.date,
            "commit": self.commit,
            "command": " ; ".join(self.commands),
            "device_name": self.device_description,
            "records": self.records,
        }
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, self.path)


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def merge_files(paths: list[str], out: str, link: Callable[[list[dict]], None] | None = None) -> dict:
    """Union of the files' records (later files win on the same metric and params); commands joined."""
    merged: dict | None = None
    by_key: dict[str, dict] = {}
    commands: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        merged = merged or {k: v for k, v in doc.items() if k != "records"}
        commands += [c for c in str(doc.get("command", "")).split(" ; ") if c and c not in commands]
        for rec in doc.get("records", []):
            by_key[record_key(rec)] = rec
    assert merged is not None, "no input files"
    merged["command"] = " ; ".join(commands)
    merged["records"] = list(by_key.values())
    if link is not None:
        link(merged["records"])
    with open(out, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=1, default=str)
        f.write("\n")
    return merged
