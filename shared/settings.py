"""Settings both processes share. Each field reads ``FLEET_<NAME>`` from the environment."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from shared.auth import DEFAULT_WORKER_TOKEN
from shared.errors import reason

#: The shortest token or signing secret production accepts (the deployment generates 48).
MIN_PROD_SECRET_CHARS = 32


class Env(StrEnum):
    DEV = "dev"
    PROD = "prod"


class FleetSettings(BaseSettings):
    """Base of HubSettings and WorkerSettings."""

    # hide_input_in_errors: a refused configuration's error would otherwise print every value it was given, tokens
    # and passwords included, wherever it is logged. allow_inf_nan: an infinite weight made every score NaN, an
    # infinite timeout waits for ever.
    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore", env_nested_delimiter="__",
                                      hide_input_in_errors=True, allow_inf_nan=False)

    env: Env = Field(default=Env.DEV, description="`prod` refuses default secrets and embedded services.")
    worker_token: SecretStr = Field(
        default=SecretStr(DEFAULT_WORKER_TOKEN),
        description="Shared fleet token workers present to hubs, and hubs to workers when dispatching.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="Python logging level (any case).")

    @field_validator("worker_token", "admin_token", check_fields=False)
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        """An empty token (``FLEET_ADMIN_TOKEN=`` in a shell) matched no bearer token at all: every request was
        refused, in dev too, with nothing at start saying why."""
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty: no bearer token would match it")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def is_prod(self) -> bool:
        return self.env is Env.PROD

    def unsafe_in_production(self) -> list[str]:
        """What makes this configuration unfit for prod (subclasses add theirs to these)."""
        if len(self.worker_token.get_secret_value()) < MIN_PROD_SECRET_CHARS:
            return [f"FLEET_WORKER_TOKEN must have at least {MIN_PROD_SECRET_CHARS} characters"]
        return []

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Self:
        if self.is_prod and (problems := self.unsafe_in_production()):
            raise ValueError("refusing to start in prod: " + "; ".join(problems))
        return self


#: What pydantic-settings says when a variable of a structured type (a list, a map) is not JSON.
_NOT_JSON = re.compile(r'error parsing value for field "(\w+)"')


def describe_invalid(exc: ValidationError | SettingsError) -> str:
    """A settings error as one line per problem, naming the variable and never echoing the value (it may be a
    secret)."""
    if isinstance(exc, SettingsError):
        found = _NOT_JSON.search(str(exc))
        name = f"FLEET_{found.group(1).upper()}" if found else "a FLEET_ variable"
        return f"invalid configuration: {name}: not valid JSON (this setting takes a JSON list or object)"
    variables = _variables(exc.title)
    lines = []
    for error in exc.errors():
        first, *rest = [str(part) for part in error["loc"]] or [""]
        where = "_".join([variables.get(first, f"FLEET_{first}"), *rest]).upper()
        lines.append(f"{where}: {reason(error)}" if first else reason(error))
    return "invalid configuration: " + "; ".join(lines)


def _variables(title: str) -> dict[str, str]:
    """The variable each field of the settings class named ``title`` reads (a ValidationError's title is its model's
    name): ``FLEET_VOICE_TTS_RATE_WPM`` for VoiceSettings' ``tts_rate_wpm``, ``FLEET_ENV`` for its aliased ``env``."""
    pending: list[type[BaseSettings]] = [BaseSettings]
    while pending:
        cls = pending.pop()
        if cls.__name__ == title:
            names = _variables_of(cls)
            return names | {alias: alias for alias in names.values()}
        pending += cls.__subclasses__()
    return {}


def _variables_of(cls: type[BaseSettings]) -> dict[str, str]:
    """Field name → the variable it reads."""
    prefix = cls.model_config.get("env_prefix", "")
    return {name: field.validation_alias if isinstance(field.validation_alias, str) else prefix + name
            for name, field in cls.model_fields.items()}


def variables_read(*classes: type[BaseSettings]) -> set[str]:
    """Every variable the settings ``classes`` read, in upper case (pydantic-settings matches them in any case)."""
    return {name.upper() for cls in classes for name in _variables_of(cls).values()}


def unknown_variables(environ: Mapping[str, str], known: Iterable[str]) -> list[tuple[str, str | None]]:
    """The ``FLEET_`` variables set in ``environ`` that are none of ``known`` (nor a nested ``KNOWN__FIELD``), each
    with the known name it is closest to, if one is close: a misspelt variable otherwise leaves its default in
    force without a word."""
    names = sorted({name.upper() for name in known})
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("FLEET_") or upper in names or upper.split("__", 1)[0] in names:
            continue
        close = difflib.get_close_matches(upper, names, n=1, cutoff=0.8)
        found.append((name, close[0] if close else None))
    return found
