"""Hub settings. Each field reads ``FLEET_<NAME>``; ``FLEET_ENV=prod`` refuses unsafe defaults."""

from __future__ import annotations

import ipaddress
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator

from hub.scoring import Weights
from shared.auth import DEFAULT_ADMIN_TOKEN, DEFAULT_WORKER_TOKEN
from shared.errors import describe_problems
from shared.geo import must_be_known_region
from shared.models import Policy
from shared.settings import MIN_PROD_SECRET_CHARS, FleetSettings

DEV_LIVEKIT_URL = "ws://localhost:7880"
DEV_LIVEKIT_KEY = "devkey"
DEV_LIVEKIT_SECRET = "secret"  # noqa: S105 - LiveKit's documented dev default, refused in prod


class LiveKitDeployment(BaseModel):
    """One LiveKit (SFU) deployment the hub can send users to."""

    region: str
    url: str
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    api_key: str
    api_secret: SecretStr


#: The scoring's own defaults, so the settings and ``Weights()`` cannot drift apart.
_WEIGHTS = Weights()


#: What ``hub.redis_client.connect`` takes (``+cluster`` asks for a Redis Cluster client).
REDIS_URL_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "unix")


def _origin(origin: str) -> str:
    """``origin`` as a browser writes it in its ``Origin`` header: host in lower case, an IPv6 address in brackets in
    its shortest form (``http://[::1]:3000``)."""
    match = re.fullmatch(r"(https?://)(?:([A-Za-z0-9.-]+)|\[([0-9A-Fa-f:.]+)\])(:\d{1,5})?", origin)
    if match is not None and match[3] is not None:
        try:
            return f"{match[1]}[{ipaddress.IPv6Address(match[3]).compressed}]{match[4] or ''}"
        except ValueError:
            pass
    elif match is not None:
        return origin.lower()
    raise ValueError(f"{origin!r} is not an origin such as https://app.example.com (no path, no wildcard)")


