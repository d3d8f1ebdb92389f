"""Wildcard binds are recognised (IPv4, IPv6, ZMQ's '*') and never advertised as such to peers."""

import pytest

from pdserve.wire.bind import advertised, endpoint_host, is_wildcard


@pytest.mark.parametrize(
    "host,wild",
    [
        ("0.0.0.0", True),
        ("::", True),
        ("[::]", True),
        ("*", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("localhost", False),
    ],
)
def test_is_wildcard(host, wild):
    assert is_wildcard(host) is wild


@pytest.mark.parametrize(
    "endpoint,host",
    [
        ("tcp://127.0.0.1:5557", "127.0.0.1"),
        ("tcp://[::]:80", "::"),
        ("10.1.2.3:9", "10.1.2.3"),
        ("localhost", "localhost"),
    ],
)
def test_endpoint_host(endpoint, host):
    assert endpoint_host(endpoint) == host


def test_advertised_replaces_only_wildcards():
    assert advertised("tcp://127.0.0.1:7000") == "tcp://127.0.0.1:7000"
    dialable = advertised("tcp://0.0.0.0:7000")
    assert dialable.startswith("tcp://") and dialable.endswith(":7000")
    assert not is_wildcard(endpoint_host(dialable))
