"""`fleet worker` refusing its configuration: one line naming the variable, exit code 2, never a traceback.

Guards the values the worker only used to check when it registered (FLEET_ADVERTISE_URL, FLEET_ZONE, FLEET_LABELS)
or bound its port (FLEET_HOST, FLEET_PORT), which crashed with a traceback and exit code 1.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shared.keys import WORKER_ID_PATTERN
from shared.redis_server import free_port
from shared.settings import describe_invalid
from worker import imds as imds_module
from worker.cli import EXIT_USAGE, calibrate, run_worker
from worker.settings import WorkerSettings
from worker.voice.settings import VoiceSettings


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nowhere to register and no IMDS: a worker that got as far as running would retry forever."""
    monkeypatch.setenv("FLEET_HUB_URLS", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("FLEET_IMDS_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("FLEET_IMDS_TIMEOUT_S", "0.1")
    monkeypatch.setenv("FLEET_SIMULATE_GPU", "t4")


def refusal(capsys: pytest.CaptureFixture[str], command: Any = run_worker, **options: str | int | float) -> str:
    code = command(**options)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE, err
    assert len(err) == 1 and err[0].startswith("fleet worker: "), err
    return err[0]


@pytest.mark.parametrize(("variable", "value", "said"), [
    ("FLEET_ADVERTISE_URL", "10.0.0.5:8100", "FLEET_ADVERTISE_URL: String should match pattern"),
    ("FLEET_ADVERTISE_URL", "http://user:pw@10.0.0.5:8100", "FLEET_ADVERTISE_URL: must not carry"),
    ("FLEET_ZONE", "z" * 40, "FLEET_ZONE: String should have at most 32 characters"),
    ("FLEET_LABELS", '{"tier": "premium", "bad key": "x"}', "FLEET_LABELS: bad key.[key]: String should match"),
    ("FLEET_LABELS", "tier=premium", "FLEET_LABELS: must be a JSON object"),
    ("FLEET_HUB_URLS", "http://fleet:user:pw@10.0.0.9:8080", "FLEET_HUB_URLS: a hub URL must not carry"),
    ("FLEET_HUB_URLS", "http://10.0.0.8:8080,http://fleet:user:pw@10.0.0.9:8080",
     "FLEET_HUB_URLS: a hub URL must not carry"),
])
def test_a_value_the_registration_would_refuse_stops_the_start(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str], variable: str,
                                                                value: str, said: str) -> None:
    monkeypatch.setenv(variable, value)
    line = refusal(capsys)
    assert said in line and "invalid configuration" in line, line
    assert "user:pw" not in line


def test_a_voice_setting_is_named_by_its_own_variable(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: voice settings read ``FLEET_VOICE_*``, yet the refusal named FLEET_TTS_RATE_WPM, which does not
    exist."""
    monkeypatch.setenv("FLEET_ENGINE", "voice")
    monkeypatch.setenv("FLEET_VOICE_TTS_RATE_WPM", "10")
    line = refusal(capsys, port=0)
    assert "invalid configuration: FLEET_VOICE_TTS_RATE_WPM: Input should be greater than or equal to 80" in line, line


def test_an_advertised_url_passed_as_an_option_is_checked_alike(capsys: pytest.CaptureFixture[str]) -> None:
    assert "FLEET_ADVERTISE_URL: String should match pattern" in refusal(capsys, advertise_url="worker-1:8100")


def test_a_host_it_cannot_listen_on_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    line = refusal(capsys, host="999.1.1.1", port=0)
    assert line.startswith("fleet worker: FLEET_HOST: cannot listen on 999.1.1.1:0"), line


def test_a_port_in_use_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = refusal(capsys, host="127.0.0.1", port=port)
    assert line.startswith(f"fleet worker: FLEET_PORT: cannot listen on 127.0.0.1:{port}"), line


def test_a_worker_configured_for_ec2_without_instance_metadata_does_not_start(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """With a lifecycle hook it is meant to run in an ASG: registering as ``host-port`` at a loopback URL, blind to
    scale-in and spot notices, would be worse than stopping (systemd starts it again)."""
    monkeypatch.setattr(imds_module, "REQUIRED_ATTEMPTS", 2)
    monkeypatch.setenv("FLEET_LIFECYCLE_HOOK_NAME", "fleet-worker-drain")
    line = refusal(capsys, port=0)
    assert "configured for EC2" in line and "instance metadata did not answer" in line, line


def test_a_region_with_no_known_coordinates_needs_a_location(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The hub refuses such a registration: the worker says so at start, not in a retry loop."""
    monkeypatch.setenv("FLEET_REGION", "xx-newplace-1")
    line = refusal(capsys, port=0)
    assert "region xx-newplace-1 has no known coordinates: set FLEET_LOCATION_LAT" in line, line


def test_good_values_pass_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_LABELS", '{"tier": "premium"}')
    settings = WorkerSettings(advertise_url="https://w1.example.com:8443", zone="us-east-1a")
    assert (settings.advertise_url, settings.zone, settings.labels) == ("https://w1.example.com:8443", "us-east-1a",
                                                                       {"tier": "premium"})


@pytest.mark.parametrize(("variable", "raised_by"), [
    ("FLEET_VOICE_STT_CORPUS_FILE", "building the engine"),
    ("FLEET_VOICE_WHISPER_MODEL_DIR", "its start"),
])
def test_a_missing_voice_model_is_a_one_line_refusal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str], variable: str,
                                                     raised_by: str) -> None:
    """A missing model folder or corpus file names its path and setting, like any other refused configuration,
    instead of a 50-line traceback, whether the engine raises while it is built or in ``start()``."""
    missing = tmp_path / "no-such-model"
    monkeypatch.setenv("FLEET_ENGINE", "voice")
    monkeypatch.setenv(variable, str(missing))
    line = refusal(capsys, port=0)
    assert line == f"fleet worker: model path {missing} does not exist (set by {variable})", (raised_by, line)


