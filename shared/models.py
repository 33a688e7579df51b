"""Wire models of the HTTP contract between clients, hubs and workers (all JSON, under /api/v1)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from ipaddress import ip_address
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic import Strict as PydanticStrict
from yarl import URL

from shared.geo import AWS_REGIONS, must_be_known_region
from shared.keys import SESSION_KEY_PATTERN, WORKER_ID_PATTERN

WorkerId = Annotated[str, Field(pattern=WORKER_ID_PATTERN, description="Stable worker id, e.g. the EC2 instance id.")]
SessionKey = Annotated[str, Field(pattern=SESSION_KEY_PATTERN)]

#: LiveKit identities of the workers' agents (``agent-<room>``); no user may join as one.
AGENT_IDENTITY_PREFIX = "agent-"


def _not_an_agent(identity: str | None) -> str | None:
    if identity is not None and identity.startswith(AGENT_IDENTITY_PREFIX):
        raise ValueError(f"identities beginning with {AGENT_IDENTITY_PREFIX!r} are the workers' agents'")
    return identity
REGION_PATTERN = r"^[a-z]{2}(-[a-z]+)+-\d$"
Region = Annotated[str, Field(pattern=REGION_PATTERN, max_length=32, description="AWS region name.")]
#: A region a user is placed by: an unknown one would silently mean the default region's coordinates.
KnownRegion = Annotated[Region, AfterValidator(must_be_known_region),
                        Field(json_schema_extra={"enum": sorted(AWS_REGIONS)})]
#: Routing labels: keys as Kubernetes spells them, values any printable text (they reach the CLI's tables and the
#: dashboard, where a newline or an escape sequence would garble or forge a line).
LABEL_KEY_PATTERN = r"^[A-Za-z0-9._/-]{1,63}$"
LabelMap = Annotated[
    dict[Annotated[str, Field(pattern=LABEL_KEY_PATTERN)],
         Annotated[str, Field(max_length=128, pattern=r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$")]],
    # The key rule in the contract too: patternProperties alone let any other key through a schema check.
    Field(max_length=32, json_schema_extra={"propertyNames": {"pattern": LABEL_KEY_PATTERN}}),
]
#: The most streams one worker may offer: every heartbeat lists the sessions it runs, and the list has this bound.
MAX_STREAMS_PER_WORKER = 1024
#: The longest session id: ``<worker id, at most 64>~<random part, at most 64>`` (``shared.keys``).
MAX_SESSION_ID_CHARS = 129
SessionIdList = Annotated[list[Annotated[str, Field(max_length=MAX_SESSION_ID_CHARS)]],
                          Field(max_length=MAX_STREAMS_PER_WORKER)]
#: The largest heartbeat a worker can need to send: a full worker's sessions, each quoted with its comma, and the
#: figures beside them. Hubs accept heartbeats this large whatever their limit on other request bodies.
MAX_HEARTBEAT_BYTES = MAX_STREAMS_PER_WORKER * (MAX_SESSION_ID_CHARS + 3) + 2048
Percent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]


class Strict(BaseModel):
    """Base of every wire model: unknown fields are refused rather than silently dropped."""

    model_config = ConfigDict(extra="forbid")


#: A number sent as a JSON number: ``true`` or ``"48.8"`` is refused rather than read as 1.0 or 48.8.
StrictNumber = Annotated[float, PydanticStrict()]


class Location(Strict):
    lat: StrictNumber = Field(ge=-90, le=90, allow_inf_nan=False)
    lon: StrictNumber = Field(ge=-180, le=180, allow_inf_nan=False)


class WorkerState(StrEnum):
    READY = "ready"
    DRAINING = "draining"


class SessionStatus(StrEnum):
    """A session's lease as the hub holds it (SRE listings)."""

    ACTIVE = "active"  #: the worker accepted it; heartbeats renew it
    PENDING = "pending"  #: reserved, being handed over; lapses after ``pending_lease_s`` unless confirmed
    LAPSED = "lapsed"  #: pending past its lease: its slot counts free; the worker's next heartbeat adopts it if the
    #: worker runs it (a failover lost the confirmation) or drops it


