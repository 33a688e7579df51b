"""EC2 instance metadata (IMDSv2): identity, placement, spot interruption notice, ASG target lifecycle state.

Every call has a short timeout so a worker off EC2 learns it within a fraction of a second and moves on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import aiohttp

log = logging.getLogger(__name__)

TOKEN_TTL_S = 21600


@dataclass(frozen=True, slots=True)
class InstanceIdentity:
    instance_id: str
    instance_type: str | None
    region: str | None
    zone: str | None
    local_ipv4: str | None
    public_ipv4: str | None


class Imds:
    """A small IMDSv2 client; the session token is fetched once and refreshed before it expires."""

    def __init__(self, base_url: str = "http://169.254.169.254", timeout_s: float = 0.3) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._token: str | None = None
        self._token_expires = 0.0
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get_token(self) -> str | None:
        if self._token and time.monotonic() < self._token_expires:
            return self._token
        try:
            async with self._http().put(f"{self.base_url}/latest/api/token",
                                        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)}) as resp:
                if resp.status != 200:
                    return None
                self._token = await resp.text()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("IMDS token unavailable: %s", type(exc).__name__)
            return None
        self._token_expires = time.monotonic() + TOKEN_TTL_S - 60
        return self._token

    async def get(self, path: str) -> str | None:
        """The text at ``/latest/meta-data/<path>``; None if absent (404), unreachable or timed out."""
        token = await self._get_token()
        if token is None:
            return None
        try:
            async with self._http().get(f"{self.base_url}/latest/meta-data/{path}",
                                        headers={"X-aws-ec2-metadata-token": token}) as resp:
                if resp.status == 401:
                    self._token = None  # token expired or revoked: the next call fetches a new one
                    return None
                if resp.status != 200:
                    return None
                return (await resp.text()).strip()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: undecodable text
            log.debug("IMDS %s unavailable: %s", path, type(exc).__name__)
            return None

    async def identity(self) -> InstanceIdentity | None:
        """Who and where this instance is, or None when not on EC2."""
        instance_id = await self.get("instance-id")
        if instance_id is None:
            return None
        keys = ["instance-type", "placement/region", "placement/availability-zone", "local-ipv4", "public-ipv4"]
        values = await asyncio.gather(*(self.get(k) for k in keys))
        return InstanceIdentity(instance_id, *values)

    async def spot_action(self) -> dict[str, str] | None:
        """The spot interruption notice (``{"action": "terminate", "time": …}``) once AWS has issued one."""
        text = await self.get("spot/instance-action")
        if not text:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else None

    async def target_lifecycle_state(self) -> str | None:
        """``InService``, ``Terminated``, ``Warmed:*``…; None when not in an ASG or unavailable."""
        return await self.get("autoscaling/target-lifecycle-state")

    async def autoscaling_group(self) -> str | None:
        """The ASG name from instance tags (only when tags in metadata are enabled)."""
        return await self.get("tags/instance/aws:autoscaling:groupName")
