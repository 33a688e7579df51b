"""EC2 instance metadata (IMDSv2): identity, placement, spot interruption notice, ASG target lifecycle state.

Every call has a short timeout so a worker off EC2 learns it within a fraction of a second and moves on. A worker
told it runs on EC2 reads its identity with retries instead: one slow answer at boot must not make it register
under a made-up id and a loopback URL, blind to scale-in and spot notices.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

import aiohttp

from shared.backoff import backoff_delays

log = logging.getLogger(__name__)

TOKEN_TTL_S = 21600
#: Identity reads of a worker that must be on EC2: this many tries, each with this timeout, backing off between.
REQUIRED_ATTEMPTS = 8
REQUIRED_TIMEOUT_S = 2.0


class ImdsUnavailable(Exception):
    """The metadata service did not answer (timeout, refused, 401 or 5xx); a 404 is an answer: absent."""


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

    async def _get_token(self, within: aiohttp.ClientTimeout | None = None) -> str:
        if self._token and time.monotonic() < self._token_expires:
            return self._token
        try:
            async with self._http().put(f"{self.base_url}/latest/api/token", timeout=within or self.timeout,
                                        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)}) as resp:
                if resp.status != 200:
                    raise ImdsUnavailable(f"the token request answered {resp.status}")
                self._token = await resp.text()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ImdsUnavailable(f"no token: {type(exc).__name__}") from None
        self._token_expires = time.monotonic() + TOKEN_TTL_S - 60
        return self._token

    async def _read(self, path: str, within: aiohttp.ClientTimeout | None = None) -> str | None:
        """The text at ``/latest/meta-data/<path>``, None when absent (404); raises ImdsUnavailable otherwise."""
        token = await self._get_token(within)
        try:
            async with self._http().get(f"{self.base_url}/latest/meta-data/{path}", timeout=within or self.timeout,
                                        headers={"X-aws-ec2-metadata-token": token}) as resp:
                if resp.status == 404:
                    return None
                if resp.status == 401:
                    self._token = None  # token expired or revoked: the next call fetches a new one
                if resp.status != 200:
                    raise ImdsUnavailable(f"{path} answered {resp.status}")
                return (await resp.text()).strip()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: undecodable text
            raise ImdsUnavailable(f"{path}: {type(exc).__name__}") from None

    async def get(self, path: str) -> str | None:
        """The text at ``/latest/meta-data/<path>``; None if absent (404), unreachable or timed out."""
        try:
            return await self._read(path)
        except ImdsUnavailable as exc:
            log.debug("IMDS unavailable: %s", exc)
            return None

    async def _read_required(self, path: str) -> str | None:
        """``_read`` retried with backoff and jitter, each try with a longer timeout; raises the last failure."""
        timeout = aiohttp.ClientTimeout(total=max(REQUIRED_TIMEOUT_S, self.timeout.total or 0))
        delays = backoff_delays(base_s=0.2, cap_s=2.0)
        for _ in range(REQUIRED_ATTEMPTS - 1):
            try:
                return await self._read(path, timeout)
            except ImdsUnavailable as exc:
                log.warning("instance metadata: %s; retrying", exc)
                await asyncio.sleep(next(delays))
        return await self._read(path, timeout)  # the last try: its failure is the caller's

    async def identity(self, *, required: bool = False) -> InstanceIdentity | None:
        """Who and where this instance is, or None when not on EC2 (one quick try).

        ``required``: the worker was told it runs on EC2 (a lifecycle hook or scale-in protection is configured).
        Every read is retried, and one that still fails raises ImdsUnavailable, as does a missing instance id or
        private address: better to stop, and be restarted, than to register under a made-up id and a loopback URL.
        """
        keys = ["instance-type", "placement/region", "placement/availability-zone", "local-ipv4", "public-ipv4"]
        if not required:
            instance_id = await self.get("instance-id")
            if instance_id is None:
                return None
            return InstanceIdentity(instance_id, *await asyncio.gather(*(self.get(k) for k in keys)))
        instance_id = await self._read_required("instance-id")
        values = await asyncio.gather(*(self._read_required(k) for k in keys))
        if instance_id is None or values[3] is None:
            raise ImdsUnavailable("the instance metadata has no instance-id or local-ipv4")
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
