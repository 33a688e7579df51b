"""docs/settings.md is generated from the settings models; it must say what the code does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_a_fleet_variable_nothing_reads_is_named_with_the_nearest_one_that_is_read() -> None:
    """A misspelt variable (FLEET_REGOIN) left its setting at the default without a word."""
    from shared.settings import unknown_variables
    from shared.variables import READ_BY_SOME_PART

    environ = {"FLEET_REGOIN": "eu-west-1", "FLEET_REGION": "eu-west-1", "fleet_max_streams": "4",
               "FLEET_VOICE_TTS_RATE_WPM": "180", "FLEET_FROBNICATE": "1", "FLEET_WEIGHTS__DISTANCE": "2",
               "PATH": "/bin"}
    assert unknown_variables(environ, READ_BY_SOME_PART) == [
        ("FLEET_FROBNICATE", None), ("FLEET_REGOIN", "FLEET_REGION"),
        ("FLEET_WEIGHTS__DISTANCE", "FLEET_WEIGHT_DISTANCE")]


def test_the_list_of_variables_read_is_every_settings_models_and_the_clis() -> None:
    """Each process checks its environment against one list, so as not to import the other parts' settings."""
    from hub.settings import HubSettings
    from shared.settings import variables_read
    from shared.variables import READ_BY_SOME_PART
    from worker.settings import WorkerSettings
    from worker.voice.settings import VoiceSettings

    read = variables_read(HubSettings, WorkerSettings, VoiceSettings) | {"FLEET_HUB_URL"}
    assert read == READ_BY_SOME_PART, (
        f"shared/variables.py: add {sorted(read - READ_BY_SOME_PART)}, remove {sorted(READ_BY_SOME_PART - read)}")


def test_a_nested_variable_of_a_setting_that_is_read_is_not_named_as_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    """``FLEET_LABELS__gpu=a10g`` sets one label (pydantic-settings' ``__`` nesting): warning that nothing reads it
    would send the SRE to remove a variable that works."""
    from shared.settings import unknown_variables
    from shared.variables import READ_BY_SOME_PART
    from worker.settings import WorkerSettings

    monkeypatch.setenv("FLEET_LABELS__gpu", "a10g")
    assert WorkerSettings().labels == {"gpu": "a10g"}
    assert unknown_variables({"FLEET_LABELS__gpu": "a10g"}, READ_BY_SOME_PART) == []