class Policy(StrEnum):
    SPREAD = "spread"
    PACK = "pack"


class GpuInfo(Strict):
    name: str = Field(max_length=128)
    vram_total_mb: int = Field(ge=0, le=10_000_000)
    simulated: bool = False


def carries_credentials(url: str) -> bool:
    """Whether ``url`` holds a user or password (``http://user:pw@host``)."""
    parsed = URL(url)
    return parsed.user is not None or parsed.password is not None


# --- worker-facing -----------------------------------------------------------------------------------------


class WorkerRegistration(Strict):
    worker_id: WorkerId
    url: str = Field(max_length=512, pattern=r"^https?://[^\s]+$", description="Where the hub dispatches sessions.")
    region: Region
    zone: str | None = Field(default=None, max_length=32)
    location: Location | None = Field(default=None, validate_default=True,
                                      description="Else the region's coordinates, which must be known.")
    max_streams: int = Field(ge=0, le=MAX_STREAMS_PER_WORKER)
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=64)
    instance_type: str | None = Field(default=None, max_length=64)
    labels: LabelMap = Field(default_factory=dict)
    engine: str | None = Field(default=None, max_length=64)
    state: WorkerState = Field(
        default=WorkerState.READY,
        description="`draining` when a worker that is leaving registers again (the hub had lost it): it takes no "
                    "new session.",
    )
    drain_requested: bool = Field(
        default=False,
        description="An SRE had drained this worker through a hub and no resume has reached it. A hub that no longer "
                    "holds the worker (Redis restarted empty) drains it again; one that still does keeps its own "
                    "flag (a resume made meanwhile wins).",
    )

    @field_validator("location")
    @classmethod
    def _placeable(cls, value: Location | None, info: ValidationInfo) -> Location | None:
        """A worker the hub cannot place on the map would be ranked as if it stood at some other place."""
        if value is None and "region" in info.data:  # a region that failed its own checks is reported there
            try:
                must_be_known_region(info.data["region"])
            except ValueError as exc:
                raise ValueError(f"{exc}: send `location`") from None
        return value
    audio_url: str | None = Field(
        default=None, max_length=512, pattern=r"^wss?://[^\s]*\{session_id\}[^\s]*$",
        description="Where a client streams a session's audio over a WebSocket, `{session_id}` standing for the "
                    "session, for engines that serve one (e.g. `wss://w1.example.com/sessions/{session_id}/audio`).",
    )

    @field_validator("url")
    @classmethod
    def _dispatchable(cls, value: str) -> str:
        """A URL the hub's HTTP client can call: a host it can encode, no credentials (the hub sends its own)."""
        if carries_credentials(value):
            raise ValueError("must not carry credentials")
        url = URL(value)
        host = url.host or ""
        try:
            ip_address(host.strip("[]"))
        except ValueError:
            try:
                host.encode("idna")
            except UnicodeError:
                raise ValueError("the host is not a valid host name") from None
        return value


class RegistrationAccepted(Strict):
    worker_id: str
    heartbeat_interval_s: float
    ttl_s: float
    worker_secret: str = Field(
        description="Per-worker credential: heartbeats and deregistration must carry it as X-Worker-Secret."
    )
    state: WorkerState


