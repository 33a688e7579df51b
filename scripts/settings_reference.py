"""Write the settings reference (docs/settings.md) from the settings models themselves.

    .venv/bin/python scripts/settings_reference.py > docs/settings.md

``tests/test_settings_reference.py`` fails when the file and the models disagree, so a setting cannot be added,
renamed or re-described without the reference following.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from cli import admin
from hub.settings import HubSettings
from shared.auth import DEFAULT_ADMIN_TOKEN
from worker.settings import WorkerSettings
from worker.voice.settings import VoiceSettings

SECTIONS: list[tuple[str, type[BaseSettings], str]] = [
    ("Hub (`fleet hub`)", HubSettings, "`hub/settings.py`"),
    ("Worker agent (`fleet worker`)", WorkerSettings, "`worker/settings.py`"),
    ("Voice engine (`FLEET_ENGINE=voice`)", VoiceSettings, "`worker/voice/settings.py`; see also `docs/voice.md`"),
]


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, SecretStr):
        return "dev value" if value.get_secret_value() else "empty"
    if value is None or value == "" or value == [] or value == {}:
        return "unset"
    if hasattr(value, "value"):  # an enum
        value = value.value
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return f"`{text}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def reference() -> str:
    lines = [
        "# Settings reference",
        "",
        "Every setting is read from the environment variable shown. Generated from the settings models by",
        "`.venv/bin/python scripts/settings_reference.py > docs/settings.md`; `tests/test_settings_reference.py`",
        "keeps it in step. Lists and maps are JSON (`FLEET_HUB_URLS` also takes a comma-separated list).",
    ]
    for title, model, source in SECTIONS:
        prefix = model.model_config.get("env_prefix", "")
        lines += ["", f"## {title}", "", f"Defined in {source}.", "",
                  "| variable | default | meaning |", "|---|---|---|"]
        for name, field in model.model_fields.items():
            alias = field.validation_alias
            variable = alias if isinstance(alias, str) else f"{prefix}{name.upper()}"
            lines.append(f"| `{variable}` | {_cell(_default(field))} | {_cell(field.description or '')} |")
    lines += ["", "## SRE CLI (`fleet workers`, `fleet drain`, …)", "", "Defined in `cli/admin.py`.", "",
              "| variable | option | default | meaning |", "|---|---|---|---|"]
    for option in (admin.HubOpt, admin.TokenOpt):
        default = "dev value" if option.default == DEFAULT_ADMIN_TOKEN else f"`{option.default}`"
        lines.append(f"| `{option.envvar}` | `{option.param_decls[0]}` | {default} | {_cell(option.help or '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
