"""EC2 Auto Scaling integration: complete the termination lifecycle action, hold scale-in protection while busy."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

from shared.backoff import backoff_delays

if TYPE_CHECKING:
    from worker.imds import InstanceIdentity
    from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class Lifecycle:
    """Wraps a boto3 ``autoscaling`` client; tests pass one with a botocore Stubber attached."""

    def __init__(self, client: Any, instance_id: str, group: str | None, hook_name: str | None) -> None:
        self.client = client
        self.instance_id = instance_id
        self.group = group
        self.hook_name = hook_name
        self.protected: bool | None = None
        self._wanted = False
        self._changed = asyncio.Event()

    @classmethod
    def from_settings(cls, settings: WorkerSettings, identity: InstanceIdentity, group: str | None) -> Lifecycle:
        import boto3
        from botocore.config import Config

        # Bounded calls: a drain must not hang on the AWS API for botocore's default 60 s per attempt.
        config = Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 3, "mode": "standard"})
        client = boto3.client("autoscaling", region_name=identity.region or settings.region, config=config)
        return cls(client, identity.instance_id, settings.autoscaling_group or group, settings.lifecycle_hook_name)

    def complete(self, result: str = "CONTINUE") -> bool:
        """Tell the ASG this instance may terminate now, instead of waiting for the hook's timeout."""
        if not (self.hook_name and self.group):
            log.warning("no lifecycle hook or ASG name known; the ASG will wait for the hook timeout")
            return False
        try:
            self.client.complete_lifecycle_action(LifecycleHookName=self.hook_name, AutoScalingGroupName=self.group,
                                                  LifecycleActionResult=result, InstanceId=self.instance_id)
        except Exception as exc:  # noqa: BLE001 - botocore raises many types; the exit must go on
            log.warning("complete_lifecycle_action failed: %s", exc)
            return False
        log.info("lifecycle action %s completed (%s)", self.hook_name, result)
        return True

    def set_protection(self, protected: bool) -> bool:
        if not self.group:
            return False
        try:
            self.client.set_instance_protection(InstanceIds=[self.instance_id], AutoScalingGroupName=self.group,
                                                ProtectedFromScaleIn=protected)
        except Exception as exc:  # noqa: BLE001
            log.warning("set_instance_protection(%s) failed: %s", protected, exc)
            return False
        self.protected = protected
        return True

    def sessions_changed(self, count: int) -> None:
        """SessionManager hook: protection is wanted exactly while sessions run."""
        self._wanted = count > 0
        self._changed.set()

    async def protection_loop(self) -> None:
        """Apply the wanted protection off the event loop; changes coalesce, failures retry with jittered backoff.

        The first pass applies it with no change to wait for: a worker that crashed while protected left the
        instance protected, which an idle successor must lift."""
        if not self.group:
            log.warning("no ASG name known; scale-in protection is not managed")
            return
        fresh_retries = functools.partial(backoff_delays, base_s=1.0, cap_s=30.0)
        retries = fresh_retries()
        self._changed.set()
        while True:
            await self._changed.wait()
            self._changed.clear()
            wanted = self._wanted
            if wanted == self.protected:
                continue
            if await asyncio.to_thread(self.set_protection, wanted):
                retries = fresh_retries()  # the next failure starts again from a short wait
            else:
                await asyncio.sleep(next(retries))
                self._changed.set()
