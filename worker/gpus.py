"""GPU discovery: NVML (nvidia-ml-py) first, GPUtil as a fallback, else none (CPU mode); or simulated GPUs."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass, replace

from shared.models import GpuInfo

log = logging.getLogger(__name__)

#: GPUs AWS offers and their nominal VRAM in MiB (NVML reports a few hundred MiB less on real hardware).
KNOWN_GPUS: dict[str, tuple[str, int]] = {
    "t4": ("NVIDIA Tesla T4", 16 * 1024),
    "a10g": ("NVIDIA A10G", 24 * 1024),
    "l4": ("NVIDIA L4", 24 * 1024),
    "a100-40gb": ("NVIDIA A100-SXM4-40GB", 40 * 1024),
    "a100-80gb": ("NVIDIA A100-SXM4-80GB", 80 * 1024),
    "h100": ("NVIDIA H100 80GB HBM3", 80 * 1024),
}
_SIMULATE_RE = re.compile(r"^(?P<kind>[a-z0-9-]+?)(?:x(?P<count>\d+))?$")


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU and its live figures (used/utilisation are 0 for simulated or unreadable GPUs)."""

    index: int
    name: str
    vram_total_mb: int
    vram_used_mb: int = 0
    utilization: float = 0.0
    simulated: bool = False

    def info(self) -> GpuInfo:
        return GpuInfo(name=self.name, vram_total_mb=self.vram_total_mb, simulated=self.simulated)


def parse_simulated(spec: str) -> list[Gpu]:
    """``a10gx4`` → four simulated A10Gs with real VRAM figures."""
    match = _SIMULATE_RE.match(spec.strip().lower())
    if not match or match["kind"] not in KNOWN_GPUS:
        raise ValueError(f"unknown GPU {spec!r}; expected one of {sorted(KNOWN_GPUS)} with optional xCOUNT")
    count = int(match["count"] or 1)
    if not 1 <= count <= 64:
        raise ValueError(f"GPU count must be 1..64, got {count}")
    name, vram = KNOWN_GPUS[match["kind"]]
    return [Gpu(index=i, name=name, vram_total_mb=vram, simulated=True) for i in range(count)]


def _mb(value: int) -> int:
    return int(value // (1024 * 1024))


def _probe_nvml() -> list[Gpu] | None:
    """GPUs by NVML, or None when NVML is unavailable (no driver, no library)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - any NVML failure means "try the next probe"
        log.debug("NVML unavailable: %s", exc)
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                util = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                util = 0.0  # some virtualised GPUs do not expose utilisation
            gpus.append(Gpu(index=index, name=name.decode() if isinstance(name, bytes) else str(name),
                            vram_total_mb=_mb(memory.total), vram_used_mb=_mb(memory.used), utilization=util))
        return gpus
    except Exception as exc:  # noqa: BLE001
        log.warning("NVML query failed: %s", exc)
        return None
    finally:
        with contextlib.suppress(Exception):  # shutting down a half-initialised NVML is best effort
            pynvml.nvmlShutdown()


def _probe_gputil() -> list[Gpu] | None:
    try:
        import GPUtil

        found = GPUtil.getGPUs()
    except Exception as exc:  # noqa: BLE001 - GPUtil shells out to nvidia-smi, which may be missing
        log.debug("GPUtil unavailable: %s", exc)
        return None
    return [Gpu(index=i, name=str(g.name), vram_total_mb=int(_reading(g.memoryTotal)),
                vram_used_mb=int(_reading(g.memoryUsed)), utilization=_reading(g.load) * 100.0)
            for i, g in enumerate(found)]


def _reading(value: object) -> float:
    """A GPUtil figure, or 0 where it has none: it gives NaN where nvidia-smi prints ``[N/A]``."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def detect_gpus(simulate: str | None = None) -> list[Gpu]:
    """The machine's GPUs (NVML → GPUtil → none), or the simulated set when ``simulate`` is given."""
    if simulate:
        return parse_simulated(simulate)
    for probe in (_probe_nvml, _probe_gputil):
        gpus = probe()
        if gpus:
            return gpus
    return []


def refresh(gpus: list[Gpu], vram_used_by_engine_mb: int = 0) -> list[Gpu]:
    """Live used VRAM and utilisation; simulated GPUs report the engine's own accounting spread evenly."""
    if not gpus:
        return gpus
    if gpus[0].simulated:
        share = vram_used_by_engine_mb // len(gpus)
        return [replace(g, vram_used_mb=min(g.vram_total_mb, share)) for g in gpus]
    fresh = detect_gpus()
    return fresh or gpus
