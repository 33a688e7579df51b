"""X-Forwarded-For is believed only when the request came through a configured trusted proxy."""

from __future__ import annotations

from starlette.requests import Request

from hub.api.deps import client_address


def _request(peer: str, forwarded: str | None) -> Request:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "client": (peer, 5555)})


def test_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    assert client_address(_request("203.0.113.9", "198.51.100.1"), ["10.0.0.0/8"]) == "203.0.113.9"


def test_trusted_proxy_chain_yields_the_first_untrusted_hop_from_the_right() -> None:
    # A client forging the left-most entry cannot choose its bucket: the proxies' own hops are skipped from the right.
    req = _request("10.0.1.5", "1.2.3.4, 198.51.100.7, 10.0.2.9")
    assert client_address(req, ["10.0.0.0/8"]) == "198.51.100.7"


def test_garbage_hops_are_not_trusted() -> None:
    assert client_address(_request("10.0.1.5", "not-an-ip"), ["10.0.0.0/8"]) == "not-an-ip"
    assert client_address(_request("10.0.1.5", None), ["10.0.0.0/8"]) == "10.0.1.5"
