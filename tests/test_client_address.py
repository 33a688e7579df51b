"""X-Forwarded-For is believed only when the request came through a configured trusted proxy."""

from __future__ import annotations

import httpx
import redis
from starlette.requests import Request

from hub.api.deps import client_address
from shared.redis_server import EmbeddedRedis
from tests.harness import running_hubs


def _request(peer: str, forwarded: str | None) -> Request:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "client": (peer, 5555)})


def test_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    assert client_address(_request("203.0.113.9", "198.51.100.1"), ["10.0.0.0/8"]) == "203.0.113.9"


def test_trusted_proxy_chain_yields_the_first_untrusted_hop_from_the_right() -> None:
    # A client forging the left-most entry cannot choose its bucket: the proxies' own hops are skipped from the right.
    req = _request("10.0.1.5", "1.2.3.4, 198.51.100.7, 10.0.2.9")
    assert client_address(req, ["10.0.0.0/8"]) == "198.51.100.7"


def test_a_proxy_that_adds_its_own_header_line_is_read_with_the_clients_line() -> None:
    """Regression: only the first X-Forwarded-For line was read, so behind a proxy that appends a line of its own
    (HAProxy's ``option forwardfor``) the client's forged line chose its rate-limit bucket (RFC 9110 §5.3: repeated
    lines are one comma-separated list)."""
    headers = [(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-for", b"198.51.100.9")]
    req = Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "client": ("10.0.0.2", 5555)})
    assert client_address(req, ["10.0.0.0/8"]) == "198.51.100.9"


def test_each_trusted_network_is_trusted_on_its_own() -> None:
    """A load balancer spans several subnets (one per zone), each listed in FLEET_TRUSTED_PROXIES: a proxy in any
    of them is believed, or every client behind it would share the proxy's rate-limit bucket."""
    trusted = ["10.0.0.0/24", "10.0.1.0/24", "fd00::/8"]
    for proxy in ("10.0.0.5", "10.0.1.5", "fd00::5"):
        assert client_address(_request(proxy, "198.51.100.7"), trusted) == "198.51.100.7", proxy
    assert client_address(_request("10.0.1.5", "198.51.100.7, 10.0.0.9"), trusted) == "198.51.100.7"
    assert client_address(_request("10.0.2.5", "198.51.100.7"), trusted) == "10.0.2.5"  # in none of them


def test_an_ipv4_proxy_seen_through_a_dual_stack_socket_is_still_trusted() -> None:
    """A hub bound to ``::`` sees IPv4 peers as ``::ffff:10.0.0.5``, which ``ipaddress`` does not count as inside
    10.0.0.0/8: the load balancer was not believed, and every client behind it shared one rate-limit bucket.
    Found by a mutation review."""
    assert client_address(_request("::ffff:10.0.0.5", "198.51.100.7"), ["10.0.0.0/8"]) == "198.51.100.7"
    assert client_address(_request("10.0.1.5", "198.51.100.7, ::ffff:10.0.0.9"), ["10.0.0.0/8"]) == "198.51.100.7"
    assert client_address(_request("::ffff:192.0.2.1", "198.51.100.7"), ["10.0.0.0/8"]) == "::ffff:192.0.2.1"


def test_empty_entries_in_a_forwarded_for_list_are_skipped() -> None:
    """``a, , b`` or a trailing comma (a proxy appending to an empty value) is not a client named ""."""
    assert client_address(_request("10.0.1.5", "198.51.100.7, "), ["10.0.0.0/8"]) == "198.51.100.7"
    assert client_address(_request("10.0.1.5", "198.51.100.7,,10.0.0.2"), ["10.0.0.0/8"]) == "198.51.100.7"


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


def test_the_real_server_does_not_believe_a_forwarded_for_from_loopback(redis_server: EmbeddedRedis) -> None:
    """Regression: uvicorn rewrote the peer from X-Forwarded-For for any loopback caller (its own default), before
    ``client_address`` could judge the peer, so a client beside the hub chose its own rate-limit bucket."""
    if not redis_server.running:  # a fault test may have stopped it
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()  # no bucket left by another test
    with running_hubs(1, redis_server.url, rate_limit_per_s=0.001, rate_limit_burst=3) as [hub]:
        codes = [httpx.post(f"{hub.url}/api/v1/sessions", json={}, timeout=10,
                            headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code for i in range(6)]
    assert codes.count(429) == 3, codes  # one bucket, the peer's: three in the burst, then refused


def test_a_chain_of_trusted_proxies_only_is_the_peer() -> None:
    """When every hop is a proxy of ours, no hop names a client: the bucket is the peer's, not a hop's."""
    assert client_address(_request("10.0.1.5", "10.0.3.3, 10.0.2.9"), ["10.0.0.0/8"]) == "10.0.1.5"