class Heartbeat(Strict):
    active_sessions: SessionIdList = Field(default_factory=list)
    cpu_percent: Percent = 0.0
    memory_percent: Percent = 0.0
    gpu_utilization: Percent = 0.0
    vram_used_mb: int = Field(default=0, ge=0, le=10_000_000)
    latency_ms: float = Field(default=0.0, ge=0, le=3_600_000, allow_inf_nan=False)
    error_rate: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    state: WorkerState = WorkerState.READY
    seq: int | None = Field(
        default=None, ge=0, le=2**53,
        description="This heartbeat's number (the worker counts its heartbeats); with the `accepted_at_seq` of "
                    "a session it tells the hub whether this heartbeat was built after the worker took it.",
    )
    ack: bool = Field(
        default=True,
        description="On the heartbeat channel only: whether the hub answers this heartbeat. Without it the hub "
                    "answers only with news: a state other than the one reported (an SRE drain), sessions to "
                    "stop, or an error. A POSTed heartbeat is always answered.",
    )


class HeartbeatReply(Strict):
    worker_id: str
    state: WorkerState = Field(description="The state the hub holds: `draining` when the worker or an SRE drains it.")
    used_streams: int
    max_streams: int
    heartbeat_interval_s: float
    stop_sessions: list[str] = Field(
        default_factory=list, description="Sessions the worker runs that the hub does not hold; stop them."
    )


class SessionDispatch(Strict):
    """What the hub sends to ``POST {worker.url}/sessions``."""

    session_id: str = Field(min_length=1, max_length=MAX_SESSION_ID_CHARS, pattern=r"^[A-Za-z0-9._~-]+$",
                            description="The hub's `<worker_id>~<random>`; URL-safe, as the worker's routes take it, "
                                        "and no longer than a heartbeat may list.")
    session_key: str | None = Field(default=None, max_length=128)
    room: str = Field(max_length=256)
    livekit_url: str = Field(max_length=512)
    token: str = Field(max_length=8192, description="LiveKit token of the worker's agent participant.")


class WorkerSessionInfo(Strict):
    session_id: str
    session_key: str | None = None
    room: str
    started_at: float
    state: str = "running"
    accepted_at_seq: int | None = Field(
        default=None, description="The number of the worker's last heartbeat before it took the session: every "
                                  "later heartbeat reports the session while it runs."
    )


# --- client-facing -----------------------------------------------------------------------------------------


class SessionRequest(Strict):
    session_key: SessionKey | None = Field(default=None, description=(
        "The caller's id for the conversation, and its credential: whoever presents the key of a live session gets "
        "a token to join it, so make it unguessable (e.g. 128 random bits, or an HMAC your backend derives from the "
        "user and the conversation). A request with the key of a live session is answered that session (200), "
        "whatever its location and labels; one whose session ended places a new one."))
    location: Location | None = Field(default=None, description=(
        "Where the user is; the session goes to the best worker by distance from here, load and latency. Without "
        "it the hub uses CloudFront's viewer headers, then `region`, then its default region."))
    region: KnownRegion | None = Field(default=None, description=(
        "Where the user is, when the client knows no better than an AWS region: the region's coordinates stand for "
        "the user's. A hint, not a constraint: when that region is full the session goes to the nearest one with "
        "room; ignored when `location` is given."))
    identity: Annotated[str | None, AfterValidator(_not_an_agent)] = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$",
        description="The user's LiveKit participant identity; the same for every token of one session.",
        # The refusal in the contract too (pydantic's regex has no lookahead to say it in the pattern).
        json_schema_extra={"not": {"type": "string", "pattern": f"^{AGENT_IDENTITY_PREFIX}"}})
    labels: LabelMap = Field(default_factory=dict, description=(
        "Labels the worker must have, every one of them (e.g. `{\"engine\": \"voice\"}`); other labels the worker "
        "has do not matter. Without labels any worker may take the session: in a fleet that mixes engines, ask for "
        "the engine's label. No live worker with them is 503 `no_matching_worker`."))


class WorkerRef(Strict):
    id: str
    region: str
    audio_url: str | None = Field(
        default=None, description="The worker's audio WebSocket for this session, when its engine serves one; "
                                  "authenticate with `?token=` and the LiveKit participant token."
    )


