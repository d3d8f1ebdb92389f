"""ZMQ CURVE on the node sockets (RPC, events), switched on by $PDSERVE_CURVE=1 on every process.

CURVE encrypts each connection and authenticates the server: a client must know the server's long-term public
key to complete the handshake. Here that key pair is derived from the shared frame-signing secret
(`--kv-secret`), so only processes holding the secret can connect at all: an events subscriber without it gets
nothing, and the prompt ids in Generate frames no longer travel in clear. Clients use a fresh key pair per
socket. The same switch puts the KV control links under TLS (kvconnector/link_tls.py).
"""

from __future__ import annotations

import hashlib
import hmac
import os

import zmq
from zmq.utils import z85

ENV = "PDSERVE_CURVE"


def enabled() -> bool:
    return os.environ.get(ENV, "") == "1"


def _server_keys(secret: bytes) -> tuple[bytes, bytes]:
    seed = hmac.new(secret, b"pdserve curve server key", hashlib.sha256).digest()
    secret_key = z85.encode(seed)
    return zmq.curve_public(secret_key), secret_key


def check_available() -> None:
    if enabled() and not zmq.has("curve"):
        raise RuntimeError(f"${ENV}=1 but this pyzmq/libzmq has no CURVE support (libsodium)")


def serve(sock: zmq.Socket, secret: bytes) -> None:
    """Make a binding socket (ROUTER, PUB) a CURVE server, when CURVE is on."""
    if not enabled():
        return
    public, secret_key = _server_keys(secret)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)


def client(sock: zmq.Socket, secret: bytes) -> None:
    """Make a connecting socket (DEALER, SUB) a CURVE client of the nodes' server key, when CURVE is on."""
    if not enabled():
        return
    public, secret_key = zmq.curve_keypair()
    sock.setsockopt(zmq.CURVE_SERVERKEY, _server_keys(secret)[0])
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
