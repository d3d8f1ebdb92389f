"""Encryption for the KV control links, on when control traffic is encrypted ($PDSERVE_CURVE=1, as the node
RPC).

TLS 1.2 with an ephemeral ECDH key exchange and no certificates (AECDH with AES-256): it gives
confidentiality. Authentication stays where it was, in the link's session (kvconnector/link.py): both sides
derive the session's keys from the shared secret, their two nonces AND the TLS channel's binding (RFC 5929
tls-unique), so a man in the middle, who must run two TLS channels with two different bindings, cannot produce
one valid frame. Stdlib only: no certificate to issue, rotate or ship; the secret that signs frames is the one
credential.
"""

from __future__ import annotations

import socket
import ssl
from typing import Optional

from pdserve.wire import curve

_CIPHERS = "AECDH-AES256-SHA:@SECLEVEL=0"  # anonymous ECDH: authentication is the channel-bound session's job
HANDSHAKE_TIMEOUT_S = 10.0


def enabled() -> bool:
    return curve.enabled()


def _context(server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = (
        ssl.TLSVersion.TLSv1_2
    )  # TLS 1.3 has no certificate-less suites
    ctx.set_ciphers(_CIPHERS)
    ctx.set_ecdh_curve("prime256v1")
    if not server:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # nothing to verify: the session's MACs authenticate the peer
    return ctx


def wrap(sock: socket.socket, server: bool) -> socket.socket:
    """The TLS socket over sock (handshake done, blocking mode restored)."""
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    tls = _context(server).wrap_socket(sock, server_side=server)
    tls.settimeout(None)
    return tls


def is_tls(sock: socket.socket) -> bool:
    return isinstance(sock, ssl.SSLSocket)


def binding(sock: socket.socket) -> Optional[bytes]:
    """The channel binding to mix into the session keys; None on a plain socket."""
    return sock.get_channel_binding("tls-unique") if is_tls(sock) else None
