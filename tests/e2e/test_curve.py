"""`pdserve up --curve`: node RPC and events sockets under ZMQ CURVE with keys derived from the shared secret.
End-to-end requests (colocated and disaggregated, streaming or not) give the same greedy tokens as without it;
a sniffer on loopback finds the prompt's token ids in the node RPC/events traffic without CURVE and not with
it; an events subscriber without the secret gets nothing."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import httpx
import pytest
import zmq

from tests.harness.servers import UpCluster, needs_nodes

pytestmark = [
    pytest.mark.slow,
    needs_nodes,
    pytest.mark.skipif(not zmq.has("curve"), reason="pyzmq without CURVE (libsodium)"),
]

IDS = list(range(700, 760))  # a prompt by token ids: 60 tokens, long enough to be disaggregated
SHORT = [700, 701, 702]


def msgpack_ids(ids: list[int]) -> bytes:
    return b"".join(b"\xcd" + t.to_bytes(2, "big") for t in ids)  # how msgpack writes ints 128..65535


class LoopbackSniffer:
    """TCP payloads on lo to or from the given ports (AF_PACKET: needs CAP_NET_RAW, else the test skips)."""

    def __init__(self):
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            self.sock.bind(("lo", 0))
        except (PermissionError, OSError, AttributeError) as exc:
            pytest.skip(f"cannot sniff loopback here: {exc}")
        self.sock.settimeout(0.2)
        self.ports: set[int] = set()
        self.data = bytearray()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                frame = self.sock.recv(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if len(frame) < 34 or frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
            ihl = (ip[0] & 15) * 4
            if ip[9] != 6:  # TCP
                continue
            tcp = ip[ihl:]
            sport, dport = struct.unpack("!HH", tcp[:4])
            if sport in self.ports or dport in self.ports:
                self.data += tcp[(tcp[12] >> 4) * 4 :]

    def close(self):
        self.stop = True
        self.thread.join(2)
        self.sock.close()


def port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def run_requests(cluster: UpCluster) -> list:
    url = cluster.url + "/v1/completions"
    out = []
    for prompt in (IDS, SHORT):
        body = {
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 200, r.text
        out.append((r.headers["x-pdserve-route"].split(":")[0], r.json()["choices"][0]["token_ids"]))
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as s:
            events = [
                json.loads(line[6:])
                for line in s.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"
            ]
        out.append(("stream", [t for e in events for c in e["choices"] for t in c.get("token_ids", [])]))
    return out


def unauthenticated_events(cluster: UpCluster) -> int:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(cluster.node("decode-0")["events"])
    got = 0
    deadline = time.monotonic() + 2.0  # four heartbeat intervals
    while time.monotonic() < deadline:
        if sub.poll(100):
            sub.recv_multipart()
            got += 1
    sub.close(0)
    ctx.term()
    return got


def sniffed_session(tmp_path, model_dir, args: tuple) -> tuple[list, bool, int]:
    sniffer = LoopbackSniffer()
    cluster = UpCluster(tmp_path, model_dir, 1, 1, args)
    try:
        for node in cluster.info["nodes"]:
            sniffer.ports |= {port(node["rpc"]), port(node["events"])}
        results = run_requests(cluster)
        events = unauthenticated_events(cluster)
        time.sleep(0.3)  # the last packets reach the sniffer
        return results, msgpack_ids(IDS[:20]) in bytes(sniffer.data), events
    finally:
        sniffer.close()
        cluster.stop()


def test_curve_encrypts_control_traffic_and_keeps_out_strangers(tmp_path, model_dir):
    plain, seen_plain, events_plain = sniffed_session(tmp_path / "plain", model_dir, ())
    curved, seen_curved, events_curved = sniffed_session(tmp_path / "curve", model_dir, ("--curve",))
    assert [mode for mode, _ in plain][:1] == ["disaggregated"]
    assert curved == plain and all(len(ids) == 8 for _, ids in curved)
    assert seen_plain, "the sniffer did not see the prompt ids in clear (is it working?)"
    assert not seen_curved, "prompt token ids readable on the node sockets under CURVE"
    assert events_plain > 0 and events_curved == 0
