"""bench/results/ holds results, not run logs (issue 19).

A result is named `<bench>-<device>-<YYYYMMDD>[-label].{json,md,png}`; the log of a one-off run goes, gzipped,
to bench/results/logs/ under the same pattern; every JSON is in the results format of docs/architecture.md;
no file is large; and every bench/results path that the README, docs/ and the result notes name exists. So a
result is found by its name, every JSON reads with one parser, and each past claim points at its file."""

import datetime
import gzip
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
LOGS = RESULTS / "logs"

# device: 'cpu', or a GPU slug as bench/common.py's device_slug makes it ('h100', 'a100', 'l40'), plus 'xN'
# for N GPUs ('h200x4'). Strict on purpose: a misplaced label ('bf16', 'llama') is not taken for the device.
STEM = r"(?P<bench>[a-z0-9_]+)-(?P<device>cpu|[habvl]\d+(?:x\d+)?)-(?P<date>\d{8})(?:-[a-z0-9_-]+)?"
RESULT_NAME = re.compile(STEM + r"\.(?:json|md|png)")
LOG_NAME = re.compile(STEM + r"\.(?:log|txt)\.gz")
TOP_KEYS = {"bench", "device", "date", "commit", "command", "records"}  # more top-level keys are allowed
RECORD_KEYS = {"metric", "value", "unit", "ceiling", "ratio", "baseline", "params"}  # exactly these
MAX_BYTES = 2 << 20  # per file, uncompressed: a result this big is a log or a dump
NUMBER = (int, float, type(None))


def _conforms(name: str, pattern: re.Pattern) -> bool:
    m = pattern.fullmatch(name)
    try:
        return bool(m) and bool(datetime.datetime.strptime(m["date"], "%Y%m%d"))
    except ValueError:  # not a calendar date
        return False


def test_every_result_is_named_bench_device_date_label():
    bad = [p.name for p in RESULTS.iterdir() if p != LOGS and not _conforms(p.name, RESULT_NAME)]
    assert not bad, f"not <bench>-<device>-<YYYYMMDD>[-label].json|md|png (logs: logs/*.log.gz): {bad}"


def test_every_log_is_named_and_gzipped():
    bad = []
    for p in sorted(LOGS.rglob("*")) if LOGS.exists() else []:
        if p.parent != LOGS or not _conforms(p.name, LOG_NAME):
            bad.append(f"{p.relative_to(RESULTS)}: not logs/<bench>-<device>-<YYYYMMDD>[-label].log.gz")
            continue
        try:
            gzip.decompress(p.read_bytes())
        except (OSError, EOFError) as exc:
            bad.append(f"{p.name}: not gzip ({exc})")
    assert not bad, bad


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_json_is_in_the_results_format(path):
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict) and TOP_KEYS <= doc.keys(), f"missing {sorted(TOP_KEYS - set(doc))}"
    name = RESULT_NAME.fullmatch(path.name)
    assert name, path.name
    assert (doc["bench"], doc["device"], doc["date"]) == (name["bench"], name["device"], name["date"])
    assert all(isinstance(doc[k], str) and doc[k] for k in ("commit", "command"))
    assert isinstance(doc["records"], list) and doc["records"]
    for i, r in enumerate(doc["records"]):
        assert isinstance(r, dict) and set(r) == RECORD_KEYS, f"record {i}: keys {sorted(r)}"
        assert isinstance(r["metric"], str) and r["metric"] and isinstance(r["unit"], str), f"record {i}"
        assert all(isinstance(r[k], NUMBER) for k in ("value", "ceiling", "ratio", "baseline")), f"record {i}"
        assert isinstance(r["params"], dict), f"record {i}"


def test_no_file_is_large():
    def size(p: Path) -> int:
        try:
            return len(gzip.decompress(p.read_bytes())) if p.suffix == ".gz" else p.stat().st_size
        except (OSError, EOFError):  # not gzip after all: the log test names it
            return p.stat().st_size

    big = [str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*") if p.is_file() and size(p) > MAX_BYTES]
    assert not big, f"over {MAX_BYTES >> 20} MiB (uncompressed): {big}"


def _expand(ref: str) -> list[str]:
    """'a.{json,md}' -> ['a.json', 'a.md'] (one brace group, as the notes write them)."""
    m = re.search(r"\{([^{}]*)\}", ref)
    return [ref[: m.start()] + alt + ref[m.end() :] for alt in m[1].split(",")] if m else [ref]


# A result's bare name in a note (`x-h100-20261123.json`, `logs/...log.gz`, `x-h100-20261123-a.*`).
BARE = re.compile(
    r"(?<![\w/.-])((?:logs/)?[a-z0-9_]+(?:-[a-z0-9_]+)*-\d{8}(?:-[a-z0-9_]+)*\.[a-z{},*.]*[a-z}*])"
)
FULL = re.compile(r"bench/results/[\w.*{},/<>-]*")


def _named_paths():
    """(file, reference, base): bench/results/... paths in README.md, docs/*.md and the result notes, and the
    bare result names in the notes, which are relative to the notes' folder."""
    notes = sorted(RESULTS.glob("*.md"))
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *notes]:
        text = doc.read_text(encoding="utf-8")
        for ref in FULL.findall(text):
            if "<" not in ref:  # not a template such as bench/results/serving-<device>-<date>.json
                yield doc, ref.rstrip(".,"), ROOT
        if doc in notes:
            yield from ((doc, ref, RESULTS) for ref in BARE.findall(text))


def test_every_named_results_path_exists():
    refs = list(_named_paths())
    missing = [
        f"{doc.relative_to(ROOT)}: {ref}"
        for doc, ref, base in refs
        if not all(any(base.glob(p)) if "*" in p else (base / p).exists() for p in _expand(ref))
    ]
    assert refs, "no bench/results path found: the scan is broken"
    assert not missing, missing


def test_the_name_patterns_reject_misplaced_parts():
    good = ["engine-h100-20261123.json", "serving-h200x4-20261127-pd.md", "kv_transfer-cpu-20260101-a-b.png"]
    bad = ["engine-llama-h100-20261123.png", "pdserve_up-bf16-h100-20261123.md", "engine-h100-2026112.json"]
    bad += ["engine-h100-20261123.log", "Engine-h100-20261123.json", "engine-h100-20261323.json"]
    assert [n for n in good if not _conforms(n, RESULT_NAME)] == []
    assert [n for n in bad if _conforms(n, RESULT_NAME)] == []
    assert _conforms("gpu_tests-h200-20261127-final.log.gz", LOG_NAME)
    assert not _conforms("gpu_tests-final-h200-20261127.log.gz", LOG_NAME)
    assert not _conforms("gpu_tests-h200-20261127.log", LOG_NAME)
    assert _expand("a.{json,log}") == ["a.json", "a.log"] and _expand("b.md") == ["b.md"]
