"""docs/settings.md is generated from the settings models; it must say what the code does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_settings_reference_is_what_the_models_say() -> None:
    generated = subprocess.run([sys.executable, str(ROOT / "scripts" / "settings_reference.py")],
                               capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert (ROOT / "docs" / "settings.md").read_text() == generated, (
        "docs/settings.md is stale: run .venv/bin/python scripts/settings_reference.py > docs/settings.md")
    for variable in ("FLEET_WORKER_TTL_S", "FLEET_ADVERTISE_URL", "FLEET_VOICE_BARGE_IN_MS", "FLEET_HUB_URLS"):
        assert f"| `{variable}` |" in generated


def test_a_description_stays_in_its_own_cell_and_a_setting_without_default_says_required() -> None:
    """A line break or a ``|`` in a description would split the row of the markdown table; a setting with no
    default is one the operator must set, and the reference says so."""
    from pydantic.fields import FieldInfo

    from scripts.settings_reference import _cell, _default

    assert _cell("one of a | b,\n    else c") == "one of a \\| b, else c"
    assert _default(FieldInfo(annotation=str)) == "required"
