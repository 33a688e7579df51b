"""The hub's LiveKit tokens are the tokens livekit-api's AccessToken mints: same claims, verified by its own
TokenVerifier."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import jwt
import pytest
from livekit import api

from hub.livekit import choose_deployment, mint_agent_token, mint_participant_token, sign_hs256
from hub.settings import LiveKitDeployment

SECRET = "a-livekit-secret-of-at-least-32-bytes!"
DEPLOYMENT = LiveKitDeployment(region="eu-central-1", url="wss://lk.example", lat=50.1, lon=8.7, api_key="APIkey",
                               api_secret=SECRET)


def payload(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def reference(identity: str, grants: api.VideoGrants, kind: str = "") -> dict[str, Any]:
    token = api.AccessToken("APIkey", SECRET).with_identity(identity).with_ttl(timedelta(seconds=600))
    if kind:
        token = token.with_kind(kind)  # type: ignore[arg-type]
    return payload(token.with_grants(grants).to_jwt())


def test_participant_token_has_access_tokens_claims() -> None:
    minted = mint_participant_token(DEPLOYMENT, "fleet-room-1", "alice", 600)
    mine = payload(minted.jwt)
    theirs = reference("alice", api.VideoGrants(room_join=True, room="fleet-room-1", can_publish=True,
                                                can_subscribe=True))
    for claims in (mine, theirs):
        assert claims.pop("exp") - claims.pop("nbf") == 600
    assert mine == theirs
    verified = api.TokenVerifier("APIkey", SECRET).verify(minted.jwt)
    assert verified.identity == "alice" and verified.video is not None and verified.video.room == "fleet-room-1"
    assert payload(minted.jwt)["exp"] == int(minted.expires_at.timestamp())


def test_agent_token_has_access_tokens_claims() -> None:
    token = mint_agent_token(DEPLOYMENT, "fleet-room-2", 600)
    mine = payload(token)
    theirs = reference("agent-fleet-room-2", api.VideoGrants(room_join=True, room="fleet-room-2", agent=True,
                                                         can_publish=True, can_subscribe=True), kind="agent")
    for claims in (mine, theirs):
        assert claims.pop("exp") - claims.pop("nbf") == 600
    assert mine == theirs
    verified = api.TokenVerifier("APIkey", SECRET).verify(token)
    assert verified.kind == "agent" and verified.video is not None and verified.video.agent


def test_tokens_of_different_rooms_do_not_share_grants() -> None:
    a = payload(mint_participant_token(DEPLOYMENT, "room-a", "u", 60).jwt)
    b = payload(mint_participant_token(DEPLOYMENT, "room-b", "u", 60).jwt)
    assert (a["video"]["room"], b["video"]["room"]) == ("room-a", "room-b")


def test_a_token_without_room_or_identity_is_refused() -> None:
    with pytest.raises(ValueError):
        mint_participant_token(DEPLOYMENT, "", "alice", 60)
    with pytest.raises(ValueError):
        mint_participant_token(DEPLOYMENT, "room", "", 60)


def test_a_wrong_secret_does_not_verify() -> None:
    token = mint_participant_token(DEPLOYMENT, "room", "alice", 60).jwt
    with pytest.raises(jwt.InvalidSignatureError):
        api.TokenVerifier("APIkey", "another-secret-of-at-least-32-bytes-long").verify(token)


@pytest.mark.parametrize("claims", [
    {"sub": "alice", "video": {"room": "r", "roomJoin": True}, "exp": 1, "nbf": 0, "iss": "APIkey"},
    {"name": "ünïcødé ✓", "n": [1, 2.5, None, False], "nested": {"a": {"b": "c"}}},
])
def test_signing_writes_the_bytes_jwt_encode_writes(claims: dict[str, Any]) -> None:
    assert sign_hs256(claims, SECRET) == jwt.encode(claims, SECRET, algorithm="HS256")
    assert sign_hs256(claims, SECRET) != jwt.encode(claims, SECRET + "x", algorithm="HS256")


def test_a_pem_key_is_refused_as_an_hmac_secret_as_pyjwt_does() -> None:
    pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----"
    with pytest.raises(jwt.InvalidKeyError):
        sign_hs256({"sub": "x"}, pem)


def test_the_deployment_chosen_is_on_the_shortest_user_to_worker_path_not_the_nearest_to_either() -> None:
    """Media goes user → SFU → worker: the SFU nearest the user (or the worker) alone can make the whole path
    longer. Here the one between them wins over one beside the user and one beside the worker."""
    def sfu(region: str, lat: float, lon: float) -> LiveKitDeployment:
        return LiveKitDeployment(region=region, url=f"wss://{region}.example", lat=lat, lon=lon, api_key="k",
                                 api_secret=SECRET)

    beside_user, between, beside_worker = sfu("user-side", 5, 0), sfu("between", 0, 10), sfu("worker-side", 5, 20)
    user, worker = (0.0, 0.0), (0.0, 20.0)
    for order in ([beside_user, between, beside_worker], [beside_worker, between, beside_user]):
        assert choose_deployment(order, user, worker).region == "between"
    assert choose_deployment([beside_user, beside_worker], user, user).region == "user-side"


def test_of_sfus_on_equally_short_media_paths_the_one_nearest_the_user_wins() -> None:
    """A Tokyo user on an Oregon worker: the Tokyo and the Oregon SFU both lie on the path between them, whose length
    differs only in floating-point noise, so the first listed won. The user's leg is the one over the public
    internet: Tokyo's wins, in either order, and an SFU off the path does not."""
    def sfu(region: str, lat: float, lon: float) -> LiveKitDeployment:
        return LiveKitDeployment(region=region, url=f"wss://{region}.example", lat=lat, lon=lon, api_key="k",
                                 api_secret=SECRET)

    tokyo, oregon, frankfurt = sfu("tokyo", 35.68, 139.69), sfu("oregon", 45.84, -119.7), sfu("frankfurt", 50.1, 8.7)
    user, worker = (35.68, 139.69), (45.84, -119.7)
    for order in ([oregon, tokyo, frankfurt], [tokyo, oregon, frankfurt], [frankfurt, oregon, tokyo]):
        assert choose_deployment(order, user, worker).region == "tokyo"
        assert choose_deployment(order, worker, user).region == "oregon"  # the user in Oregon this time
    assert choose_deployment([frankfurt], user, worker).region == "frankfurt"  # the only one