@pytest.mark.parametrize(("variables", "setting"), [
    ({"FLEET_VOICE_STT_CORPUS_FILE": "{missing}"}, "FLEET_VOICE_STT_CORPUS_FILE"),
    ({"FLEET_VOICE_TTS_BACKEND": "chatterbox", "FLEET_VOICE_TTS_MODEL_DIR": "{missing}"}, "FLEET_VOICE_TTS_MODEL_DIR"),
])
def test_calibrating_without_the_voice_model_is_a_one_line_refusal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   variables: dict[str, str], setting: str) -> None:
    missing = tmp_path / "no-such-model"
    monkeypatch.setenv("FLEET_ENGINE", "voice")
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value.format(missing=missing))
    line = refusal(capsys, calibrate, max_concurrency=1, seconds=0.5)
    assert line == f"fleet worker: model path {missing} does not exist (set by {setting})", line


@pytest.mark.parametrize(("variables", "checkpoints", "said"), [
    ({"FLEET_VOICE_TTS_BACKEND": "chatterbox", "FLEET_VOICE_TTS_MODEL_DIR": "{models}"}, [],
     "fleet worker: model path {models}/ve.safetensors does not exist (set by FLEET_VOICE_TTS_MODEL_DIR)"),
    ({"FLEET_VOICE_TTS_BACKEND": "chatterbox", "FLEET_VOICE_TTS_MODEL_DIR": "{models}"},
     ["ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt"],
     "fleet worker: FLEET_VOICE_TTS_BACKEND=chatterbox needs the chatterbox-tts package"),
    ({"FLEET_VOICE_WHISPER_MODEL_DIR": "{models}"}, ["model.bin"],
     "fleet worker: the whisper STT backend needs the faster-whisper package"),
    ({"FLEET_VOICE_TTS_VOICE": "xx-nope"}, [], "fleet worker: espeak-ng has no voice 'xx-nope'"),
], ids=["chatterbox-folder-empty", "chatterbox-not-installed", "faster-whisper-not-installed", "espeak-voice"])
def test_a_voice_backend_that_cannot_start_is_a_one_line_refusal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 variables: dict[str, str], checkpoints: list[str],
                                                                 said: str) -> None:
    """These used to escape the engine's start as a traceback with exit code 1 (FileNotFoundError deep inside
    chatterbox, RuntimeError, ModuleNotFoundError); the line names the file, the package or the setting."""
    import sys

    for module in ["chatterbox", "chatterbox.tts", "faster_whisper"]:
        monkeypatch.setitem(sys.modules, module, None)  # not installed, whatever this host has
    models = tmp_path / "models"
    models.mkdir()
    for name in checkpoints:
        (models / name).write_bytes(b"weights")
    monkeypatch.setenv("FLEET_ENGINE", "voice")
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value.format(models=models))
    line = refusal(capsys, port=0)
    assert line.startswith(said.format(models=models)), line


