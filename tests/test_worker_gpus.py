"""GPU discovery with NVML faked at the module boundary, the GPUtil fallback, CPU mode, and the capacity table."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import GPUtil
import pynvml
import pytest

from worker import gpus
from worker.capacity import compute_capacity, streams_per_gpu
from worker.engines.synthetic import DEFAULT_PROFILE
from worker.settings import WorkerSettings

MB = 1024 * 1024


def fake_nvml(monkeypatch: pytest.MonkeyPatch, devices: list[tuple[str, int, int, int]]) -> list[str]:
    """Replace the pynvml calls the probe makes with a fake machine: (name, total MB, used MB, util %)."""
    calls: list[str] = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: len(devices))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: devices[h][0])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo",
                        lambda h: SimpleNamespace(total=devices[h][1] * MB, used=devices[h][2] * MB))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda h: SimpleNamespace(gpu=devices[h][3]))
    return calls


def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)


def no_gputil(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> list[Any]:
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(GPUtil, "getGPUs", fail)


def test_nvml_with_no_gpu_falls_through_to_cpu_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml(monkeypatch, [])
    no_gputil(monkeypatch)
    assert gpus.detect_gpus() == []


def test_nvml_one_t4(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_nvml(monkeypatch, [("Tesla T4", 15360, 300, 12)])
    [t4] = gpus.detect_gpus()
    assert (t4.name, t4.vram_total_mb, t4.vram_used_mb, t4.utilization, t4.simulated) == ("Tesla T4", 15360, 300,
                                                                                            12.0, False)
    assert calls == ["init", "shutdown"], "NVML must always be shut down"


def test_nvml_four_gpus_bytes_names_and_missing_utilisation(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = [(b"NVIDIA A10G", 23028, 0, 0), ("NVIDIA A10G", 23028, 1000, 50), ("NVIDIA H100 80GB HBM3", 81559, 0, 5),
               ("NVIDIA A10G", 23028, 0, 0)]
    fake_nvml(monkeypatch, devices)  # type: ignore[arg-type]

    def no_util(handle: int) -> Any:
        if handle == 3:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=devices[handle][3])

    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", no_util)
    found = gpus.detect_gpus()
    assert [g.name for g in found] == ["NVIDIA A10G", "NVIDIA A10G", "NVIDIA H100 80GB HBM3", "NVIDIA A10G"]
    assert [g.utilization for g in found] == [0.0, 50.0, 5.0, 0.0]
    assert sum(g.vram_total_mb for g in found) == 3 * 23028 + 81559


def test_gputil_is_the_fallback_when_nvml_cannot_load(monkeypatch: pytest.MonkeyPatch) -> None:
    no_nvml(monkeypatch)
    monkeypatch.setattr(GPUtil, "getGPUs", lambda: [SimpleNamespace(name="NVIDIA L4", memoryTotal=23034.0,
                                                                    memoryUsed=512.0, load=0.25)])
    [l4] = gpus.detect_gpus()
    assert (l4.name, l4.vram_total_mb, l4.vram_used_mb, l4.utilization) == ("NVIDIA L4", 23034, 512, 25.0)


def test_gputil_readings_nvidia_smi_lacks_read_as_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-smi prints ``[N/A]`` for some figures on some boards; GPUtil turns that into NaN."""
    no_nvml(monkeypatch)
    nan = float("nan")
    monkeypatch.setattr(GPUtil, "getGPUs", lambda: [SimpleNamespace(name="NVIDIA T4", memoryTotal=15360.0,
                                                                    memoryUsed=nan, load=nan)])
    [t4] = gpus.detect_gpus()
    assert (t4.vram_total_mb, t4.vram_used_mb, t4.utilization) == (15360, 0, 0.0)


def test_no_gpu_at_all_is_cpu_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    no_nvml(monkeypatch)
    no_gputil(monkeypatch)
    assert gpus.detect_gpus() == []
    cap = compute_capacity([], DEFAULT_PROFILE, cpu_cores=8, ram_mb=32768)
    assert (cap.max_streams, cap.reason, cap.gpu_streams) == (16, "cpu", None)


def test_simulated_gpus_present_real_vram_and_say_so() -> None:
    four = gpus.detect_gpus("a10gx4")
    assert len(four) == 4 and all(g.simulated and g.vram_total_mb == 24576 for g in four)
    assert four[0].info().model_dump() == {"name": "NVIDIA A10G", "vram_total_mb": 24576, "simulated": True}
    assert gpus.detect_gpus("H100")[0].vram_total_mb == 81920
    for bad in ("rtx4090", "t4x0", "a10gx"):
        with pytest.raises(ValueError):
            gpus.parse_simulated(bad)


def test_capacity_table_of_the_synthetic_profile() -> None:
    """model 4 GB + 1.5 GB/stream + 1 GB headroom: T4 7 (design: 5-8), A10G 12 (design: 12)."""
    table = {kind: streams_per_gpu(gpus.KNOWN_GPUS[kind][1], DEFAULT_PROFILE) for kind in gpus.KNOWN_GPUS}
    assert table == {"t4": 7, "a10g": 12, "l4": 12, "a100-40gb": 23, "a100-80gb": 50, "h100": 50}
    # Real NVML figures are a little lower (A10G reports 23028 MiB): one stream less, which the formula should show.
    assert streams_per_gpu(23028, DEFAULT_PROFILE) == 11
    big_host = dict(cpu_cores=192, ram_mb=2_000_000)
    assert compute_capacity(gpus.parse_simulated("a10gx4"), DEFAULT_PROFILE, **big_host).max_streams == 48
    small_host = compute_capacity(gpus.parse_simulated("h100x8"), DEFAULT_PROFILE, cpu_cores=64, ram_mb=2_000_000)
    assert (small_host.max_streams, small_host.reason) == (128, "cpu")
    tight_ram = compute_capacity(gpus.parse_simulated("a10g"), DEFAULT_PROFILE, cpu_cores=64, ram_mb=8192)
    assert (tight_ram.max_streams, tight_ram.reason) == (8, "ram")
    assert compute_capacity(gpus.parse_simulated("t4"), DEFAULT_PROFILE, override=3).max_streams == 3
    no_vram = compute_capacity(gpus.parse_simulated("t4"), replace(DEFAULT_PROFILE, per_stream_mb=0), cpu_cores=4,
                               ram_mb=65536)
    assert (no_vram.max_streams, no_vram.reason, no_vram.gpu_streams) == (8, "cpu", None)


def test_settings_parse_hub_urls_and_refuse_default_token_in_prod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_HUB_URLS", "http://a:8000/, http://b:8000")
    assert WorkerSettings().hub_urls == ["http://a:8000", "http://b:8000"]
    monkeypatch.setenv("FLEET_HUB_URLS", '["http://c:1"]')
    monkeypatch.setenv("FLEET_LIFECYCLE_HOOK_NAME", "drain-hook")
    monkeypatch.setenv("FLEET_PROTECT_FROM_SCALE_IN", "true")
    s = WorkerSettings()
    assert (s.hub_urls, s.lifecycle_hook_name, s.protect_from_scale_in) == (["http://c:1"], "drain-hook", True)
    with pytest.raises(ValueError, match="FLEET_WORKER_TOKEN"):
        WorkerSettings(env="prod")
    assert WorkerSettings(env="prod", worker_token="s3cret").is_prod
