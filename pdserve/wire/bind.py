"""Where sockets bind, and what a node tells others to dial (torch-free).

Everything binds to the address given, loopback by default. A wildcard bind happens only when asked for; it is
logged, and the address advertised to peers is then this host's own, since nobody can dial a wildcard.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

log = logging.getLogger(__name__)


def is_wildcard(host: str) -> bool:
    """True for an unspecified address (IPv4 or IPv6) or ZMQ's '*'."""
    host = host.strip("[]")
    if host == "*":
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False  # a host name


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost' (what only this machine can reach)."""
    host = endpoint_host(host)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_host(endpoint: str) -> str:
    """'tcp://host:port', 'host:port' or 'host' -> host ('[::]' keeps its brackets off)."""
    rest = endpoint.split("://", 1)[-1]
    host = rest.rsplit(":", 1)[0] if rest.count(":") == 1 or rest.startswith("[") else rest
    return host.strip("[]")


def warn_if_wildcard(what: str, endpoint: str) -> None:
    if is_wildcard(endpoint_host(endpoint)):
        log.warning("%s binds every interface (%s), as asked", what, endpoint)


def advertised(url: str) -> str:
    """scheme://<wildcard>:port -> scheme://<this host's address>:port; anything else unchanged."""
    host = endpoint_host(url)
    if not is_wildcard(host):
        return url
    bracketed = f"[{host}]" if ":" in host else host
    return url.replace(bracketed, socket.gethostbyname(socket.gethostname()), 1)