class LiveKitConfig(Strict):
    url: str
    region: str
    room: str
    token: str | None = Field(description="Participant token; only in the answer to POST /api/v1/sessions.")


class SessionConfig(Strict):
    session_id: str = Field(description="Reads (GET) and ends (DELETE) the session: keep it as the key is kept.")
    session_key: str | None = Field(description="The key the request gave; null in GET answers, which anyone "
                                                "holding the session id may read.")
    worker: WorkerRef
    livekit: LiveKitConfig
    expires_at: datetime = Field(description="When the participant token expires: in a GET answer, which holds no "
                                             "token, the one the session was created with.")


class ValidationIssue(Strict):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(Strict):
    error: str
    message: str
    detail: list[ValidationIssue] | None = Field(default=None, description="Where and why, on 422 answers.")


# --- SRE-facing --------------------------------------------------------------------------------------------


class WorkerView(Strict):
    worker_id: str
    url: str
    region: str
    zone: str | None
    location: Location
    state: WorkerState
    status: Literal["ready", "draining", "stale"] = Field(
        description="What routing makes of the worker, as the CLI and the dashboard show it: `stale` when no "
                    "heartbeat came within the TTL, whatever its `state`; else its `state`. The listing's "
                    "`?state=` filter matches this.")
    drain_requested: bool
    alive: bool
    max_streams: int
    used_streams: int
    free_streams: int
    heartbeat_age_s: float | None
    latency_ms: float
    error_rate: float
    cpu_percent: float
    memory_percent: float
    gpu_utilization: float
    vram_used_mb: int
    gpus: list[GpuInfo]
    instance_type: str | None
    labels: dict[str, str]
    engine: str | None
    registered_at: float


#: The most workers, or sessions, one page of an SRE listing holds: a listing's cost to the hub that answers it (and
#: to the client requests that hub serves meanwhile) is bounded by a page, not by the fleet.
MAX_PAGE = 1000
#: What one page holds when the request names no ``limit``.
DEFAULT_PAGE = 500
#: The worker listing's cursor: the last worker of the page before, as ``region/worker_id`` (the listing's order).
#: The session listing's is the id of the last worker whose sessions it listed. Clients pass back ``next_cursor``.
WORKER_CURSOR_PATTERN = r"^[a-z0-9-]{1,32}/" + WORKER_ID_PATTERN.removeprefix("^")


class WorkerList(Strict):
    workers: list[WorkerView]
    next_cursor: str | None = Field(
        default=None, description="Where the next page starts (pass it as `cursor`); null on the last page.")


class RegionCapacity(Strict):
    region: str
    workers: int
    ready_workers: int
    max_streams: int
    used_streams: int
    free_streams: int


class FleetCapacity(Strict):
    regions: list[RegionCapacity]
    total: RegionCapacity


class SessionSummary(Strict):
    session_id: str
    session_key: str | None
    worker_id: str
    worker_region: str
    livekit_region: str
    room: str
    status: SessionStatus
    created_at: float
    location: Location | None


class SessionList(Strict):
    sessions: list[SessionSummary]
    next_cursor: str | None = Field(
        default=None, description="Where the next page starts (pass it as `cursor`); null on the last page.")


class ScoreFactors(Strict):
    distance_km: float
    rtt_ms: float
    distance: float
    load: float
    latency: float
    capacity: float


class Candidate(Strict):
    worker_id: str
    region: str
    score: float
    factors: ScoreFactors
    used_streams: int
    max_streams: int
    near_best: bool = Field(
        description="Within FLEET_NEAR_BEST_MARGIN of the best: a placement leads with one of these, drawn "
                    "uniformly, so that many hubs do not all pick the same worker.")


class RouteExplanation(Strict):
    location: Location
    location_source: str
    policy: Policy
    livekit_region: str | None
    candidates: list[Candidate]
    note: str | None = Field(default=None, description="Why there is no candidate, when there is none, with the "
                                                       "error a session request would get.")