class HubSettings(FleetSettings):
    admin_token: SecretStr = Field(default=SecretStr(DEFAULT_ADMIN_TOKEN), description="SRE bearer token.")

    redis_url: str | None = Field(
        default=None,
        repr=False,  # may carry the AUTH token
        description="redis://, rediss:// (TLS), or redis+cluster:// / rediss+cluster:// for Redis Cluster. "
        "Unset in dev: the hub starts an embedded redis-server (one local hub; the processes of "
        "`fleet hub --workers N` share one).",
    )
    redis_cluster: bool = Field(default=False, description="Treat redis_url as a Redis Cluster seed node.")
    redis_max_connections: int = Field(default=64, ge=1, description="Pool size; requests wait for a connection.")
    redis_timeout_s: float = Field(
        default=1.0, gt=0, description="Socket and connect timeout of Redis calls. A command is tried three times, so "
                                       "a Redis that does not answer is a 503 after about three times this."
    )
    redis_pool_wait_s: float = Field(
        default=5.0, gt=0, description="How long a request may queue for a pooled connection during a burst."
    )

    heartbeat_interval_s: float = Field(default=3.0, gt=0, description="How often workers heartbeat.")
    worker_ttl_s: float = Field(
        default=9.0, gt=0, description="A worker silent this long leaves routing (LiveKit evicts after 5 s)."
    )
    dispatch_timeout_s: float = Field(default=3.0, gt=0, description="How long a worker may take to accept.")
    pending_lease_s: float = Field(
        default=8.0, gt=0, description="Life of a reserved-but-unconfirmed slot; outlives a dispatch."
    )
    active_lease_s: float = Field(
        default=12.0, gt=0, description="Life of a confirmed slot between heartbeats that report the session."
    )
    absent_grace_s: float = Field(
        default=5.0, ge=0, description="An active session a heartbeat omits is released only after this long."
    )
    retention_s: float = Field(default=3600.0, gt=0, description="Keys of a silent worker are dropped after this.")
    max_dispatch_attempts: int = Field(default=3, ge=1, description=(
        "Dispatches per session request (workers that refuse a reservation on a stale board do not count; at "
        "most 64 reservations in all)."))
    affinity_ttl_s: float = Field(default=86400.0, gt=0, description="How long a session_key remembers its session.")

    policy: Policy = Field(default=Policy.SPREAD, description="`spread` (best experience) or `pack` (fewest GPUs).")
    weight_distance: float = Field(default=_WEIGHTS.distance, ge=0, description="Score weight of user→worker distance.")
    weight_load: float = Field(default=_WEIGHTS.load, ge=0, description="Score weight of stream and GPU load.")
    weight_latency: float = Field(default=_WEIGHTS.latency, ge=0,
                                  description="Score weight of reported inference latency.")
    weight_capacity: float = Field(default=_WEIGHTS.capacity, ge=0, description="Score weight of free slots.")
    near_best_margin: float = Field(
        default=0.05, ge=0, description="Candidates within this score of the best share the traffic (anti-herding)."
    )
    snapshot_refresh_s: float = Field(default=1.0, gt=0, description="How often a hub re-reads the routing board.")

    default_region: str = Field(default="us-east-1", description="Where users with no location are assumed to be.")
    livekit_regions: str | None = Field(
        default=None, repr=False,
        description="LiveKit deployments, each region name once: an inline JSON list, inline multi-line YAML, "
                    "or a path to a JSON/YAML file.",
    )
    livekit_token_ttl_s: int = Field(default=3600, gt=0, le=30 * 86400,
                                     description="Lifetime of minted participant tokens (at most 30 days).")

    max_body_bytes: int = Field(default=64 * 1024, gt=0, description=(
        "Larger request bodies get 413; heartbeats are allowed what a full worker's needs (about 137 KB)."))
    rate_limit_per_s: float = Field(default=20.0, ge=0, description="Session requests per client per second; 0 = off.")
    rate_limit_burst: int = Field(default=40, ge=1, description="Burst size of the per-client limit.")
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description='Peers whose X-Forwarded-For is believed (CIDRs or addresses), as a JSON list: ["10.0.0.0/16"].',
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description='Web origins whose pages may call the client routes (`/api/v1/sessions`) from the browser, as '
                    'a JSON list: ["https://app.example.com"]. Empty: no page of another origin may (a client app\'s '
                    'backend calls them). No other route ever answers another origin.',
    )
    client_address_header: str | None = Field(
        default=None, max_length=64,
        description="A header a trusted proxy sets to the viewer's `ip:port`, believed before X-Forwarded-For: "
                    "`CloudFront-Viewer-Address` behind CloudFront, whose own hop would otherwise be the client "
                    "(every viewer behind one edge would share a rate limit). Only safe when nothing but the CDN "
                    "reaches the trusted proxy.",
    )

    cloudwatch_enabled: bool = Field(default=False, description="Publish per-region capacity to CloudWatch.")
    cloudwatch_namespace: str = Field(default="GpuFleet", description="CloudWatch namespace of capacity metrics.")
    cloudwatch_interval_s: float = Field(default=60.0, gt=0, description="At most one publication per interval.")
    cloudwatch_region: str | None = Field(default=None, description="AWS region of the CloudWatch API.")
    cloudwatch_worker_regions: list[str] = Field(
        default_factory=list,
        description="Regions of the worker groups that scale on these metrics (JSON list): each gets a datapoint even "
                    "with no live worker (a free-slot ratio of 0), so a group at zero scales out.",
    )

    @field_validator("redis_url")
    @classmethod
    def _readable_redis_url(cls, value: str | None) -> str | None:
        """Read now, never echoed (it may carry the AUTH token): an unencoded '#', '?' or '/' in the password makes
        another URL of it, which would fail in the lifespan with a traceback quoting part of the password."""
        if not value:
            return value
        unreadable = "not a valid Redis URL (percent-encode '#', '?', '/', '@' and ':' in the password)"
        try:
            parts = urlsplit(value)
            _ = parts.port  # a ValueError when what stands where the port goes is not a number
        except ValueError:
            raise ValueError(unreadable) from None
        if parts.scheme not in REDIS_URL_SCHEMES:
            raise ValueError(f"the scheme must be one of {', '.join(REDIS_URL_SCHEMES)}")
        # What an unencoded '#', '?' or '/' leaves behind: a fragment, an '@' past the host, a path that is no db.
        if parts.fragment or "@" in parts.path + parts.query or (
                parts.scheme != "unix" and not re.fullmatch(r"(/\d*)?", parts.path)):
            raise ValueError(unreadable)
        return value

    @field_validator("default_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        return must_be_known_region(value)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        """An origin as a browser sends it: scheme, host and port, nothing else (a trailing slash never matches), in
        lower case (a browser lower-cases the host: ``https://App.example.com`` would never match)."""
        return [_origin(origin) for origin in value]

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP address or CIDR") from None
        return value

    @model_validator(mode="after")
    def _readable_livekit_regions(self) -> Self:
        """Read the deployments now: a missing file or a bad entry stops the hub at start, not each request."""
        try:
            deployments = self.livekit_deployments
        except ValidationError as exc:  # its text would echo the entry, secret included
            raise ValueError("FLEET_LIVEKIT_REGIONS has an invalid deployment: "
                             f"{describe_problems(exc.errors())}") from None
        except yaml.YAMLError as exc:  # its text quotes the offending line, which may hold an api_secret
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"FLEET_LIVEKIT_REGIONS is not valid YAML{where}: "
                             f"{getattr(exc, 'problem', None) or type(exc).__name__}") from None
        except OSError as exc:  # never the value itself: an inline value mistaken for a path holds the secrets
            raise ValueError(f"FLEET_LIVEKIT_REGIONS names a file that cannot be read: "
                             f"{exc.strerror or type(exc).__name__}") from None
        except (ValueError, TypeError) as exc:  # json's messages give a position, never the text
            raise ValueError(f"FLEET_LIVEKIT_REGIONS cannot be read: {type(exc).__name__}: {exc}") from None
        if not deployments:
            raise ValueError("FLEET_LIVEKIT_REGIONS lists no LiveKit deployment")
        names = [d.region for d in deployments]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            # Sessions find their deployment again by region name: two under one name would hand a client one
            # deployment's URL with the other's token.
            raise ValueError(f"FLEET_LIVEKIT_REGIONS names a region more than once: {', '.join(twice)}")
        return self

    def unsafe_in_production(self) -> list[str]:
        problems = []
        if not self.redis_url:
            problems.append("FLEET_REDIS_URL must be set (the embedded Redis is for a single local hub)")
        if self.worker_token.get_secret_value() == DEFAULT_WORKER_TOKEN:
            problems.append("FLEET_WORKER_TOKEN must not be the dev default")
        else:
            problems += super().unsafe_in_production()
        if self.admin_token.get_secret_value() == DEFAULT_ADMIN_TOKEN:
            problems.append("FLEET_ADMIN_TOKEN must not be the dev default")
        elif len(self.admin_token.get_secret_value()) < MIN_PROD_SECRET_CHARS:
            problems.append(f"FLEET_ADMIN_TOKEN must have at least {MIN_PROD_SECRET_CHARS} characters")
        if self.admin_token.get_secret_value() == self.worker_token.get_secret_value():
            # Hubs send the worker token to every worker they dispatch to: every GPU host would be an SRE.
            problems.append("FLEET_ADMIN_TOKEN must differ from FLEET_WORKER_TOKEN")
        if not self.livekit_regions:
            problems.append("FLEET_LIVEKIT_REGIONS must list the LiveKit deployments")
        elif any(d.api_secret.get_secret_value() == DEV_LIVEKIT_SECRET for d in self.livekit_deployments):
            problems.append("LiveKit API secrets must not be the dev default")
        elif any(len(d.api_secret.get_secret_value()) < MIN_PROD_SECRET_CHARS for d in self.livekit_deployments):
            problems.append(f"LiveKit API secrets must have at least {MIN_PROD_SECRET_CHARS} characters")
        return problems

    @cached_property
    def livekit_deployments(self) -> list[LiveKitDeployment]:
        """Configured deployments; in dev with nothing configured, LiveKit's local dev server."""
        if not self.livekit_regions:
            return [
                LiveKitDeployment(
                    region="local", url=DEV_LIVEKIT_URL, lat=38.95, lon=-77.45,
                    api_key=DEV_LIVEKIT_KEY, api_secret=SecretStr(DEV_LIVEKIT_SECRET),
                )
            ]
        raw = self.livekit_regions.strip()
        if raw.startswith(("[", "{")):
            data = json.loads(raw)
        elif "\n" in raw:
            data = yaml.safe_load(raw)  # inline YAML, as a multi-line environment value
        else:
            text = Path(raw).read_text()
            data = yaml.safe_load(text) if raw.endswith((".yaml", ".yml")) else json.loads(text)
        if not isinstance(data, list):
            raise TypeError("expected a list of deployments")
        return [LiveKitDeployment.model_validate(item) for item in data]

    @property
    def weights(self) -> Weights:
        return Weights(self.weight_distance, self.weight_load, self.weight_latency, self.weight_capacity)

    @property
    def ttl_ms(self) -> int:
        return int(self.worker_ttl_s * 1000)
