"""Settings both processes share. Each field reads ``FLEET_<NAME>`` from the environment."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.auth import DEFAULT_WORKER_TOKEN


class Env(StrEnum):
    DEV = "dev"
    PROD = "prod"


class FleetSettings(BaseSettings):
    """Base of HubSettings and WorkerSettings."""

    # hide_input_in_errors: a refused configuration's error would otherwise print every value it was given, tokens
    # and passwords included, wherever it is logged.
    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore", env_nested_delimiter="__",
                                      hide_input_in_errors=True)

    env: Env = Field(default=Env.DEV, description="`prod` refuses default secrets and embedded services.")
    worker_token: SecretStr = Field(
        default=SecretStr(DEFAULT_WORKER_TOKEN),
        description="Shared fleet token workers present to hubs, and hubs to workers when dispatching.",
    )
    log_level: str = Field(default="INFO", description="Python logging level.")

    @property
    def is_prod(self) -> bool:
        return self.env is Env.PROD


def describe_invalid(exc: ValidationError) -> str:
    """A settings error as one line per problem, naming the variable and never echoing the value (it may be a
    secret)."""
    lines = []
    for error in exc.errors():
        where = "_".join(str(part) for part in error["loc"]).upper()
        lines.append(f"FLEET_{where}: {error['msg']}" if where else str(error["msg"]))
    return "invalid configuration: " + "; ".join(lines)