def test_a_token_is_valid_from_the_moment_it_is_minted_for_exactly_its_ttl() -> None:
    """``FLEET_LIVEKIT_TOKEN_TTL_S`` counts from now: a token neither starts in the future (LiveKit would refuse it)
    nor ends early; ``expires_at`` in the session's answer is the token's own ``exp``."""
    before = int(time.time())
    minted = mint_participant_token(DEPLOYMENT, "room", "alice", 600)
    after = time.time()
    claims = payload(minted.jwt)
    assert before <= claims["nbf"] <= after and before + 600 <= claims["exp"] <= after + 600
    assert claims["exp"] == int(minted.expires_at.timestamp())
    agent = payload(mint_agent_token(DEPLOYMENT, "room", 600))
    assert before <= agent["nbf"] <= after and before + 600 <= agent["exp"] <= after + 600


def test_an_sfu_a_little_off_the_path_but_beside_the_user_wins_within_50_km_or_1_percent() -> None:
    """Paths count as equally short within 50 km, or 1% of the shortest when that is more: a Paris user on a
    Frankfurt worker gets the SFU 17 km from Paris (35 km longer), not Frankfurt's; a Tokyo user on an Oregon worker
    (7,971 km) the one 37 km from Tokyo (67 km longer). An SFU beside the user but further off than that does not
    win."""
    def sfu(region: str, lat: float, lon: float) -> LiveKitDeployment:
        return LiveKitDeployment(region=region, url=f"wss://{region}.example", lat=lat, lon=lon, api_key="k",
                                 api_secret=SECRET)

    paris, frankfurt = (48.86, 2.35), (50.11, 8.68)
    beside_paris, too_far_off = sfu("versailles", 48.80, 2.13), sfu("west-of-paris", 48.9, 1.9)
    at_frankfurt = sfu("frankfurt", *frankfurt)
    assert choose_deployment([at_frankfurt, beside_paris], paris, frankfurt).region == "versailles"
    assert choose_deployment([at_frankfurt, too_far_off], paris, frankfurt).region == "frankfurt"

    tokyo, oregon = (35.68, 139.69), (45.84, -119.7)
    at_oregon = sfu("oregon", *oregon)
    assert choose_deployment([at_oregon, sfu("yokohama", 35.35, 139.62)], tokyo, oregon).region == "yokohama"
    assert choose_deployment([at_oregon, sfu("izu", 35.2, 139.6)], tokyo, oregon).region == "oregon"