def test_calibrating_with_an_espeak_voice_it_lacks_is_a_one_line_refusal(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FLEET_ENGINE", "voice")
    monkeypatch.setenv("FLEET_VOICE_TTS_VOICE", "xx-nope")
    line = refusal(capsys, calibrate, max_concurrency=1, seconds=0.5)
    assert line.startswith("fleet worker: espeak-ng has no voice 'xx-nope'"), line


def test_a_registration_it_cannot_build_stops_the_start(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: a ValidationError of the registration escaped the agent as a 63-line traceback. A 64-character
    host name (Linux allows it) is one DNS label too long for the advertised URL's host."""
    monkeypatch.setenv("FLEET_HUB_URLS", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("FLEET_IMDS_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("FLEET_IMDS_TIMEOUT_S", "0.1")
    monkeypatch.setenv("FLEET_SIMULATE_GPU", "t4")
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 64)
    code = run_worker(host="0.0.0.0", port=0)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE and len(err) == 1, err
    assert err[0].startswith("fleet worker: invalid registration: url: ") and "FLEET_ADVERTISE_URL" in err[0], err


@pytest.mark.parametrize(("args", "said"), [
    (["calibrate", "--hub", "http://hub:8080"], "--hub applies to `fleet worker ID` only"),
    (["w-1", "--engine", "voice"], "--engine applies to `fleet worker` and `fleet worker calibrate` only"),
    (["w-1", "--simulate-gpu", "t4"], "--simulate-gpu applies to `fleet worker` and `fleet worker calibrate` only"),
    (["calibrate", "--port", "9000"], "--port applies to `fleet worker` only"),
    (["--seconds", "3"], "--seconds applies to `fleet worker calibrate` only"),
    (["--json"], "--json applies to `fleet worker ID` only"),
])
def test_an_option_the_chosen_mode_does_not_take_is_refused_not_ignored(args: list[str], said: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: `fleet worker calibrate --hub x` ran a 23 s calibration, and `fleet worker ID --engine voice`
    showed the worker, each ignoring what it was told."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("FLEET_HUB_URL", "http://127.0.0.1:1")  # from the environment, an option is no refusal
    result = CliRunner().invoke(app, ["worker", *args])
    assert result.exit_code == 2, result.output
    assert said in result.output


def test_hub_urls_skip_empty_entries_and_refuse_an_empty_list(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A stray comma is no hub to register with; no hub at all is a refused start, not a worker retrying nowhere."""
    monkeypatch.setenv("FLEET_HUB_URLS", " http://a:8000/, ,http://b:8000,")
    assert WorkerSettings().hub_urls == ["http://a:8000", "http://b:8000"]
    monkeypatch.setenv("FLEET_HUB_URLS", " , ")
    assert "FLEET_HUB_URLS: at least one hub URL is needed" in refusal(capsys)


def test_empty_labels_are_no_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_LABELS", " ")
    assert WorkerSettings().labels == {}


def test_scale_in_protection_alone_means_the_worker_must_find_instance_metadata() -> None:
    assert WorkerSettings(protect_from_scale_in=True).expects_ec2
    assert WorkerSettings(lifecycle_hook_name="fleet-worker-drain").expects_ec2
    assert not WorkerSettings().expects_ec2


def test_vram_overrides_of_zero_are_applied() -> None:
    """FLEET_HEADROOM_MB=0 keeps nothing free, and FLEET_MODEL_MB=0 is an engine without weights: zero is a value."""
    from worker.engines.synthetic import DEFAULT_PROFILE

    profile = WorkerSettings(model_mb=0, headroom_mb=0).vram_profile(DEFAULT_PROFILE)
    assert (profile.model_mb, profile.per_stream_mb, profile.headroom_mb) == (0, DEFAULT_PROFILE.per_stream_mb, 0)


@pytest.mark.parametrize(("hostname", "worker_id"), [
    ("gpu-box_7.lab", "gpu-box_7.lab-8100"),
    ("-.gpu box", "gpu-box-8100"),
    ("büro²", "b-ro--8100"),
    ("...", "worker-8100"),
    ("h" * 80, "h" * 59 + "-8100"),
])
def test_a_worker_off_ec2_is_named_after_its_host_and_port(monkeypatch: pytest.MonkeyPatch, hostname: str,
                                                           worker_id: str) -> None:
    """Whatever the machine's name, the id is one the hub takes.

    Regression: a host name with a non-ASCII letter or digit (``büro``) was kept as it was, so the registration was
    refused and the worker could not start without FLEET_WORKER_ID."""
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    assert WorkerSettings().fallback_worker_id(8100) == worker_id
    assert re.fullmatch(WORKER_ID_PATTERN, worker_id)


def test_python_dash_m_worker_passes_each_option_to_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.__main__ as entry

    called: list[tuple[Any, ...]] = []
    monkeypatch.setattr(entry, "run_worker", lambda *args: called.append(args) or 0)
    assert entry.main(["--host", "127.0.0.1", "--port", "0", "--advertise-url", "http://w:8100", "--region",
                       "eu-west-1", "--simulate-gpu", "a10g", "--max-streams", "3", "--engine", "voice"]) == 0
    assert called == [("127.0.0.1", 0, "http://w:8100", "eu-west-1", "a10g", 3, "voice")]


def test_python_dash_m_worker_exits_with_the_code_of_a_refused_start() -> None:
    """systemd and scripts see the refusal: exit code 2, not 0."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "worker", "--port", "0", "--region", "xx-newplace-1"], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "region xx-newplace-1 has no known coordinates" in done.stderr


def test_the_options_of_fleet_worker_reach_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each option given wins over the environment; none is dropped on the way to the agent."""
    import worker.agent

    seen: list[WorkerSettings] = []

    class Agent:
        def __init__(self, settings: WorkerSettings) -> None:
            seen.append(settings)

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(worker.agent, "WorkerAgent", Agent)
    assert run_worker(host="127.0.0.1", port=0, advertise_url="http://w:8100", region="eu-west-1",
                      simulate_gpu="a10g", max_streams=3, engine="synthetic") == 0
    s = seen[0]
    assert (s.host, s.port, s.advertise_url, s.region, s.simulate_gpu, s.max_streams, s.engine) == (
        "127.0.0.1", 0, "http://w:8100", "eu-west-1", "a10g", 3, "synthetic")


def test_fleet_worker_passes_each_option_to_the_mode_that_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the operator typed reaches the agent or the calibration, and their exit code is the command's."""
    from typer.testing import CliRunner

    import worker.cli
    from cli.main import app

    runs: list[dict[str, Any]] = []
    calibrations: list[dict[str, Any]] = []
    monkeypatch.setattr(worker.cli, "run_worker", lambda **options: runs.append(options) or 0)
    monkeypatch.setattr(worker.cli, "calibrate", lambda **options: calibrations.append(options) or 3)
    ran = CliRunner().invoke(app, ["worker", "--host", "127.0.0.1", "--port", "0", "--advertise-url", "http://w:8100",
                                   "--region", "eu-west-1", "--simulate-gpu", "a10g", "--max-streams", "3",
                                   "--engine", "synthetic"])
    assert ran.exit_code == 0, ran.output
    assert runs == [{"host": "127.0.0.1", "port": 0, "advertise_url": "http://w:8100", "region": "eu-west-1",
                     "simulate_gpu": "a10g", "max_streams": 3, "engine": "synthetic"}]
    calibrated = CliRunner().invoke(app, ["worker", "calibrate", "--engine", "voice", "--simulate-gpu", "t4",
                                          "--seconds", "1.5", "--max-streams", "4"])
    assert calibrated.exit_code == 3, calibrated.output
    assert calibrations == [{"engine": "voice", "simulate_gpu": "t4", "seconds": 1.5, "max_concurrency": 4}]


def test_a_voice_setting_read_from_a_shared_variable_is_named_by_that_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Voice settings read ``FLEET_ENV``, not ``FLEET_VOICE_ENV``: a bad value names the variable the SRE set."""
    monkeypatch.setenv("FLEET_ENV", "staging")
    with pytest.raises(ValidationError) as refused:
        VoiceSettings()
    assert describe_invalid(refused.value).startswith("invalid configuration: FLEET_ENV: Input should be"), refused


def test_a_misspelt_variable_and_the_clis_hub_url_are_named_when_the_worker_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """FLEET_REGOIN left the region at its default, and FLEET_HUB_URL (the SRE commands') sent the worker to the
    default hub, both without a word; the start still goes on (here it stops at the empty token)."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("FLEET_REGOIN", "eu-west-1")
    monkeypatch.setenv("FLEET_HUB_URL", "http://10.0.0.9:8080")
    monkeypatch.delenv("FLEET_HUB_URLS")
    monkeypatch.setenv("FLEET_WORKER_TOKEN", "")
    result = CliRunner().invoke(app, ["worker"])
    assert result.exit_code == 2, result.output
    assert ("fleet worker: warning: FLEET_REGOIN is set, but no part of gpu-fleet reads it; did you mean "
            "FLEET_REGION?") in result.output
    assert "the worker agent registers with the hubs of FLEET_HUB_URLS" in result.output
    monkeypatch.setenv("FLEET_HUB_URLS", "http://10.0.0.9:8080")  # both set: the CLI's and the worker's
    again = CliRunner().invoke(app, ["worker"])
    assert "FLEET_HUB_URL names" not in again.output and "FLEET_REGOIN" in again.output
    hub = CliRunner().invoke(app, ["hub", "--port", "0"], env={"FLEET_ADMIN_TOKEN": ""})
    assert hub.exit_code == 2 and "fleet hub: warning: FLEET_REGOIN is set" in hub.output, hub.output


def test_the_start_up_warnings_go_to_stderr_leaving_stdout_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("FLEET_REGOIN", "eu-west-1")
    monkeypatch.setenv("FLEET_HUB_URL", "http://10.0.0.9:8080")
    monkeypatch.delenv("FLEET_HUB_URLS")
    monkeypatch.setenv("FLEET_WORKER_TOKEN", "")
    result = CliRunner().invoke(app, ["worker"])
    assert "FLEET_REGOIN is set" in result.stderr and "FLEET_HUB_URL names" in result.stderr, result.stderr
    assert "warning" not in result.stdout, result.stdout
