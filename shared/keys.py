"""The one place that builds Redis key names.

Every key of one worker carries the hash tag ``{w:ID}`` so that the reservation, confirmation, release and
heartbeat scripts each touch a single hash slot and run unchanged on Redis Cluster. The routing board that
hubs mirror in memory lives under ``{idx}``; a session-key claim lives under ``{k:KEY}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "fleet"

#: Separates the worker id from the random part of a session id: ``<worker_id>~<random>``.
SESSION_ID_SEPARATOR = "~"

WORKER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SESSION_KEY_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
_SESSION_ID_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})~([A-Za-z0-9_-]{8,64})$")


@dataclass(frozen=True, slots=True)
class WorkerKeys:
    """The keys of one worker, all in one hash slot."""

    info: str  # HASH: registration and last heartbeat
    leases: str  # ZSET: session id -> lease expiry (ms, Redis clock)
    active: str  # HASH: session id -> confirmed-at (ms); absent = pending
    sessions: str  # HASH: session id -> session record (JSON)

    def as_list(self) -> list[str]:
        return [self.info, self.leases, self.active, self.sessions]


def worker_keys(worker_id: str) -> WorkerKeys:
    tag = f"{PREFIX}:{{w:{worker_id}}}"
    return WorkerKeys(
        info=f"{tag}:info", leases=f"{tag}:leases", active=f"{tag}:active", sessions=f"{tag}:sessions"
    )


@dataclass(frozen=True, slots=True)
class BoardKeys:
    """The routing board every hub mirrors: denormalised worker views, one hash slot."""

    static: str  # HASH: worker id -> registration view (JSON), rewritten on (re)registration
    status: str  # HASH: worker id -> heartbeat view (JSON)
    used: str  # HASH: worker id -> used streams, written with the value each script returns
    #: ZSET: what changed when (Redis time, ms), so hubs read only that: member ``<id>`` when the worker's status
    #: or used view changed, ``+<id>`` when its registration view changed or it left the board.
    changes: str
    #: HASH: worker id -> when the registration whose view ``static`` holds ran (Redis time, ms, as the worker's own
    #: info hash records it): a heartbeat from another registration finds the board's view stale.
    registered: str
    #: STRING: which dataset the board is, created by the first read that finds none (Redis time): a Redis that
    #: restarted empty logs no removals, so a hub that finds another epoch than at its last read reads everything.
    epoch: str

    def as_list(self) -> list[str]:
        return [self.static, self.status, self.used, self.changes, self.registered, self.epoch]


BOARD = BoardKeys(
    static=f"{PREFIX}:{{idx}}:static",
    status=f"{PREFIX}:{{idx}}:status",
    used=f"{PREFIX}:{{idx}}:used",
    changes=f"{PREFIX}:{{idx}}:changes",
    registered=f"{PREFIX}:{{idx}}:registered",
    epoch=f"{PREFIX}:{{idx}}:epoch",
)

#: Short lock so only one hub per interval publishes capacity metrics to CloudWatch.
CLOUDWATCH_LOCK = f"{PREFIX}:{{idx}}:cloudwatch-lock"


def session_key_claim(session_key: str) -> str:
    """STRING holding the session id that serves a caller's ``session_key`` (or a pending claim)."""
    return f"{PREFIX}:{{k:{session_key}}}:session"


def release_receipt(worker_id: str, session_id: str) -> str:
    """STRING, kept briefly, that lets a resent release of a session answer what the first one did."""
    return f"{PREFIX}:{{w:{worker_id}}}:released:{session_id}"


def rate_limit_bucket(client: str) -> str:
    return f"{PREFIX}:{{rl:{client}}}:bucket"


def make_session_id(worker_id: str, random_part: str) -> str:
    return f"{worker_id}{SESSION_ID_SEPARATOR}{random_part}"


def worker_of_session(session_id: str) -> str | None:
    """The worker id embedded in a session id, or None when the id is not one of ours."""
    match = _SESSION_ID_RE.match(session_id)
    return match.group(1) if match else None


#: Characters of a session id's random part a log line shows: enough to find the session in an SRE's listing, far
#: too few to end it with (the id is a bearer capability: it reads and ends the session).
SHOWN_RANDOM_CHARS = 4


def shown_session_id(session_id: str) -> str:
    """``session_id`` as logs show it: its worker and the start of its random part (``w-1~NI0A…``)."""
    worker, separator, random_part = session_id.partition(SESSION_ID_SEPARATOR)
    if not separator:
        return f"{session_id[:SHOWN_RANDOM_CHARS]}…"
    return f"{worker}{separator}{random_part[:SHOWN_RANDOM_CHARS]}…"
