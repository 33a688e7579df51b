"""LiveKit: pick the deployment on the shortest user → SFU → worker path, and mint room-scoped tokens.

Tokens carry exactly the claims livekit-api's ``AccessToken`` writes: the claim set for each kind of participant
is taken from an ``AccessToken`` once, at import; minting fills in the room, identity and times and signs it
(HS256, as ``AccessToken.to_jwt`` does). ``to_jwt`` rebuilds the claims with ``dataclasses.asdict`` and a deep
copy on every call, which was most of the ~0.15 ms each of a session's two tokens cost. Signing uses pyjwt's own
HS256 algorithm with the key it prepared once per secret: ``jwt.encode`` re-checks the key (PEM, DER, SSH, length)
on every call, 40% of its cost. The bytes are those ``jwt.encode`` writes (``tests/test_livekit_tokens.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from jwt.algorithms import HMACAlgorithm
from jwt.utils import base64url_encode
from livekit import api

from hub.settings import LiveKitDeployment
from shared.geo import haversine_km
from shared.models import AGENT_IDENTITY_PREFIX


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


#: Media paths within this fraction of the shortest (or ``_EQUAL_PATH_KM``, if more) count as equally short.
_EQUAL_PATH_FRACTION = 0.01
_EQUAL_PATH_KM = 50.0


def choose_deployment(deployments: list[LiveKitDeployment], user: tuple[float, float],
                      worker: tuple[float, float]) -> LiveKitDeployment:
    """The SFU both media legs reach fastest: minimise user→SFU plus SFU→worker distance. Among SFUs on paths as
    short (any SFU on the way between a Tokyo user and an Oregon worker, Tokyo's and Oregon's alike), the one nearest
    the user: that leg crosses the public internet, the worker's runs between data centres. Before, the first one
    listed won, in floating-point noise."""
    paths = [(haversine_km(user[0], user[1], d.lat, d.lon), haversine_km(d.lat, d.lon, worker[0], worker[1]), d)
             for d in deployments]
    shortest = min(to_user + to_worker for to_user, to_worker, _ in paths)
    equal = shortest + max(_EQUAL_PATH_KM, shortest * _EQUAL_PATH_FRACTION)
    return min(((to_user, d) for to_user, to_worker, d in paths if to_user + to_worker <= equal),
               key=lambda found: found[0])[1]


def mint_participant_token(deployment: LiveKitDeployment, room: str, identity: str, ttl_s: int) -> MintedToken:
    """A token that joins exactly one room, as the identity asked, and expires."""
    return _mint(_PARTICIPANT_CLAIMS, deployment, room, identity, ttl_s)


def mint_agent_token(deployment: LiveKitDeployment, room: str, ttl_s: int) -> str:
    """The worker's agent participant for one session, named after its room: every participant sees the name, so it
    must not carry the session id."""
    return _mint(_AGENT_CLAIMS, deployment, room, f"{AGENT_IDENTITY_PREFIX}{room}", ttl_s).jwt


def _mint(template: dict[str, Any], deployment: LiveKitDeployment, room: str, identity: str,
          ttl_s: int) -> MintedToken:
    if not room or not identity:
        raise ValueError("identity and room must be set when joining a room")  # as AccessToken.to_jwt
    now = datetime.now(UTC).replace(microsecond=0)
    expires_at = now + timedelta(seconds=ttl_s)
    claims = {**template, "video": {**template["video"], "room": room}, "sub": identity, "iss": deployment.api_key,
              "nbf": int(now.timestamp()), "exp": int(expires_at.timestamp())}
    return MintedToken(jwt=sign_hs256(claims, deployment.api_secret.get_secret_value()), expires_at=expires_at)


_HS256 = HMACAlgorithm(HMACAlgorithm.SHA256)
#: The header ``jwt.encode`` writes for HS256 (sorted keys, no spaces).
_HS256_HEADER = base64url_encode(b'{"alg":"HS256","typ":"JWT"}')


@lru_cache(maxsize=64)
def _hs256_key(secret: str) -> bytes:
    """pyjwt's checks of the key (it refuses PEM and SSH keys as HMAC secrets), once per secret."""
    return _HS256.prepare_key(secret)


def sign_hs256(claims: dict[str, Any], secret: str) -> str:
    """``jwt.encode(claims, secret, algorithm="HS256")``, byte for byte, with the key prepared once."""
    signing_input = _HS256_HEADER + b"." + base64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    return (signing_input + b"." + base64url_encode(_HS256.sign(signing_input, _hs256_key(secret)))).decode()
