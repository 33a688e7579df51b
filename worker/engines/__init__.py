"""Engines the worker can run, loaded by name."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from worker.engine import Engine
    from worker.settings import WorkerSettings

#: Engines that live in other packages, imported only when chosen so their heavy deps stay optional.
_LAZY_ENGINES = {"voice": "worker.voice.engine:VoiceEngine"}


class EngineUnavailable(RuntimeError):
    """The chosen engine cannot be loaded."""


def load_engine(name: str, settings: WorkerSettings, *, for_calibration: bool = False) -> Engine:
    """``for_calibration``: an instance ``fleet worker calibrate`` may load freely (e.g. no LiveKit room to join)."""
    if name == "synthetic":
        from worker.engines.synthetic import SyntheticEngine

        return SyntheticEngine.from_settings(settings, for_calibration=for_calibration)
    target = _LAZY_ENGINES.get(name)
    if target is None:
        raise EngineUnavailable(f"unknown engine {name!r}; choose one of {['synthetic', *_LAZY_ENGINES]}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineUnavailable(f"engine {name!r} needs {module_name}, which failed to import: {exc}") from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise EngineUnavailable(f"{module_name} has no {attr}")
    factory = getattr(cls, "from_settings", None)
    if not callable(factory):
        return cast("Engine", cls())
    return cast("Engine", factory(settings, for_calibration=True) if for_calibration else factory(settings))
