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


def _cdn_request(peer: str, viewer: str | None, forwarded: str | None) -> Request:
    headers = [(b"cloudfront-viewer-address", viewer.encode())] if viewer else []
    if forwarded:
        headers.append((b"x-forwarded-for", forwarded.encode()))
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "client": (peer, 5555)})


def test_behind_cloudfront_the_viewer_is_the_client_not_the_edge() -> None:
    header = "CloudFront-Viewer-Address"
    via_edge = _cdn_request("10.0.1.5", "198.51.100.10:46532", "198.51.100.10, 130.176.0.7")
    assert client_address(via_edge, ["10.0.0.0/8"]) == "130.176.0.7", "without the header setting: the edge"
    assert client_address(via_edge, ["10.0.0.0/8"], header) == "198.51.100.10"
    for viewer, ip in (("2001:db8::1:46532", "2001:db8::1"), ("2001:db8::3:443", "2001:db8::3"),
                       ("[2001:db8::2]:443", "2001:db8::2")):
        assert client_address(_cdn_request("10.0.1.5", viewer, None), ["10.0.0.0/8"], header) == ip
    # From an untrusted peer the header is anyone's to forge; a garbled one falls back to X-Forwarded-For.
    assert client_address(_cdn_request("203.0.113.9", "1.1.1.1:1", None), ["10.0.0.0/8"], header) == "203.0.113.9"
    garbled = _cdn_request("10.0.1.5", "not-an-address", "198.51.100.10, 130.176.0.7")
    assert client_address(garbled, ["10.0.0.0/8"], header) == "130.176.0.7"
