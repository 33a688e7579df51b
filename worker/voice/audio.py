"""PCM16 helpers: resampling (numpy, no dither, so results are reproducible) and loudness."""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000
FRAME_MS = 20
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000 * 2


def resample(pcm: bytes, src_rate: int, dst_rate: int = SAMPLE_RATE) -> bytes:
    """Linear-interpolation resampling of mono PCM16."""
    if src_rate == dst_rate or not pcm:
        return pcm
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
    n_out = round(len(samples) * dst_rate / src_rate)
    x_out = np.arange(n_out) * (src_rate / dst_rate)
    out = np.interp(x_out, np.arange(len(samples)), samples)
    return bytes(np.clip(np.round(out), -32768, 32767).astype(np.int16).tobytes())


def float_to_pcm16(samples: np.ndarray) -> bytes:
    return bytes((np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16).tobytes())


def rms(pcm: bytes) -> float:
    if len(pcm) < 2:
        return 0.0
    samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2)))
