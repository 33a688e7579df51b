"""Request-scoped dependencies as ``Annotated`` aliases, and the two bearer-token guards."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hub.allocator import Allocator
from hub.board import RoutingBoard
from hub.metrics import HubMetrics
from hub.registry import Registry
from hub.settings import HubSettings
from hub.store import FleetStore
from shared.auth import secret_matches
from shared.keys import WORKER_ID_PATTERN

#: A worker id in a path, as registrations take it.
WorkerIdPath = Annotated[str, Path(pattern=WORKER_ID_PATTERN)]


@dataclass(slots=True)
class HubState:
    """What the lifespan builds once and every request shares."""

    settings: HubSettings
    store: FleetStore
    board: RoutingBoard
    registry: Registry
    allocator: Allocator
    metrics: HubMetrics


async def get_hub(request: Request) -> HubState:
    return _hub_of(request)


HubDep = Annotated[HubState, Depends(get_hub)]

_worker_bearer = HTTPBearer(auto_error=False, scheme_name="WorkerToken", description="FLEET_WORKER_TOKEN")
_admin_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken", description="FLEET_ADMIN_TOKEN")


def _check(credentials: HTTPAuthorizationCredentials | None, expected: str, what: str) -> None:
    # Stripped as the worker's own check and the heartbeat channel strip it: ``Bearer   <token>`` is the token.
    given = credentials.credentials.strip() if credentials else None
    if not secret_matches(given, expected):
        raise HTTPException(401, f"a valid {what} bearer token is required", headers={"WWW-Authenticate": "Bearer"})


# Async on purpose: FastAPI runs sync dependencies in a thread pool, a hop that cost ~15% of a heartbeat's CPU.
async def require_worker(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_worker_bearer)]
) -> None:
    _check(credentials, _hub_of(request).settings.worker_token.get_secret_value(), "worker")


async def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_admin_bearer)]
) -> None:
    _check(credentials, _hub_of(request).settings.admin_token.get_secret_value(), "admin")


def _hub_of(request: Request) -> HubState:
    hub: HubState = request.app.state.hub
    return hub


def client_address(request: Request, trusted_proxies: list[str], address_header: str | None = None) -> str:
    """The caller's IP: X-Forwarded-For (or ``address_header``, a CDN's own header naming the viewer, such as
    CloudFront-Viewer-Address) is believed only when the peer is a trusted proxy."""
    peer = request.client.host if request.client else "unknown"
    if not _is_trusted(peer, trusted_proxies):
        return peer
    if address_header and (named := _address_of(request.headers.get(address_header))):
        return named
    forwarded = ",".join(request.headers.getlist("x-forwarded-for"))  # repeated lines are one list (RFC 9110)
    if not forwarded:
        return peer
    # Walk from the right: the first address not of a trusted proxy is the client.
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        if not _is_trusted(hop, trusted_proxies):
            return hop
    return peer


def rate_limited_client(address: str) -> str:
    """Whose rate limit a request from ``address`` spends: an IPv6 client's /64 (one host is routinely given a whole
    /64, so counting each address would hand it 2^64 buckets), an IPv4-mapped address as the IPv4 it is, else the
    address as given."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else ip)


def _address_of(value: str | None) -> str | None:
    """The IP of ``ip:port`` (``198.51.100.10:46532``, ``2001:db8::1:443``, ``[2001:db8::1]:443``) or a bare IP;
    None when it is neither. The port goes first: ``2001:db8::1:443`` is also a valid address on its own."""
    if not value:
        return None
    text = value.strip()
    for candidate in (text.rpartition(":")[0], text):
        try:
            return str(ipaddress.ip_address(candidate.strip("[]")))
        except ValueError:
            continue
    return None


def _is_trusted(address: str, trusted: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 proxy as a dual-stack socket (a hub bound to ::) reports it
    return any(ip in ipaddress.ip_network(net, strict=False) for net in trusted)
