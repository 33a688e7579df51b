"""LiveKit: pick the deployment on the shortest user → SFU → worker path, and mint room-scoped tokens."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from livekit import api

from hub.settings import LiveKitDeployment
from shared.geo import haversine_km


@dataclass(frozen=True, slots=True)
class MintedToken:
    jwt: str
    expires_at: datetime


def choose_deployment(deployments: list[LiveKitDeployment], user: tuple[float, float],
                      worker: tuple[float, float]) -> LiveKitDeployment:
    """The SFU both media legs reach fastest: minimise user→SFU plus SFU→worker distance."""
    return min(
        deployments,
        key=lambda d: haversine_km(user[0], user[1], d.lat, d.lon) + haversine_km(d.lat, d.lon, worker[0], worker[1]),
    )


def mint_participant_token(deployment: LiveKitDeployment, room: str, identity: str, ttl_s: int) -> MintedToken:
    """A token that joins exactly one room, as the identity asked, and expires."""
    expires_at = datetime.now(UTC) + timedelta(seconds=ttl_s)
    jwt = (
        api.AccessToken(deployment.api_key, deployment.api_secret.get_secret_value())
        .with_identity(identity)
        .with_ttl(timedelta(seconds=ttl_s))
        .with_grants(api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True))
        .to_jwt()
    )
    return MintedToken(jwt=jwt, expires_at=expires_at)


def mint_agent_token(deployment: LiveKitDeployment, room: str, session_id: str, ttl_s: int) -> str:
    """The worker's agent participant: same single room, marked as an agent."""
    return (
        api.AccessToken(deployment.api_key, deployment.api_secret.get_secret_value())
        .with_identity(f"agent-{session_id}")
        .with_kind("agent")
        .with_ttl(timedelta(seconds=ttl_s))
        .with_grants(api.VideoGrants(room_join=True, room=room, agent=True, can_publish=True, can_subscribe=True))
        .to_jwt()
    )
