"""GPU discovery: NVML (nvidia-ml-py) first, GPUtil as a fallback, else none (CPU mode); or simulated GPUs.

Only what a CUDA process here can use counts: the MIG instances of a GPU in MIG mode rather than the whole GPU,
and only the devices CUDA_VISIBLE_DEVICES names when it is set. GPUtil stands in only when NVML is not installed
(no library): an NVML that is there but cannot start (the driver is not loaded, no permission) or a query of it
that fails fails the probe (``GpuProbeFailed``), since nvidia-smi knows no MIG and would advertise a split GPU
whole, and a GPU host with a broken driver would otherwise register as a CPU worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

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
_T = TypeVar("_T")


class GpuProbeFailed(RuntimeError):
    """NVML is loaded but cannot say what CUDA may use here: no GPU count is better than a wrong one."""


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU, or one MIG instance of a GPU, and its live figures (used/utilisation 0 where unknown).

    ``index`` is NVML's index of the physical GPU (shared by its MIG instances); ``uuid`` is ``GPU-…`` or ``MIG-…``.
    """

    index: int
    name: str
    vram_total_mb: int
    vram_used_mb: int = 0
    utilization: float = 0.0
    simulated: bool = False
    uuid: str = ""

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


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class _Device:
    """What a CUDA process can be given: a whole GPU, or one MIG instance (which answers to its parent's ids too)."""

    handle: Any
    index: int
    name: str
    uuids: tuple[str, ...]
    mig: bool = False


def _answers_to(entry: str, index: int, uuids: tuple[str, ...]) -> bool:
    """Whether one CUDA_VISIBLE_DEVICES entry names this device: its index, or a UUID CUDA lets you abbreviate."""
    if entry.isdigit():
        return int(entry) == index
    return entry.startswith(("GPU-", "MIG-")) and any(uuid.startswith(entry) for uuid in uuids if uuid)


def _visible(devices: list[_T], ids: Callable[[_T], tuple[int, tuple[str, ...]]]) -> list[_T]:
    """The devices CUDA_VISIBLE_DEVICES leaves a CUDA process (all when unset), in its order.

    Indices are NVML's, i.e. PCI bus order: CUDA's own order agrees on machines of one GPU model (every AWS GPU
    instance) or with CUDA_DEVICE_ORDER=PCI_BUS_ID. Like CUDA, the first entry naming nothing ends the list.
    """
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return devices
    chosen: dict[int, _T] = {}
    for entry in (part.strip() for part in spec.split(",")):
        found = {i: d for i, d in enumerate(devices) if _answers_to(entry, *ids(d))}
        if not found:
            break
        chosen |= {i: d for i, d in found.items() if i not in chosen}
    return list(chosen.values())


def _mig_handles(pynvml: Any, parent: Any) -> list[Any] | None:
    """The MIG devices of a GPU in MIG mode; None when it is not, or cannot be (bindings or a driver before MIG).

    Raises GpuProbeFailed when the GPU is in MIG mode but its instances cannot be listed: CUDA cannot use the whole
    GPU then, so counting it whole would advertise streams that do not exist."""
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(parent)
    except (AttributeError, pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound):
        return None  # old nvidia-ml-py, a pre-R450 driver, a GPU without MIG
    if current != getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1):
        return None
    handles = []
    try:
        for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(parent)):
            try:
                handles.append(pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot))
            except pynvml.NVMLError_NotFound:
                continue  # no instance in this slot
    except (AttributeError, pynvml.NVMLError) as exc:
        raise GpuProbeFailed(f"a GPU is in MIG mode but its MIG instances cannot be listed: {exc}") from None
    return handles


def _one_mig_instance(devices: list[_Device]) -> list[_Device]:
    """A CUDA process enumerates a single MIG instance (the first visible one), however many CUDA_VISIBLE_DEVICES
    names: the others are for other processes. To use every instance, run one worker per instance, each with its
    own ``CUDA_VISIBLE_DEVICES=MIG-…`` and port."""
    migs = [d for d in devices if d.mig]
    if len(migs) > 1:
        log.info("%d MIG instances visible; a CUDA process uses only the first (%s)", len(migs), migs[0].uuids[0])
    return [d for d in devices if not d.mig or d is migs[0]]


def _optional(read: Callable[[Any], object], handle: Any) -> str:
    try:
        return _text(read(handle))
    except Exception:  # noqa: BLE001 - a name or UUID NVML will not give is not worth losing the GPU over
        return ""


