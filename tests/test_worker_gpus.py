"""GPU discovery with NVML faked at the module boundary, the GPUtil fallback, CPU mode, and the capacity table."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
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


@pytest.fixture(autouse=True)
def _all_devices_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine running the tests may set CUDA_VISIBLE_DEVICES; the fakes assume it is unset unless told."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@dataclass
class Slice:
    """One MIG instance: its profile, memory and UUID."""

    profile: str
    total_mb: int
    uuid: str
    used_mb: int = 0


@dataclass
class Board:
    """A physical GPU as NVML shows it; ``mig`` holds its MIG slots (None: an empty slot), None when MIG is off."""

    name: str | bytes
    total_mb: int
    used_mb: int = 0
    util: int = 0
    uuid: str = ""
    mig: list[Slice | None] | None = None


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # pynvml turns the code into its subclass, e.g. NVMLError_NotFound


def fake_machine(monkeypatch: pytest.MonkeyPatch, boards: list[Board]) -> list[str]:
    """Replace the pynvml calls the probe makes with a fake machine.

    A GPU's handle is its index; a MIG device's handle is ``(index, slot)``. As on real drivers, a MIG device has
    its own memory, UUID and name ("<parent> MIG <profile>") and no utilisation, nor has a GPU in MIG mode.
    """
    calls: list[str] = []

    def part(handle: Any) -> Board | Slice:
        if isinstance(handle, tuple):
            found: Slice | None = (boards[handle[0]].mig or [])[handle[1]]
            assert found is not None, "a MIG handle NVML never gave out"
            return found
        return boards[int(handle)]

    def name(handle: Any) -> str | bytes:
        found = part(handle)
        return f"{boards[handle[0]].name!s} MIG {found.profile}" if isinstance(found, Slice) else found.name

    def utilization(handle: Any) -> Any:
        found = part(handle)
        if isinstance(found, Slice) or found.mig is not None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=found.util)

    def mig_mode(handle: int) -> list[int]:
        on = pynvml.NVML_DEVICE_MIG_ENABLE if boards[handle].mig is not None else pynvml.NVML_DEVICE_MIG_DISABLE
        return [on, on]

    def mig_handle(handle: int, slot: int) -> tuple[int, int]:
        mig = boards[handle].mig
        if mig is None or slot >= len(mig):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if mig[slot] is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
        return (handle, slot)

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: len(boards))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", name)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: part(h).uuid)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo",
                        lambda h: SimpleNamespace(total=part(h).total_mb * MB, used=part(h).used_mb * MB))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", utilization)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMigMode", mig_mode)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMaxMigDeviceCount", lambda h: len(boards[h].mig or []))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMigDeviceHandleByIndex", mig_handle)
    return calls


def fake_nvml(monkeypatch: pytest.MonkeyPatch, devices: list[tuple[str, int, int, int]]) -> list[str]:
    """A fake machine without MIG: (name, total MB, used MB, util %) per GPU."""
    return fake_machine(monkeypatch, [Board(name, total, used, util, f"GPU-{i}") for i, (name, total, used, util)
                                      in enumerate(devices)])


def a100_in_mig_mode(uuid: str = "GPU-a100", slices: int = 7) -> Board:
    """An A100-80GB split into 1g.10gb instances (9856 MiB each: 3 streams of the synthetic profile, not 50)."""
    mig: list[Slice | None] = [Slice("1g.10gb", 9856, f"MIG-{uuid[4:]}-{slot}") for slot in range(slices)]
    return Board("NVIDIA A100-SXM4-80GB", 81920, uuid=uuid, mig=mig + [None] * (7 - slices))


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


def test_mig_a100_with_seven_1g_10gb_slices_is_one_10gb_gpu_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the parent's 80 GB was advertised (50 streams), while a CUDA process gets one MIG instance."""
    calls = fake_machine(monkeypatch, [a100_in_mig_mode()])
    [one] = gpus.detect_gpus()
    assert (one.name, one.vram_total_mb, one.uuid) == ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", 9856, "MIG-a100-0")
    assert (one.index, one.utilization, one.simulated) == (0, 0.0, False), "no utilisation on MIG"
    cap = compute_capacity([one], DEFAULT_PROFILE, cpu_cores=96, ram_mb=1_000_000)
    assert streams_per_gpu(9856, DEFAULT_PROFILE) == 3
    assert (cap.gpu_streams, cap.max_streams, cap.reason) == (3, 3, "vram")
    assert calls == ["init", "shutdown"]


