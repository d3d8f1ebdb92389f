"""The node's small HTTP port: `/health` (JSON) and `/metrics` (Prometheus text), on a stdlib thread server.

A full ASGI stack is not needed for two read-only endpoints; this keeps the node's dependencies and threads
small. /health answers 200 with the node's gauges while the engine loop and the RPC thread are alive, 503
otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(
        self, host: str, port: int, health: Callable[[], tuple[bool, dict]], metrics: Callable[[], bytes]
    ):
        handler = _make_handler(health, metrics)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address[:2]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="node-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    def start(self) -> "HttpServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(health, metrics):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            path = self.path.split("?", 1)[0]
            if path == "/health":
                ok, body = health()
                self._reply(200 if ok else 503, "application/json", json.dumps(body).encode())
            elif path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, metrics())
            else:
                self._reply(404, "application/json", b'{"error": "not found"}')

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):  # scrapes every few seconds would flood the log
            log.debug("http %s", fmt % args)

    return Handler
