"""Worker settings. Each field reads ``FLEET_<NAME>``; ``FLEET_ENV=prod`` refuses the default worker token."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from typing import Annotated, Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import NoDecode

from shared.errors import reason
from shared.keys import WORKER_ID_PATTERN
from shared.models import MAX_STREAMS_PER_WORKER, REGION_PATTERN, WorkerRegistration, carries_credentials
from shared.settings import FleetSettings
from worker.engine import VramProfile
from worker.gpus import parse_simulated


class WorkerSettings(FleetSettings):
    host: str = Field(default="0.0.0.0", description="Interface the worker's HTTP API listens on.")
    port: int = Field(default=8100, ge=0, le=65535, description="Port of the worker's HTTP API (0 = any free port).")
    advertise_url: str | None = Field(
        default=None, description="URL hubs dispatch to; else http://<EC2 private IP>:<port>, off EC2 the bound host "
                                  "or, when it binds every interface (0.0.0.0, ::), the machine's hostname.",
    )
    hub_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://127.0.0.1:8080"], repr=False,  # kept out of logs, whatever they hold
        description="Hubs to register with, tried in turn: comma-separated or a JSON list.",
    )
    worker_id: str | None = Field(default=None, pattern=WORKER_ID_PATTERN,
                                  description="Stable id; else the EC2 instance id, else hostname-port.")
    region: str | None = Field(default=None, pattern=REGION_PATTERN,
                               description="AWS region; else from IMDS, else us-east-1.")
    zone: str | None = Field(default=None, description="Availability zone; else from IMDS.")
    location_lat: float | None = Field(default=None, ge=-90, le=90, description=(
        "Override of the region's latitude; required with FLEET_LOCATION_LON in a region gpu-fleet has no "
        "coordinates of (`shared/geo.py`)."))
    location_lon: float | None = Field(default=None, ge=-180, le=180, description="Override of the region's longitude.")
    simulate_gpu: str | None = Field(
        default=None, description="Pretend to have GPUs, e.g. `t4`, `a10gx4`, `h100x8` (dev and tests)."
    )
    max_streams: int | None = Field(default=None, ge=0, le=MAX_STREAMS_PER_WORKER,
                                    description="Explicit capacity; wins over the VRAM formula.")
    engine: str = Field(default="synthetic", description="`synthetic` (simulator) or `voice`.")
    model_mb: int | None = Field(default=None, ge=0, description="Override of the engine's model VRAM per GPU.")
    per_stream_mb: int | None = Field(default=None, gt=0, description="Override of the engine's VRAM per stream.")
    headroom_mb: int | None = Field(default=None, ge=0, description="Override of the VRAM kept free per GPU.")
    drain_timeout_s: float = Field(default=300.0, ge=0, description="How long SIGTERM waits for sessions to end.")
    lifecycle_hook_name: str | None = Field(
        default=None,
        description="ASG termination lifecycle hook to complete after draining (FLEET_LIFECYCLE_HOOK_NAME).",
    )
    autoscaling_group: str | None = Field(
        default=None, description="ASG name; else read from the instance's tags via IMDS when hooks need it."
    )
    protect_from_scale_in: bool = Field(
        default=False, description="Hold ASG scale-in protection while sessions run (FLEET_PROTECT_FROM_SCALE_IN)."
    )
    labels: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict,
                                                        description="Routing labels (JSON object).")
    imds_url: str = Field(default="http://169.254.169.254", description="EC2 instance metadata endpoint.")
    imds_timeout_s: float = Field(default=0.3, gt=0, description="Per-call IMDS timeout: off EC2 this fails fast.")
    hub_timeout_s: float = Field(default=3.0, gt=0, description="Timeout of every call to a hub.")
    register_backoff_cap_s: float = Field(default=10.0, gt=0, description="Longest wait between registration tries.")
    public_url: str | None = Field(
        default=None, pattern=r"^https?://[^\s]+$",
        description="How clients reach this worker (its audio WebSocket), e.g. behind a public load balancer; else "
                    "the advertised URL.",
    )
    heartbeat_channel: bool = Field(
        default=True, description="Send heartbeats over one WebSocket kept open to the hub (falls back to POST when "
                                  "the hub or a proxy refuses it); false: POST every heartbeat.",
    )

    @field_validator("simulate_gpu")
    @classmethod
    def _known_gpu(cls, value: str | None) -> str | None:
        if value:
            parse_simulated(value)  # a ValueError names the GPUs it knows
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except ValueError:
                raise ValueError("must be a JSON object, e.g. {\"tier\": \"premium\"}") from None
        return value

    @field_validator("advertise_url", "zone", "labels")
    @classmethod
    def _registrable(cls, value: Any, info: ValidationInfo) -> Any:
        """What the registration will carry passes its rules now: a bad value stops the start with the variable's
        name, instead of every registration failing."""
        if value is None:
            return value
        field = _REGISTRATION_FIELDS[info.field_name or ""]
        try:
            WorkerRegistration.__pydantic_validator__.validate_assignment(WorkerRegistration.model_construct(), field,
                                                                          value)
        except ValidationError as exc:
            problems = "; ".join(_problem(error) for error in exc.errors(include_url=False, include_input=False))
            raise PydanticCustomError("registration_field", "{problems}", {"problems": problems}) from None
        return value

    @field_validator("hub_urls", mode="before")
    @classmethod
    def _split_hub_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("hub_urls")
    @classmethod
    def _strip_slashes(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one hub URL is needed")
        if any(map(carries_credentials, value)):
            # aiohttp refuses URL credentials beside the worker token's Authorization header: it could never register
            raise ValueError("a hub URL must not carry credentials")
        return [url.rstrip("/") for url in value]

    @property
    def expects_ec2(self) -> bool:
        """Configured for an EC2 Auto Scaling group: the instance metadata must answer before the worker starts."""
        return bool(self.lifecycle_hook_name or self.protect_from_scale_in)

    def vram_profile(self, engine_profile: VramProfile) -> VramProfile:
        """The engine's own figures with FLEET_MODEL_MB, FLEET_PER_STREAM_MB and FLEET_HEADROOM_MB put over them."""
        overrides = {"model_mb": self.model_mb, "per_stream_mb": self.per_stream_mb, "headroom_mb": self.headroom_mb}
        return replace(engine_profile, **{name: mb for name, mb in overrides.items() if mb is not None})

    def fallback_worker_id(self, port: int) -> str:
        """hostname-port, trimmed to the id pattern (the host, not the port: workers on one host stay apart):
        for machines without IMDS."""
        name = socket.gethostname()  # Linux takes any character in it; the id takes ASCII letters and digits
        host = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in name).lstrip("._-")
        suffix = f"-{port}"
        return f"{(host or 'worker')[:64 - len(suffix)]}{suffix}"


#: Settings the registration carries as they are, by the name of the registration's field.
_REGISTRATION_FIELDS = {"advertise_url": "url", "zone": "zone", "labels": "labels"}


def _problem(error: ErrorDetails) -> str:
    """One problem of a registration field, without the value (a label may hold what should not be logged)."""
    where = ".".join(str(part) for part in error["loc"][1:])  # the part inside the field: a label's key
    return f"{where}: {reason(error)}" if where else reason(error)
