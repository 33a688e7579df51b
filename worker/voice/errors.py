"""Voice engine exceptions."""

from __future__ import annotations

import importlib
from types import ModuleType


class VoiceError(Exception):
    """Base of the voice engine's errors."""


class ModelMissing(VoiceError):
    """A configured model folder or file does not exist; raised at start()."""

    def __init__(self, path: object, setting: str) -> None:
        super().__init__(f"model path {path} does not exist (set by {setting})")
        self.path = path
        self.setting = setting


class BackendError(VoiceError):
    """An STT/LLM/TTS backend failed for one turn; the session goes on."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage


class BackendUnavailable(VoiceError):
    """A configured backend cannot start on this host: its package is not installed, or ``setting`` names something
    it does not have. Raised at start() like ModelMissing; the message says what to install or change."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


def import_backend(module: str, *, needed_by: str, package: str, setting: str, instead: str) -> ModuleType:
    """``module``, imported when its backend starts; a missing package is a BackendUnavailable naming what to
    install, or the setting (``instead``) that picks a backend this host has."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"{needed_by} needs the {package} package ({exc}): pip install {package}, or set "
                                 f"{instead}", setting) from exc
