"""`pdserve bench` against real servers: a `pdserve up` cluster on CPU (its counts must equal what the proxy's
/metrics counted), the same cluster with --prefill 0 standing in for another OpenAI server, and a tiny HTTP
server of this test that answers like a plain OpenAI server without pdserve's fields, or drops connections."""

from __future__ import annotations

import asyncio
import glob
import json
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.launch.cli import main as pdserve
from tests.harness.servers import UpCluster, free_port, needs_nodes, wait_for

pytestmark = [pytest.mark.slow, needs_nodes]
TOP_KEYS = {"bench", "device", "date", "commit", "command", "records"}
RECORD_KEYS = {"metric", "value", "unit", "ceiling", "ratio", "baseline", "params"}
CORE_METRICS = {
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "completed_requests",
    "goodput",
    "slo_attainment",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2el_ms",
}
SMALL = ["--input-len", "48", "--output-len", "6", "--disable-tqdm"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model):
    c = UpCluster(tmp_path_factory.mktemp("bench-1p1d"), tiny_model, 1, 1)
    try:
        yield c
    finally:
        c.stop()


def proxy_counts(url: str) -> dict:
    import httpx

    counts = {"ok": 0.0, "prompt": 0.0, "cached": 0.0, "generated": 0.0}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "pdserve_proxy_requests_total" and s.labels.get("status") == "200":
                counts["ok"] += s.value
            for key, name in (("prompt", "prompt"), ("cached", "cached"), ("generated", "generation")):
                if s.name == f"pdserve_proxy_{name}_tokens_total":
                    counts[key] += s.value
    return counts


def bench(base_url: str, out_dir, *args: str) -> dict:
    rc = pdserve(["bench", "--base-url", base_url, "--result-dir", str(out_dir), *SMALL, *args])
    assert rc == 0
    (path,) = glob.glob(str(out_dir / "serving-*.json"))
    with open(path) as f:
        doc = json.load(f)
    assert TOP_KEYS <= doc.keys() and doc["command"].startswith("pdserve bench --base-url")
    assert all(RECORD_KEYS <= r.keys() for r in doc["records"])
    return doc


def values(doc: dict, metric: str, **params) -> dict[str, float]:
    """request rate -> value of the records of `metric` whose params include `params`."""
    return {
        r["params"]["request_rate"]: r["value"]
        for r in doc["records"]
        if r["metric"] == metric and all(r["params"].get(k) == v for k, v in params.items())
    }


def test_counts_equal_what_the_proxy_counted_and_one_result_per_rate(cluster, tmp_path):
    before = proxy_counts(cluster.url)
    doc = bench(
        cluster.url,
        tmp_path,
        "--dataset-name",
        "prefix",
        "--prefix-groups",
        "2",
        "--prefix-len",
        "32",
        "--input-len",
        "16",
        "--num-prompts",
        "6",
        "--request-rate",
        "20,inf",
        "--max-concurrency",
        "1",
        "--goodput",
        "ttft:5000",
        "tpot:1000",
        "itl:2000",
    )
    after = proxy_counts(cluster.url)
    delta = {k: after[k] - before[k] for k in before}
    completed = values(doc, "completed_requests")
    assert set(completed) == {"20", "inf"} and set(values(doc, "request_throughput")) == {"20", "inf"}
    assert sum(completed.values()) == delta["ok"] == 12
    hit = values(doc, "prefix_hit_fraction")
    # One request at a time, so every repeat of a group finds its prefix cached, whatever the machine's speed.
    assert all(0 < h < 1 for h in hit.values()), hit
    totals = tokens_in(doc)
    assert totals == {"prompt": delta["prompt"], "generated": delta["generated"], "cached": delta["cached"]}
    assert totals["generated"] == 12 * 6 and totals["prompt"] == 12 * 48
    for rate, good in values(doc, "goodput").items():
        assert good <= values(doc, "request_throughput")[rate]
    phases = {r["params"]["phase"] for r in doc["records"] if r["metric"] == "phase_ms"}
    assert phases == {"prefill_queue", "prefill", "transfer", "exposed_transfer", "decode_queue"}


def tokens_in(doc: dict) -> dict:
    """Token totals over every rate of the run, from its records."""
    out = {"prompt": 0, "generated": 0, "cached": 0}
    for r in doc["records"]:
        for key, metric in (
            ("prompt", "prompt_tokens"),
            ("generated", "output_tokens"),
            ("cached", "cached_tokens"),
        ):
            if r["metric"] == metric:
                out[key] += r["value"]
    return out


