"""LiveKit: pick the deployment on the shortest user → SFU → worker path, and mint room-scoped tokens.

Tokens carry exactly the claims livekit-api's ``AccessToken`` writes: the claim set for each kind of participant
is taken from an ``AccessToken`` once, at import; minting fills in the room, identity and times and signs it
(HS256, as ``AccessToken.to_jwt`` does). ``to_jwt`` rebuilds the claims with ``dataclasses.asdict`` and a deep
copy on every call, which was most of the ~0.15 ms each of a session's two tokens cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from livekit import api

from hub.settings import LiveKitDeployment
from shared.geo import haversine_km


@dataclass(frozen=True, slots=True)
class MintedToken:
    jwt: str
    expires_at: datetime


def _claims_of(token: api.AccessToken) -> dict[str, Any]:
    claims: dict[str, Any] = token.claims.asdict()
    return claims


_ROOM = "-"  # replaced per token
#: A user: joins one room, publishes its microphone and camera, subscribes to the avatar.
_PARTICIPANT_CLAIMS = _claims_of(api.AccessToken("-", "-").with_grants(
    api.VideoGrants(room_join=True, room=_ROOM, can_publish=True, can_subscribe=True)))
#: The worker's agent participant: the same single room, marked as an agent.
_AGENT_CLAIMS = _claims_of(api.AccessToken("-", "-").with_kind("agent").with_grants(
    api.VideoGrants(room_join=True, room=_ROOM, agent=True, can_publish=True, can_subscribe=True)))


def choose_deployment(deployments: list[LiveKitDeployment], user: tuple[float, float],
                      worker: tuple[float, float]) -> LiveKitDeployment:
    """The SFU both media legs reach fastest: minimise user→SFU plus SFU→worker distance."""
    return min(
        deployments,
        key=lambda d: haversine_km(user[0], user[1], d.lat, d.lon) + haversine_km(d.lat, d.lon, worker[0], worker[1]),
    )


def mint_participant_token(deployment: LiveKitDeployment, room: str, identity: str, ttl_s: int) -> MintedToken:
    """A token that joins exactly one room, as the identity asked, and expires."""
    return _mint(_PARTICIPANT_CLAIMS, deployment, room, identity, ttl_s)


def mint_agent_token(deployment: LiveKitDeployment, room: str, session_id: str, ttl_s: int) -> str:
    """The worker's agent participant for one session."""
    return _mint(_AGENT_CLAIMS, deployment, room, f"agent-{session_id}", ttl_s).jwt


def _mint(template: dict[str, Any], deployment: LiveKitDeployment, room: str, identity: str,
          ttl_s: int) -> MintedToken:
    if not room or not identity:
        raise ValueError("identity and room must be set when joining a room")  # as AccessToken.to_jwt
    now = datetime.now(UTC).replace(microsecond=0)
    expires_at = now + timedelta(seconds=ttl_s)
    claims = {**template, "video": {**template["video"], "room": room}, "sub": identity, "iss": deployment.api_key,
              "nbf": int(now.timestamp()), "exp": int(expires_at.timestamp())}
    token = jwt.encode(claims, deployment.api_secret.get_secret_value(), algorithm="HS256")
    return MintedToken(jwt=token, expires_at=expires_at)