def _nvml_devices(pynvml: Any, index: int) -> list[_Device]:
    """GPU ``index`` as CUDA sees it: the GPU itself, or its MIG instances when it is in MIG mode."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(pynvml.nvmlDeviceGetName(handle))
    uuid = _optional(pynvml.nvmlDeviceGetUUID, handle)
    migs = _mig_handles(pynvml, handle)
    if migs is None:
        return [_Device(handle, index, name, (uuid,))]
    if not migs:
        log.warning("GPU %d (%s) is in MIG mode without MIG instances: CUDA cannot use it", index, name)
    devices = []
    for mig in migs:
        # Drivers name a MIG device "<GPU> MIG <profile>" (e.g. "NVIDIA A100-SXM4-80GB MIG 1g.10gb")
        mig_name = _optional(pynvml.nvmlDeviceGetName, mig)
        devices.append(_Device(mig, index, mig_name if " MIG" in mig_name else f"{name} MIG",
                               (_optional(pynvml.nvmlDeviceGetUUID, mig), uuid), mig=True))
    return devices


def _read(pynvml: Any, device: _Device) -> Gpu:
    memory = pynvml.nvmlDeviceGetMemoryInfo(device.handle)
    try:
        util = float(pynvml.nvmlDeviceGetUtilizationRates(device.handle).gpu)
    except pynvml.NVMLError:
        util = 0.0  # some virtualised GPUs, and every MIG device, do not expose utilisation
    return Gpu(index=device.index, name=device.name, vram_total_mb=_mb(memory.total), vram_used_mb=_mb(memory.used),
               utilization=util, uuid=device.uuids[0])


def _probe_nvml() -> list[Gpu] | None:
    """The GPUs a CUDA process here may use, by NVML, or None when NVML is not installed (no bindings, no library,
    or one too old to have nvmlInit).

    Raises GpuProbeFailed when NVML is installed but cannot start (DriverNotLoaded, NoPermission, …) or a query fails
    (GpuIsLost, Unknown, …): a GPU host whose driver is broken must not pass for a CPU worker."""
    try:
        import pynvml
    except ImportError as exc:
        log.debug("NVML bindings unavailable: %s", exc)
        return None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_FunctionNotFound) as exc:
        log.debug("NVML unavailable: %s", exc)
        return None
    except Exception as exc:  # noqa: BLE001 - NVMLError subclasses, or an OSError loading a broken library
        raise GpuProbeFailed(f"NVML is installed but cannot start: {exc}") from None
    try:
        devices = [d for index in range(pynvml.nvmlDeviceGetCount()) for d in _nvml_devices(pynvml, index)]
        return [_read(pynvml, d) for d in _one_mig_instance(_visible(devices, lambda d: (d.index, d.uuids)))]
    except GpuProbeFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - pynvml raises NVMLError subclasses, old bindings AttributeError
        raise GpuProbeFailed(f"NVML is loaded but a query failed: {exc}") from None
    finally:
        with contextlib.suppress(Exception):  # shutting down a half-initialised NVML is best effort
            pynvml.nvmlShutdown()


def _probe_gputil() -> list[Gpu] | None:
    """GPUs by nvidia-smi, which sees whole GPUs only (no MIG): for when NVML cannot be loaded from Python."""
    try:
        import GPUtil

        # GPUtil runs nvidia-smi with no timeout, and a wedged driver can hang it: the caller bounds the probe
        # (it runs in a thread, under a deadline in hub_client).
        found = GPUtil.getGPUs()
    except Exception as exc:  # noqa: BLE001 - GPUtil shells out to nvidia-smi, which may be missing
        log.debug("GPUtil unavailable: %s", exc)
        return None
    every = [Gpu(index=i, name=str(g.name), vram_total_mb=int(_reading(g.memoryTotal)),
                 vram_used_mb=int(_reading(g.memoryUsed)), utilization=_reading(g.load) * 100.0,
                 uuid=str(getattr(g, "uuid", "")))
             for i, g in enumerate(found)]
    return _visible(every, lambda g: (g.index, (g.uuid,)))


def _reading(value: object) -> float:
    """A GPUtil figure, or 0 where it has none: it gives NaN where nvidia-smi prints ``[N/A]``."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def detect_gpus(simulate: str | None = None) -> list[Gpu]:
    """The machine's GPUs (NVML → GPUtil → none), or the simulated set when ``simulate`` is given.

    Raises GpuProbeFailed when NVML is loaded but cannot be read."""
    if simulate:
        return parse_simulated(simulate)
    found = _probe_nvml()
    if found is None:  # only without NVML: nvidia-smi (NVML underneath) cannot know better, and knows no MIG
        found = _probe_gputil()
    return found or []


def refresh(gpus: list[Gpu], vram_used_by_engine_mb: int = 0) -> list[Gpu]:
    """Live used VRAM and utilisation; simulated GPUs report the engine's own accounting spread evenly. A probe
    that fails leaves the last reading: the capacity was set at the start, a heartbeat only reports load."""
    if not gpus:
        return gpus
    if gpus[0].simulated:
        share = vram_used_by_engine_mb // len(gpus)
        return [replace(g, vram_used_mb=min(g.vram_total_mb, share)) for g in gpus]
    try:
        fresh = detect_gpus()
    except GpuProbeFailed as exc:
        log.warning("GPU probe failed (%s); the heartbeat carries the last reading", exc)
        return gpus
    return fresh or gpus