def test_warmups_are_not_counted_and_chat_conversations_run_in_turn_order(cluster, tmp_path):
    before = proxy_counts(cluster.url)
    doc = bench(
        cluster.url,
        tmp_path,
        "--endpoint",
        "/v1/chat/completions",
        "--dataset-name",
        "conversation",
        "--conversation-turns",
        "3",
        "--input-len",
        "12",
        "--num-prompts",
        "6",
        "--num-warmups",
        "2",
        "--request-rate",
        "inf",
    )
    assert values(doc, "completed_requests") == {"inf": 6}
    assert proxy_counts(cluster.url)["ok"] - before["ok"] == 6 + 2
    # Turn k+1 is sent after turn k finished, so it finds the history cached.
    assert values(doc, "prefix_hit_fraction")["inf"] > 0


def test_a_400_is_an_error_kind_not_a_crash(cluster, tmp_path):
    doc = bench(cluster.url, tmp_path, "--input-len", "4000", "--num-prompts", "3")  # over --max-model-len
    assert values(doc, "errors", kind="http_400") == {"inf": 3}
    assert values(doc, "completed_requests") == {"inf": 0}


def test_a_bad_jsonl_line_is_a_one_line_error(cluster, tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"prompt": "hello"}\n{"prompt": 5}\n')
    rc = pdserve(
        ["bench", "--base-url", cluster.url, "--dataset-name", "jsonl", "--dataset-path", str(trace)]
    )
    assert rc == 2
    assert (
        "trace.jsonl:2: 'prompt' must be a non-empty string or a list of token ids" in capsys.readouterr().err
    )


# ---------------------------------------------------------------------------------------------- other servers


class PlainServer:
    """A minimal OpenAI-style streaming server: chunks with text and a final usage (no cached tokens, no
    pdserve timings). Requests whose number is in `drop` get their connection closed mid-stream."""

    def __init__(self, drop=frozenset()):
        self.drop, self.port, self.seen = drop, free_port(), 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.started.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        body = json.loads(await reader.readexactly(length))
        number, self.seen = self.seen, self.seen + 1
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        for i in range(body["max_tokens"]):
            self._event(writer, {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]})
            await writer.drain()
            if number in self.drop and i == 1:
                writer.transport.abort()  # the connection drops mid-stream
                return
            await asyncio.sleep(0.002)
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
        self._event(writer, {"choices": [], "usage": usage})
        writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    @staticmethod
    def _event(writer, obj: dict) -> None:
        data = f"data: {json.dumps(obj)}\n\n".encode()
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def __enter__(self) -> "PlainServer":
        self.thread.start()
        wait_for(self.started.is_set, 10, what="the plain server")
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_dropped_connections_are_an_error_kind(tmp_path):
    with PlainServer(drop={1, 3}) as server:
        doc = bench(
            f"http://127.0.0.1:{server.port}",
            tmp_path,
            "--model",
            "m",
            "--num-prompts",
            "5",
            "--max-concurrency",
            "1",
        )
    assert values(doc, "errors", kind="dropped") == {"inf": 2}
    assert values(doc, "completed_requests") == {"inf": 3}


def test_the_results_need_no_pdserve_field(tiny_model, tmp_path_factory, tmp_path):
    colocated = UpCluster(tmp_path_factory.mktemp("bench-0p1d"), tiny_model, 0, 1)
    try:
        ours = bench(colocated.url, tmp_path / "ours", "--num-prompts", "4", "--goodput", "ttft:5000")
    finally:
        colocated.stop()
    with PlainServer() as server:
        plain = bench(
            f"http://127.0.0.1:{server.port}",
            tmp_path / "plain",
            "--model",
            "m",
            "--num-prompts",
            "4",
            "--goodput",
            "ttft:5000",
        )
    metrics = {
        name: {r["metric"] for r in doc["records"]} for name, doc in (("ours", ours), ("plain", plain))
    }
    assert CORE_METRICS <= metrics["plain"] and CORE_METRICS <= metrics["ours"]
    assert metrics["ours"] - metrics["plain"] == {"phase_ms", "prefix_hit_fraction", "cached_tokens"}
    assert values(plain, "completed_requests") == {"inf": 4} and values(plain, "output_tokens") == {"inf": 24}
    assert set(ours) == set(plain)
