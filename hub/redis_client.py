"""Connecting to Redis, and telling an outage (a 503 and a retry) from a programming error (a 500).

Every client the hub builds has bounded waits; every error the store cannot serve through becomes
``StoreUnavailable``, so nothing above ``hub/store.py`` sees redis-py's exceptions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MaxConnectionsError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from hub.settings import HubSettings
from shared.errors import StoreUnavailable

Client = aioredis.Redis | RedisCluster
#: How many times a command is tried (each attempt bounded by ``redis_timeout_s``) before the step is a 503.
ATTEMPTS = 3
#: Connections beyond the request slots (``redis_max_connections``), for callers outside ``FleetStore._call``.
_POOL_HEADROOM = 4
_UNAVAILABLE = (
    RedisConnectionError, RedisTimeoutError, BusyLoadingError, ClusterDownError, MasterDownError,
    ReadOnlyError, TryAgainError, MaxConnectionsError, OSError,
)
#: Error replies that say the store cannot serve right now rather than that the call was wrong. redis-py maps them
#: to the classes above for a plain command, but when a script's write meets one (a failover's READONLY), the reply
#: comes back as "Error running script ... -READONLY ...", a plain ResponseError.
_UNAVAILABLE_REPLIES = ("READONLY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY", "OOM")


#: The cluster client's own exception, raised when it cannot reach any node or find a slot's owner (it wraps the
#: connection error). Its other uses are programming errors (a cross-slot command) and stay 500s.
_CLUSTER_UNREACHABLE = ("Redis Cluster cannot be connected", "startup_nodes could not agree")


def store_cannot_serve(exc: BaseException) -> bool:
    """Whether ``exc`` says the store cannot serve now (retry later), rather than that the call was wrong."""
    if isinstance(exc, (*_UNAVAILABLE, SlotNotCoveredError)):
        return True
    if isinstance(exc, RedisClusterException):
        return str(exc).startswith(_CLUSTER_UNREACHABLE)
    if isinstance(exc, ResponseError):
        text = str(exc)
        return text.startswith(_UNAVAILABLE_REPLIES) or any(f"-{reply} " in text for reply in _UNAVAILABLE_REPLIES)
    return False


def connect(settings: HubSettings, url: str) -> Client:
    """A client with bounded waits everywhere: socket, connect and pool waits, retried with jitter."""
    cluster = settings.redis_cluster or "+cluster://" in url
    url = url.replace("+cluster://", "://")
    common: dict[str, Any] = dict(
        decode_responses=True,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        # No health_check_interval: its PING runs inside each attempt with the same retries, so a frozen Redis held a
        # step for 3 x 3 timeouts. A dead pooled connection fails its command within the timeout; the retry reconnects.
        retry=Retry(ExponentialWithJitterBackoff(cap=0.2, base=0.01), retries=ATTEMPTS - 1),
    )
    if cluster:
        client = RedisCluster.from_url(url, max_connections=settings.redis_max_connections + _POOL_HEADROOM, **common)
        # Nodes discovered later are built from the manager's kwargs; the startup nodes already exist.
        manager = client.nodes_manager
        kwargs = manager.connection_kwargs
        kwargs["connection_class"] = _as_hub_connection(kwargs["connection_class"])
        for node in manager.startup_nodes.values():
            node.connection_class = _as_hub_connection(node.connection_class)
        return client
    # FleetStore._call queues steps for one of redis_max_connections slots, so the pool itself never has to wait
    # (a BlockingConnectionPool's condition and timer cost ~20 us per call); the headroom is for the CloudWatch
    # publisher, which runs outside those slots.
    pool = aioredis.ConnectionPool.from_url(
        url, max_connections=settings.redis_max_connections + _POOL_HEADROOM, **common
    )
    pool.connection_class = _as_hub_connection(pool.connection_class)  # plain, TLS (rediss://) or unix socket
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: closing it closes every connection


class _HubConnection(AbstractConnection):
    """A redis-py asyncio connection as the hub needs it.

    - Commands are packed by hiredis's C packer, as redis-py's sync client already does; its asyncio connections
      pack in Python, which was ~10% of a hub's CPU under heartbeat load (``Encoder.encode`` and ``pack_command``).
    - A connection closed beneath a command on its way out is a ``ConnectionError``, which redis-py retries on a new
      connection. The cluster client closes every node's connections when one command meets CLUSTERDOWN, MOVED
      re-initialisation or a pipeline's connection error, so in a failover other requests' commands lose theirs
      mid-send, and redis-py let that through as an ``AttributeError`` (its writer gone) or, on uvloop, a
      ``RuntimeError`` (the transport's handle closed): 500s.
    """

    _serializer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._serializer.pack(*args)
        return packed

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except (AttributeError, RuntimeError) as exc:
            if not _closed_beneath(exc):
                raise
            raise RedisConnectionError("the connection was closed while a command was being sent") from exc


def _closed_beneath(exc: AttributeError | RuntimeError) -> bool:
    """Whether ``exc`` is a write on a connection that was closed under it (not a programming error)."""
    if isinstance(exc, AttributeError):
        return exc.obj is None and exc.name in ("writelines", "write", "drain")  # the writer was set to None
    return "handler is closed" in str(exc)  # uvloop, writing on a closed transport


_Conn = TypeVar("_Conn", bound=AbstractConnection)
_HUB_CLASSES: dict[type[Any], type[Any]] = {}


def _as_hub_connection(cls: type[_Conn]) -> type[_Conn]:
    """``cls`` made a ``_HubConnection``, one subclass per connection class (plain, TLS, unix socket)."""
    if issubclass(cls, _HubConnection):
        return cls
    return _HUB_CLASSES.setdefault(cls, type(f"Hub{cls.__name__}", (_HubConnection, cls), {}))


@asynccontextmanager
async def unavailable_as_store_error() -> AsyncIterator[None]:
    """Within it, an error the store cannot serve through is raised as ``StoreUnavailable``."""
    try:
        yield
    except Exception as exc:
        if not store_cannot_serve(exc):
            raise
        raise as_store_unavailable(exc) from exc


def as_store_unavailable(exc: BaseException) -> StoreUnavailable:
    """The domain error for ``exc``, which stays its cause (in the log, never in an answer)."""
    error = StoreUnavailable("the shared store is unreachable")
    error.__cause__ = exc
    return error