def test_mig_on_one_of_two_gpus_with_empty_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the GPU in MIG mode is split; empty MIG slots (NVML_ERROR_NOT_FOUND) are skipped."""
    split = Board("NVIDIA A100-SXM4-80GB", 81920, uuid="GPU-bbbb",
                  mig=[Slice("3g.40gb", 40192, "MIG-b0"), None, None, None, Slice("2g.20gb", 19968, "MIG-b4", 500),
                       None, None])
    fake_machine(monkeypatch, [Board("NVIDIA A100-SXM4-80GB", 81920, 1000, 40, "GPU-aaaa"), split])
    found = gpus.detect_gpus()
    assert [(g.index, g.name, g.vram_total_mb, g.vram_used_mb, g.utilization, g.uuid) for g in found] == [
        (0, "NVIDIA A100-SXM4-80GB", 81920, 1000, 40.0, "GPU-aaaa"),
        (1, "NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40192, 0, 0.0, "MIG-b0"),  # the first instance only
    ]
    assert compute_capacity(found, DEFAULT_PROFILE, cpu_cores=96, ram_mb=1_000_000).gpu_streams == 50 + 22
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-b4")
    assert [(g.vram_total_mb, g.vram_used_mb) for g in gpus.detect_gpus()] == [(19968, 500)]


def test_mig_device_without_its_own_name_is_called_after_its_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver that cannot name a MIG device (or names it like the parent) still gets a name saying it is a slice."""
    fake_machine(monkeypatch, [a100_in_mig_mode(slices=2)])
    named = pynvml.nvmlDeviceGetName

    def no_mig_names(handle: Any) -> Any:
        if isinstance(handle, tuple) and handle[1] == 0:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return "NVIDIA A100-SXM4-80GB" if isinstance(handle, tuple) else named(handle)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", no_mig_names)
    for slot in (0, 1):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"MIG-a100-{slot}")
        assert [g.name for g in gpus.detect_gpus()] == ["NVIDIA A100-SXM4-80GB MIG"]


