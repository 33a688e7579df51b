"""How many concurrent streams this machine can serve.

For each GPU::

    streams_gpu = floor((vram_total_mb - model_mb - headroom_mb) / per_stream_mb)   (never below 0)

``max_streams = min(Σ streams_gpu, floor(cpu_cores / cpu_cores_per_stream), floor(ram_mb / ram_mb_per_stream))``.
The model is loaded once per GPU, each stream then needs its own activations/KV cache, and the headroom absorbs
CUDA context and fragmentation. CPU and RAM caps keep a large GPU on a small host from overcommitting the host.
Without a GPU (CPU mode), or for an engine with ``per_stream_mb == 0`` (models served elsewhere, e.g. the voice
engine calling hosted APIs), only the CPU/RAM caps apply. An explicit override always wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psutil

from shared.models import MAX_STREAMS_PER_WORKER
from worker.engine import VramProfile
from worker.gpus import Gpu


@dataclass(frozen=True, slots=True)
class Capacity:
    max_streams: int
    gpu_streams: int | None
    cpu_cap: int
    ram_cap: int
    reason: str


def streams_per_gpu(vram_total_mb: int, profile: VramProfile) -> int | None:
    """Streams one GPU holds; None when the engine keeps no per-stream state in VRAM (VRAM does not limit)."""
    if profile.per_stream_mb <= 0:
        return None
    return max(0, (vram_total_mb - profile.model_mb - profile.headroom_mb) // profile.per_stream_mb)


def compute_capacity(
    gpus: list[Gpu],
    profile: VramProfile,
    *,
    cpu_cores: int | None = None,
    ram_mb: int | None = None,
    override: int | None = None,
) -> Capacity:
    cores = cpu_cores if cpu_cores is not None else (psutil.cpu_count() or 1)
    ram = ram_mb if ram_mb is not None else psutil.virtual_memory().total // (1024 * 1024)
    # Rounded before the floor: a decimal share is inexact in binary, and 33 / 1.1 is 29.999999999999996.
    cpu_cap = math.floor(round(cores / profile.cpu_cores_per_stream, 6)) if profile.cpu_cores_per_stream > 0 else 10_000
    ram_cap = int(ram // profile.ram_mb_per_stream) if profile.ram_mb_per_stream > 0 else 10_000
    per_gpu = [streams_per_gpu(g.vram_total_mb, profile) for g in gpus]
    gpu_streams = sum(n for n in per_gpu if n is not None) if gpus and profile.per_stream_mb > 0 else None
    if override is not None:
        return Capacity(override, gpu_streams, cpu_cap, ram_cap, "override")
    candidates = {"cpu": cpu_cap, "ram": ram_cap}
    if gpu_streams is not None:
        candidates["vram"] = gpu_streams
    reason = min(candidates, key=lambda k: candidates[k])
    return Capacity(min(MAX_STREAMS_PER_WORKER, candidates[reason]), gpu_streams, cpu_cap, ram_cap, reason)