@pytest.mark.parametrize(("visible", "expected"), [
    ("1", [1]),
    ("2,0", [2, 0]),  # CUDA enumerates in the order given
    ("0, 2", [0, 2]),
    ("0,-1,1", [0]),  # CUDA ignores everything from the first entry it cannot resolve
    ("0,7,1", [0]),
    ("", []),  # set but empty: no GPU at all
])
def test_cuda_visible_devices_by_index(monkeypatch: pytest.MonkeyPatch, visible: str, expected: list[int]) -> None:
    """Only the GPUs a CUDA process may use count; NVML's answer stands, GPUtil is not asked to overrule it."""
    fake_nvml(monkeypatch, [("NVIDIA A10G", 23028, 0, i) for i in range(3)])
    monkeypatch.setattr(GPUtil, "getGPUs", lambda: pytest.fail("NVML answered; GPUtil must not be asked"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [g.index for g in gpus.detect_gpus()] == expected


def test_cuda_visible_devices_index_of_a_gpu_in_mig_mode_means_its_first_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_machine(monkeypatch, [Board("NVIDIA A100-SXM4-80GB", 81920, uuid="GPU-aaaa"), a100_in_mig_mode(slices=3)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [g.uuid for g in gpus.detect_gpus()] == ["MIG-a100-0"]


def test_cuda_visible_devices_by_gpu_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full or abbreviated GPU UUIDs, as CUDA accepts them; a GPU in MIG mode stands for its slices."""
    fake_machine(monkeypatch, [Board("NVIDIA A100-SXM4-80GB", 81920, uuid="GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"),
                               Board("NVIDIA A100-SXM4-80GB", 81920, uuid="GPU-5c0e1bd4-1c5b-4f36-9b7c-3f1e2d0a9b8c"),
                               a100_in_mig_mode("GPU-77aa", slices=2)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5c0e1bd4-1c5b-4f36-9b7c-3f1e2d0a9b8c")
    assert [(g.index, g.vram_total_mb) for g in gpus.detect_gpus()] == [(1, 81920)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-77aa,GPU-8932f937")
    assert [g.uuid for g in gpus.detect_gpus()] == ["MIG-77aa-0", "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-ffff")
    assert gpus.detect_gpus() == []


def test_cuda_visible_devices_by_mig_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual MIG deployment: one process per instance, pinned by its MIG UUID, advertises one slice's streams."""
    fake_machine(monkeypatch, [a100_in_mig_mode()])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-a100-3")
    [one] = gpus.detect_gpus()
    assert (one.uuid, one.vram_total_mb) == ("MIG-a100-3", 9856)
    assert compute_capacity([one], DEFAULT_PROFILE, cpu_cores=96, ram_mb=1_000_000).max_streams == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-a100-5,MIG-a100-1")
    assert [g.uuid for g in gpus.detect_gpus()] == ["MIG-a100-5"]  # CUDA enumerates one instance per process


@pytest.mark.parametrize("missing", ["attribute", "function", "not-supported"])
def test_old_driver_without_mig_calls_describes_whole_gpus(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    """An nvidia-ml-py without the MIG calls, a driver without the symbol, or a GPU without MIG: whole GPUs."""
    fake_machine(monkeypatch, [Board("Tesla T4", 15360, 300, 12, "GPU-t4-0"),
                               Board("Tesla T4", 15360, uuid="GPU-t4-1")])
    if missing == "attribute":
        for name in ("nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount", "nvmlDeviceGetMigDeviceHandleByIndex"):
            monkeypatch.delattr(pynvml, name)
    else:
        code = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND if missing == "function" else pynvml.NVML_ERROR_NOT_SUPPORTED

        def fail(*_: Any) -> Any:
            raise nvml_error(code)

        for name in ("nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount", "nvmlDeviceGetMigDeviceHandleByIndex"):
            monkeypatch.setattr(pynvml, name, fail)
    found = gpus.detect_gpus()
    assert [(g.name, g.vram_total_mb, g.vram_used_mb, g.utilization, g.uuid) for g in found] == [
        ("Tesla T4", 15360, 300, 12.0, "GPU-t4-0"), ("Tesla T4", 15360, 0, 0.0, "GPU-t4-1")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-t4-1")
    assert [g.uuid for g in gpus.detect_gpus()] == ["GPU-t4-1"]


def test_heartbeat_refresh_rereads_mig_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """refresh() re-probes every heartbeat: MIG slices keep their own memory, used VRAM is live, utilisation 0."""
    board = a100_in_mig_mode(slices=2)
    fake_machine(monkeypatch, [board])
    found = gpus.detect_gpus()
    assert board.mig and board.mig[0]
    board.mig[0].used_mb = 6000
    live = gpus.refresh(found, vram_used_by_engine_mb=123)
    assert [(g.name, g.vram_total_mb, g.vram_used_mb, g.utilization) for g in live] == [
        ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", 9856, 6000, 0.0)]


_UNEXPECTED = {"no-permission": pynvml.NVML_ERROR_NO_PERMISSION, "unknown": pynvml.NVML_ERROR_UNKNOWN,
               "gpu-is-lost": pynvml.NVML_ERROR_GPU_IS_LOST}


def whole_a100_by_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    """What GPUtil would say of an A100 in MIG mode: nvidia-smi knows no MIG, so its whole 80 GB (50 streams)."""
    monkeypatch.setattr(GPUtil, "getGPUs", lambda: pytest.fail("NVML is loaded: GPUtil, blind to MIG, is no fallback"))


def fail_with(code: int) -> Callable[..., Any]:
    def fail(*_: Any) -> Any:
        raise nvml_error(code)

    return fail


@pytest.mark.parametrize("call", ["nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount",
                                  "nvmlDeviceGetMigDeviceHandleByIndex", "nvmlDeviceGetMemoryInfo"])
@pytest.mark.parametrize("error", list(_UNEXPECTED))
def test_an_nvml_query_failing_unexpectedly_fails_the_probe(monkeypatch: pytest.MonkeyPatch, call: str,
                                                            error: str) -> None:
    """Regression: any NVML error but NotFound/NotSupported/FunctionNotFound fell back to GPUtil, which counted an
    A100 split into 1g.10gb slices as one 80 GB GPU (50 streams instead of 3)."""
    calls = fake_machine(monkeypatch, [a100_in_mig_mode()])
    whole_a100_by_nvidia_smi(monkeypatch)
    monkeypatch.setattr(pynvml, call, fail_with(_UNEXPECTED[error]))
    with pytest.raises(gpus.GpuProbeFailed, match=str(nvml_error(_UNEXPECTED[error]))):
        gpus.detect_gpus()
    assert calls == ["init", "shutdown"], "NVML must always be shut down"


def test_a_gpu_in_mig_mode_whose_instances_cannot_be_listed_fails_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA cannot use the whole of a GPU in MIG mode: not knowing its instances is no reason to count all of it."""
    fake_machine(monkeypatch, [a100_in_mig_mode()])
    whole_a100_by_nvidia_smi(monkeypatch)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMaxMigDeviceCount", fail_with(pynvml.NVML_ERROR_NOT_SUPPORTED))
    with pytest.raises(gpus.GpuProbeFailed, match="MIG mode"):
        gpus.detect_gpus()


def test_a_heartbeat_probe_that_fails_keeps_the_last_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeat re-probes: a failing NVML must neither stop it nor swap the slice for GPUtil's whole GPU."""
    fake_machine(monkeypatch, [a100_in_mig_mode(slices=2)])
    whole_a100_by_nvidia_smi(monkeypatch)
    found = gpus.detect_gpus()
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", fail_with(pynvml.NVML_ERROR_GPU_IS_LOST))
    assert gpus.refresh(found) == found


@pytest.mark.parametrize("failing", ["nvmlDeviceGetMigDeviceHandleByIndex", "nvmlInit"])
@pytest.mark.parametrize("command", ["run", "calibrate"])
def test_a_failing_gpu_probe_stops_the_worker_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], command: str,
                                                          failing: str) -> None:
    """Better no worker, which systemd starts again, than one advertising streams its GPU cannot hold."""
    from shared.redis_server import free_port
    from worker.cli import EXIT_USAGE, calibrate, run_worker

    monkeypatch.setenv("FLEET_HUB_URLS", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("FLEET_IMDS_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("FLEET_IMDS_TIMEOUT_S", "0.1")
    fake_machine(monkeypatch, [a100_in_mig_mode()])
    whole_a100_by_nvidia_smi(monkeypatch)
    monkeypatch.setattr(pynvml, failing, fail_with(pynvml.NVML_ERROR_NO_PERMISSION))
    code = run_worker(port=0) if command == "run" else calibrate(max_concurrency=2, seconds=0.1)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE, err
    assert len(err) == 1 and err[0].startswith("fleet worker: cannot read the GPUs"), err
    assert "Insufficient Permissions" in err[0], err


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVML_ERROR_NO_PERMISSION,
                                  pynvml.NVML_ERROR_UNKNOWN], ids=["driver-not-loaded", "no-permission", "unknown"])
def test_nvml_that_is_installed_but_cannot_start_fails_the_probe(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Regression: a GPU host whose driver did not load, or that may not open it, registered as a CPU worker. Only
    NVML's absence (no library, no such function) means "no GPU here"."""
    monkeypatch.setattr(pynvml, "nvmlInit", fail_with(code))
    monkeypatch.setattr(GPUtil, "getGPUs", lambda: pytest.fail("nvidia-smi talks to the same broken driver"))
    with pytest.raises(gpus.GpuProbeFailed, match=re.escape(str(nvml_error(code)))):
        gpus.detect_gpus()


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND],
                         ids=["library-not-found", "function-not-found"])
def test_nvml_that_is_not_there_falls_back_to_gputil(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    monkeypatch.setattr(pynvml, "nvmlInit", fail_with(code))
    monkeypatch.setattr(GPUtil, "getGPUs", lambda: [SimpleNamespace(name="NVIDIA L4", memoryTotal=23034.0,
                                                                    memoryUsed=0.0, load=0.0)])
    assert [g.name for g in gpus.detect_gpus()] == ["NVIDIA L4"]


def test_gpu_in_mig_mode_without_instances_is_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA cannot use a GPU in MIG mode with no instance; GPUtil (nvidia-smi) would report its whole 80 GB."""
    fake_machine(monkeypatch, [a100_in_mig_mode(slices=0)])
    monkeypatch.setattr(GPUtil, "getGPUs", lambda: [SimpleNamespace(id=0, uuid="GPU-a100", name="NVIDIA A100-SXM4-80GB",
                                                                    memoryTotal=81920.0, memoryUsed=0.0, load=0.0)])
    assert gpus.detect_gpus() == []


def test_gputil_fallback_honours_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    no_nvml(monkeypatch)
    monkeypatch.setattr(GPUtil, "getGPUs", lambda: [
        SimpleNamespace(id=i, uuid=f"GPU-l4-{i}", name="NVIDIA L4", memoryTotal=23034.0, memoryUsed=0.0, load=0.0)
        for i in range(2)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-l4-1")
    assert [(g.index, g.uuid) for g in gpus.detect_gpus()] == [(1, "GPU-l4-1")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.detect_gpus() == []


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


#: The VRAM NVML reports (MiB) on the AWS instances of each GPU (nvidia-smi's "Total"): less than the nominal size.
REAL_NVML_MIB = {"t4": 15360, "a10g": 23028, "l4": 23034, "a100-40gb": 40960, "a100-80gb": 81920, "h100": 81559}
README = Path(gpus.__file__).with_name("README.md")


def _streams_in(text: str) -> dict[str, int]:
    return {kind.lower(): int(n) for kind, n in re.findall(r"([A-Z][\w-]*) (\d+)", text)}


def test_readme_states_the_streams_of_real_hardware_and_of_simulated_gpus() -> None:
    """Regression: the README gave the figures of the simulated (nominal) VRAM as what each GPU holds; real NVML
    totals hold one stream less on a T4, A10G, L4 and H100."""
    text = " ".join(README.read_text().split())
    real = re.search(r"Synthetic profile \(.*?\) per GPU[^:]*: (.*?) streams", text)
    assert real, "the README states what each GPU holds"
    assert _streams_in(real[1]) == {kind: streams_per_gpu(mib, DEFAULT_PROFILE) for kind, mib in REAL_NVML_MIB.items()}
    simulated = re.search(r"`--simulate-gpu` presents the nominal VRAM[^:]*: (.*?)\)", text)
    assert simulated, "the README says how simulated GPUs differ"
    nominal = {kind: streams_per_gpu(vram, DEFAULT_PROFILE) for kind, (_, vram) in gpus.KNOWN_GPUS.items()}
    differing = {kind: n for kind, n in nominal.items() if n != streams_per_gpu(REAL_NVML_MIB[kind], DEFAULT_PROFILE)}
    assert _streams_in(simulated[1]) == differing


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
    assert WorkerSettings(env="prod", worker_token="s3cret-of-at-least-32-characters").is_prod


def test_a_gpu_that_will_not_report_its_utilisation_still_counts_at_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """Utilisation is a live figure for the heartbeat, not capacity: whatever NVML error it gives, the GPU counts."""
    fake_nvml(monkeypatch, [("NVIDIA A10G", 23028, 100, 30)])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", fail_with(pynvml.NVML_ERROR_UNKNOWN))
    assert [(g.vram_total_mb, g.vram_used_mb, g.utilization) for g in gpus.detect_gpus()] == [(23028, 100, 0.0)]


def test_an_nvml_library_that_cannot_be_loaded_fails_the_probe_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken libnvidia-ml (an OSError from loading it) is a GPU host that cannot be read, said as such, not a
    traceback nor a CPU worker."""
    def broken() -> None:
        raise OSError("libnvidia-ml.so.1: undefined symbol")

    monkeypatch.setattr(pynvml, "nvmlInit", broken)
    monkeypatch.setattr(GPUtil, "getGPUs", lambda: pytest.fail("nvidia-smi loads the same broken library"))
    with pytest.raises(gpus.GpuProbeFailed, match="undefined symbol"):
        gpus.detect_gpus()


def test_simulated_gpus_go_up_to_64() -> None:
    assert len(gpus.parse_simulated("t4x64")) == 64
    with pytest.raises(ValueError, match=r"1\.\.64"):
        gpus.parse_simulated("t4x65")


def test_simulated_gpus_report_the_engines_vram_spread_evenly_and_never_above_their_size() -> None:
    four = gpus.parse_simulated("t4x4")
    assert [g.vram_used_mb for g in gpus.refresh(four, vram_used_by_engine_mb=10_000)] == [2500] * 4
    assert [g.vram_used_mb for g in gpus.refresh(four, vram_used_by_engine_mb=100_000)] == [16384] * 4


def test_a_heartbeat_probe_that_finds_no_gpu_keeps_the_last_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU that drops off the bus mid-run does not make the heartbeat report a CPU worker with its sessions."""
    fake_nvml(monkeypatch, [("Tesla T4", 15360, 300, 12)])
    found = gpus.detect_gpus()
    fake_nvml(monkeypatch, [])
    no_gputil(monkeypatch)
    assert gpus.refresh(found) == found


def test_a_gpu_too_small_for_the_model_holds_no_stream_rather_than_a_negative_number() -> None:
    heavy = replace(DEFAULT_PROFILE, model_mb=20_000)
    assert streams_per_gpu(15360, heavy) == 0
    cap = compute_capacity(gpus.parse_simulated("t4x2"), heavy, cpu_cores=64, ram_mb=1_000_000)
    assert (cap.gpu_streams, cap.max_streams, cap.reason) == (0, 0, "vram")


def test_an_override_of_zero_streams_is_a_worker_that_takes_none() -> None:
    """FLEET_MAX_STREAMS=0 (allowed by the settings): the worker registers but takes no session."""
    cap = compute_capacity(gpus.parse_simulated("a10g"), DEFAULT_PROFILE, cpu_cores=64, ram_mb=1_000_000, override=0)
    assert (cap.max_streams, cap.reason) == (0, "override")


def test_no_worker_advertises_more_than_the_streams_a_worker_may_carry() -> None:
    from shared.models import MAX_STREAMS_PER_WORKER

    huge = compute_capacity(gpus.parse_simulated("h100x64"), DEFAULT_PROFILE, cpu_cores=10_000, ram_mb=10**8)
    assert huge.gpu_streams == 64 * 50 and huge.max_streams == MAX_STREAMS_PER_WORKER


def test_the_host_caps_come_from_the_machine_and_an_engine_without_cpu_or_ram_needs_has_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import capacity

    monkeypatch.setattr(capacity.psutil, "cpu_count", lambda: 8)
    monkeypatch.setattr(capacity.psutil, "virtual_memory", lambda: SimpleNamespace(total=16 * 1024 * MB))
    host = compute_capacity(gpus.parse_simulated("a10g"), DEFAULT_PROFILE)
    assert (host.cpu_cap, host.ram_cap, host.max_streams, host.reason) == (16, 16, 12, "vram")
    gpu_only = replace(DEFAULT_PROFILE, cpu_cores_per_stream=0, ram_mb_per_stream=0)
    assert compute_capacity(gpus.parse_simulated("a10gx2"), gpu_only, cpu_cores=1, ram_mb=1024).max_streams == 24


@pytest.mark.parametrize(("cores", "per_stream", "streams"), [(33, 1.1, 30), (132, 1.1, 120), (6, 0.3, 20),
                                                               (4, 0.5, 8), (5, 0.3, 16)])
def test_a_cpu_share_per_stream_that_divides_the_cores_exactly_gives_that_many_streams(
        cores: int, per_stream: float, streams: int) -> None:
    """Decimal shares are not exact in binary: 33 / 1.1 is 29.999999999999996, which floored to one stream short."""
    profile = replace(DEFAULT_PROFILE, cpu_cores_per_stream=per_stream)
    assert compute_capacity([], profile, cpu_cores=cores, ram_mb=10**7).cpu_cap == streams
