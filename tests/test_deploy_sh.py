"""deploy.sh against a fake ``aws`` (and a fake ``cfn-lint`` where the real one is not the point) on PATH."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy.sh"
BASH = shutil.which("bash") or "/bin/bash"
SECRET = "SUPERSECRET-never-print-me"
REGIONS = "us-east-1,eu-west-1"
DEPLOY_ARGS = ["--env", "prod", "--regions", REGIONS, "--domain", "fleet.example.com"]

FAKE_AWS = f"""#!{BASH}
# Records each call as one line of \x1f-separated args, answers what deploy.sh asks.
(IFS=$'\x1f'; echo "aws"$'\x1f'"$*") >> "$FAKE_LOG"
args="$*"
all=("$@")
arg() {{  # the value after option $1
  local i
  for i in "${{!all[@]}}"; do [[ ${{all[$i]}} != "$1" ]] || {{ echo "${{all[$((i + 1))]}}"; return; }}; done
}}
case "$args" in
  "sts get-caller-identity"*) echo 123456789012 ;;
  "route53 "*)
    # FAKE_HOSTED_ZONES: a list-hosted-zones-by-name answer (JSON file) that --query is evaluated on, as aws does.
    [[ -n "${{FAKE_HOSTED_ZONES:-}}" ]] || {{ echo /hostedzone/ZFAKE123; exit 0; }}
    exec {sys.executable} -c 'import json, sys, jmespath
found = jmespath.search(sys.argv[2], json.load(open(sys.argv[1])))
print("None" if found is None else found)' "$FAKE_HOSTED_ZONES" "$(arg --query)" ;;
  "acm "*) echo "${{FAKE_CERTIFICATE-arn:aws:acm:us-east-1:123456789012:certificate/fake}}" ;;
  # FAKE_ROUTES_EXIST: the routes are there already (a re-run, or a re-created peering), as aws says.
  "ec2 create-route"*)
    [[ -z "${{FAKE_ROUTES_EXIST:-}}" ]] || {{ echo "An error occurred (RouteAlreadyExists)" >&2; exit 254; }} ;;
  "ec2 describe-managed-prefix-lists"*) echo "${{FAKE_PREFIX_LIST-pl-fake123}}" ;;
  "secretsmanager "*) echo {SECRET} ;;
  *"describe-stacks"*OutputKey*)
    key="$(echo "$args" | sed -n "s/.*OutputKey=='\\([A-Za-z]*\\)'.*/\\1/p")"
    # FAKE_OUTPUTS_EMPTY / _NONE / _FAIL: space-separated output keys answered empty, None, or with an error.
    case " ${{FAKE_OUTPUTS_EMPTY:-}} " in *" $key "*) echo; exit 0 ;; esac
    case " ${{FAKE_OUTPUTS_NONE:-}} " in *" $key "*) echo None; exit 0 ;; esac
    case " ${{FAKE_OUTPUTS_FAIL:-}} " in *" $key "*) echo "An error occurred (AccessDenied)" >&2; exit 254 ;; esac
    if [[ $key == VpcCidr ]]; then
      # FAKE_VPC_CIDRS: "region=cidr ..." of the network stacks that exist; elsewhere there is no such stack.
      for deployed in ${{FAKE_VPC_CIDRS:-}}; do
        [[ ${{deployed%%=*}} != "$(arg --region)" ]] || {{ echo "${{deployed#*=}}"; exit 0; }}
      done
      echo "An error occurred (ValidationError): Stack with id $(arg --stack-name) does not exist" >&2
      exit 254
    fi
    echo "output-of-$key" ;;
  # With FAKE_STATE_DIR, stacks have a status (one file per region and stack) as CloudFormation keeps it: a CREATE
  # change set makes a REVIEW_IN_PROGRESS stack, which refuses UPDATE change sets. A deploy records the parameters
  # it passed (<state>.parameters.json), which a --query on Parameters reads, as aws would (as text or JSON).
  *"describe-stacks"*Parameter*)
    # FAKE_PARAMETERS_FAIL: reading a stack's parameters is refused.
    [[ -z "${{FAKE_PARAMETERS_FAIL:-}}" ]] || {{ echo "An error occurred (AccessDenied)" >&2; exit 254; }}
    state="${{FAKE_STATE_DIR:-/no-state}}/$(arg --region)-$(arg --stack-name)"
    if [[ ! -f $state ]]; then
      echo "An error occurred (ValidationError): Stack with id $(arg --stack-name) does not exist" >&2
      exit 254
    fi
    exec {sys.executable} -c 'import json, os, sys, jmespath
state, query, output = sys.argv[1:]
given = json.load(open(state + ".parameters.json")) if os.path.exists(state + ".parameters.json") else {{}}
stack = {{"StackStatus": open(state).read().strip(),
          "Parameters": [{{"ParameterKey": k, "ParameterValue": v}} for k, v in given.items()]}}
found = jmespath.search(query, {{"Stacks": [stack]}})
text = lambda value: "None" if value is None else str(value)
if output == "json":
    print(json.dumps(found))
else:
    print("\\t".join(map(text, found)) if isinstance(found, list) else text(found))' "$state" "$(arg --query)" \
      "$(arg --output)" ;;
  "cloudformation deploy"*)
    # FAKE_DEPLOY_FAIL: "stack@region ..." whose deployment fails (rolled back).
    case " ${{FAKE_DEPLOY_FAIL:-}} " in
      *" $(arg --stack-name)@$(arg --region) "*) echo "Failed to deploy $(arg --stack-name)" >&2; exit 255 ;;
    esac
    if [[ -n "${{FAKE_STATE_DIR:-}}" ]]; then
      state="$FAKE_STATE_DIR/$(arg --region)-$(arg --stack-name)"
      [[ -f $state ]] && echo UPDATE_COMPLETE > "$state" || echo CREATE_COMPLETE > "$state"
      exec {sys.executable} -c 'import json, sys
given = sys.argv[sys.argv.index("--parameter-overrides") + 1:]
json.dump(dict(p.split("=", 1) for p in given), open(sys.argv[1] + ".parameters.json", "w"))' "$state" "$@"
    fi ;;
  "cloudformation describe-stacks"*)
    if [[ -n "${{FAKE_STATE_DIR:-}}" ]]; then
      state="$FAKE_STATE_DIR/$(arg --region)-$(arg --stack-name)"
      if [[ ! -f $state ]]; then
        echo "An error occurred (ValidationError): Stack with id $(arg --stack-name) does not exist" >&2
        exit 254
      fi
      cat "$state"
    fi ;;
  "cloudformation create-change-set"*)
    if [[ -n "${{FAKE_STATE_DIR:-}}" ]]; then
      state="$FAKE_STATE_DIR/$(arg --region)-$(arg --stack-name)"
      if [[ $(arg --change-set-type) == UPDATE && "$(cat "$state" 2>/dev/null)" == REVIEW_IN_PROGRESS ]]; then
        echo "An error occurred (ValidationError): Stack is in REVIEW_IN_PROGRESS state and can not be updated." >&2
        exit 254
      fi
      [[ -f $state ]] || echo REVIEW_IN_PROGRESS > "$state"
    fi ;;
  *"describe-change-set"*) echo "| Add | LoadBalancer | AWS::ElasticLoadBalancingV2::LoadBalancer |" ;;
esac
exit 0
"""

FAKE_CFN_LINT = f"""#!{BASH}
if [[ "$1" == "--version" ]]; then echo "cfn-lint ${{FAKE_CFN_LINT_VERSION:-1.58.0}}"; exit 0; fi
(IFS=$'\x1f'; echo "cfn-lint"$'\x1f'"$*") >> "$FAKE_LOG"
[[ -z "$FAKE_CFN_LINT_RC" ]] || echo "$FAKE_CFN_LINT_FILE:1:1 E0000 something is wrong"
exit "${{FAKE_CFN_LINT_RC:-0}}"
"""

# Stands in for `python3 -m pip wheel` (slow, writes build files) and runs the real python3 otherwise; see
# test_two_deploys_of_the_same_source_upload_the_same_artifact for the real build.
FAKE_PYTHON3 = f"""#!{BASH}
if [[ "$1 $2 $3" == "-m pip wheel" ]]; then
  while [[ $# -gt 0 ]]; do [[ "$1" == "-w" ]] && dist="$2"; shift; done
  mkdir -p "$dist"
  exec {sys.executable} -c 'import sys, zipfile
zipfile.ZipFile(sys.argv[1], "w").writestr("gpu_fleet/__init__.py", "")' "$dist/gpu_fleet-0.1.0-py3-none-any.whl"
fi
exec {sys.executable} "$@"
"""


@dataclass
class Run:
    rc: int
    out: str
    calls: list[list[str]]

    def aws(self, *prefix: str) -> list[list[str]]:
        """Calls of the fake aws (without the leading "aws") starting with ``prefix``; or of cfn-lint."""
        if prefix and prefix[0] == "cfn-lint":
            return [c for c in self.calls if c[0] == "cfn-lint"]
        return [c[1:] for c in self.calls if c[0] == "aws" and c[1: 1 + len(prefix)] == list(prefix)]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("aws", FAKE_AWS), ("cfn-lint", FAKE_CFN_LINT), ("python3", FAKE_PYTHON3)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    livekit = tmp_path / "livekit.json"
    livekit.write_text(json.dumps([{"region": "us-east-1", "url": "wss://lk.example.com", "lat": 38.9, "lon": -77.4},
                                   {"region": "eu-west-1", "url": "wss://lk-eu.example.com", "lat": 53.3,
                                    "lon": -6.2}]))
    # No venv: the project's own (which deploy.sh prefers) would lint instead of the fake cfn-lint on PATH.
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_LOG": str(tmp_path / "calls"),
            "GPU_FLEET_DIST_DIR": str(tmp_path / "dist"), "LIVEKIT": str(livekit),
            "GPU_FLEET_VENV": str(tmp_path / "no-venv")}


def run(env: dict[str, str], *args: str, extra_env: dict[str, str] | None = None) -> Run:
    proc = subprocess.run([BASH, str(SCRIPT), *args], env={**env, **(extra_env or {})}, capture_output=True,
                          text=True, timeout=30, cwd=ROOT)
    log = Path(env["FAKE_LOG"])
    calls = [line.split("\x1f") for line in log.read_text().splitlines()] if log.exists() else []
    return Run(proc.returncode, proc.stdout + proc.stderr, calls)


def test_validate_lints_every_template_with_the_real_cfn_lint(env: dict[str, str]) -> None:
    real = str(Path(sys.executable).parent)
    result = run({**env, "PATH": f"{real}:{env['PATH']}"}, "validate")
    assert result.rc == 0, result.out
    for name in ("network", "secrets", "redis", "hub", "gpu-workers"):
        assert f"ok      {name}.yaml" in result.out


def test_validate_fails_when_a_template_does_not_lint(env: dict[str, str]) -> None:
    result = run(env, "validate", extra_env={"FAKE_CFN_LINT_RC": "2", "FAKE_CFN_LINT_FILE": "cloudformation/hub.yaml"})
    assert result.rc != 0
    assert "FAILED  hub.yaml" in result.out
    assert "ok      network.yaml" in result.out
    assert "E0000 something is wrong" in result.out
    [call] = result.aws("cfn-lint")
    assert sum(a.endswith(".yaml") for a in call) == 5


@pytest.mark.parametrize("version", ["1.51.0", "0.87.4", "unknown"])
def test_a_cfn_lint_too_old_for_the_templates_is_named_before_any_lint(env: dict[str, str], version: str) -> None:
    """Regression: cfn-lint 1.51 failed gpu-workers.yaml with E3016 (it predates AutoScalingInstanceRefresh), which
    read as a broken template."""
    result = run(env, "validate", extra_env={"FAKE_CFN_LINT_VERSION": version})
    assert result.rc != 0
    assert f"cfn-lint {version} is older than 1.56.0" in result.out
    assert "pip install -U 'cfn-lint>=1.56.0'" in result.out
    assert result.aws("cfn-lint") == [], "linted anyway"
    assert run(env, "validate", extra_env={"FAKE_CFN_LINT_VERSION": "1.56.0"}).rc == 0


def test_missing_prerequisites_are_named_and_fail(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for tool in ("dirname", "sed"):
        found = shutil.which(tool)
        assert found
        (bare / tool).symlink_to(found)
    proc = subprocess.run([BASH, str(SCRIPT), "deploy", *DEPLOY_ARGS],
                          env={"PATH": str(bare), "GPU_FLEET_VENV": str(tmp_path / "no-venv")},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "missing prerequisites: aws cfn-lint python3" in proc.stderr


def test_missing_cfn_lint_alone_is_reported_for_validate(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "bin" / "cfn-lint").unlink()
    bare = tmp_path / "bare"
    bare.mkdir()
    for tool in ("dirname", "sed"):
        (bare / tool).symlink_to(shutil.which(tool) or tool)
    result = run({**env, "PATH": f"{tmp_path / 'bin'}:{bare}"}, "validate")
    assert result.rc != 0
    assert "missing prerequisites: cfn-lint" in result.out


def test_dry_run_deploy_prints_every_aws_call_and_runs_none(env: dict[str, str]) -> None:
    result = run(env, "deploy", "--dry-run", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"])
    assert result.rc == 0, result.out
    assert [c[0] for c in result.calls] == ["cfn-lint"]  # linting is local; no aws call ran
    deploys = [line for line in result.out.splitlines() if line.startswith("+ aws cloudformation deploy")]
    stacks = [(line.split("--stack-name ")[1].split()[0], line.split("--region ")[1].split()[0]) for line in deploys]
    assert stacks == [
        ("gpu-fleet-prod-network", "us-east-1"), ("gpu-fleet-prod-secrets", "us-east-1"),
        ("gpu-fleet-prod-redis", "us-east-1"), ("gpu-fleet-prod-hub", "us-east-1"),
        ("gpu-fleet-prod-gpu-workers", "us-east-1"),
        ("gpu-fleet-prod-network", "eu-west-1"), ("gpu-fleet-prod-gpu-workers", "eu-west-1"),
    ]
    assert all("--no-fail-on-empty-changeset" in line for line in deploys)
    assert "+ aws s3 cp " in result.out
    assert "+ python3 -m pip wheel" in result.out
    assert "VpcCidr=10." not in result.out  # it reads no stack, so it cannot know a region's CIDR: a placeholder


def test_deploy_runs_in_order_idempotently_and_never_handles_a_secret(env: dict[str, str]) -> None:
    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"])
    assert result.rc == 0, result.out
    deploys = result.aws("cloudformation", "deploy")
    assert len(deploys) == 7
    assert all("--no-fail-on-empty-changeset" in c for c in deploys)
    uploads = result.aws("s3", "cp")
    assert len(uploads) == 1 and uploads[0][2].endswith("gpu_fleet-0.1.0-py3-none-any.whl")
    key = uploads[0][3].split("/", 3)[3]
    hub = next(c for c in deploys if "gpu-fleet-prod-hub" in c)
    assert f"ArtifactKey={key}" in hub
    assert f"WorkerRegions={REGIONS}" in hub
    assert "HostedZoneId=ZFAKE123" in hub
    assert "CertificateArn=arn:aws:acm:us-east-1:123456789012:certificate/fake" in hub
    workers = [c for c in deploys if "gpu-fleet-prod-gpu-workers" in c]
    assert "WorkerTokenSecretArn=output-of-WorkerTokenSecretArn" in workers[0]
    assert "HubSecurityGroupId=output-of-HubSecurityGroupId" in workers[0]
    assert "HubCidr=output-of-HubCidr" in workers[1]  # the hubs' subnets, not the home VPC and its workers
    assert all("Engine=synthetic" in c for c in workers)  # the default engine
    # Hubs reach workers of other regions over a peering the regional network stack requests and deploy.sh accepts.
    regional_net = next(c for c in deploys if "gpu-fleet-prod-network" in c and "eu-west-1" in c)
    assert "PeerVpcId=output-of-VpcId" in regional_net and "PeerRegion=us-east-1" in regional_net
    [accept] = result.aws("ec2", "accept-vpc-peering-connection")
    assert accept[accept.index("--region") + 1] == "us-east-1"
    routes = {(c[c.index("--region") + 1], c[c.index("--destination-cidr-block") + 1])
              for c in result.aws("ec2", "create-route")}
    assert routes == {("us-east-1", "10.41.0.0/16"), ("eu-west-1", "10.40.0.0/16")}
    # Secrets are generated in AWS: the script never reads one, passes one, or prints one.
    assert not result.aws("secretsmanager")
    assert SECRET not in result.out
    for call in result.calls:
        assert not any("token=" in a.lower() or "password" in a.lower() for a in call)


def test_deploy_refuses_livekit_keys_in_the_regions_file(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"region": "r", "url": "u", "lat": 1, "lon": 2, "api_secret": SECRET}]))
    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", str(bad))
    assert result.rc != 0
    assert SECRET not in result.out
    assert not result.aws("cloudformation")


def test_plan_creates_and_describes_change_sets_without_executing(env: dict[str, str]) -> None:
    result = run(env, "plan", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"])
    assert result.rc == 0, result.out
    created = result.aws("cloudformation", "create-change-set")
    assert len(created) == 7
    assert len(result.aws("cloudformation", "describe-change-set")) == 7
    assert "AWS::ElasticLoadBalancingV2::LoadBalancer" in result.out
    assert not result.aws("cloudformation", "execute-change-set")
    assert not result.aws("cloudformation", "deploy")
    assert not result.aws("s3")
    assert SECRET not in result.out


def test_destroy_needs_confirmation_and_deletes_in_reverse(env: dict[str, str]) -> None:
    refused = run(env, "destroy", "--env", "prod", "--regions", REGIONS)
    assert refused.rc != 0 and "--yes" in refused.out
    assert "secrets are kept" in refused.out  # secrets.yaml retains them; docs/deploy.md says how to delete them
    assert not refused.calls
    result = run(env, "destroy", "--env", "prod", "--regions", REGIONS, "--yes")
    assert result.rc == 0, result.out
    deleted = [(c[c.index("--stack-name") + 1], c[c.index("--region") + 1])
               for c in result.aws("cloudformation", "delete-stack")]
    assert deleted[:2] == [("gpu-fleet-prod-gpu-workers", "us-east-1"), ("gpu-fleet-prod-gpu-workers", "eu-west-1")]
    assert deleted[2:5] == [("gpu-fleet-prod-hub", "us-east-1"), ("gpu-fleet-prod-redis", "us-east-1"),
                            ("gpu-fleet-prod-secrets", "us-east-1")]
    assert deleted[5:] == [("gpu-fleet-prod-network", "us-east-1"), ("gpu-fleet-prod-network", "eu-west-1")]


def test_bad_arguments_fail_with_a_message(env: dict[str, str]) -> None:
    assert "unknown argument" in run(env, "deploy", "--nope").out
    missing_env = run(env, "deploy", "--regions", REGIONS, "--domain", "d.example.com")
    assert missing_env.rc != 0 and "--env is required" in missing_env.out
    bad_region = run(env, "deploy", "--env", "prod", "--regions", "mars-1", "--domain", "d")
    assert bad_region.rc != 0 and "not an AWS region" in bad_region.out


def test_plan_twice_before_the_first_deploy(env: dict[str, str], tmp_path: Path) -> None:
    """Deleting a CREATE change set leaves the stack in REVIEW_IN_PROGRESS: the next plan must CREATE again."""
    state = tmp_path / "stacks"
    state.mkdir()
    args = ["plan", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"]]
    first = run(env, *args, extra_env={"FAKE_STATE_DIR": str(state)})
    assert first.rc == 0, first.out
    assert sorted(p.read_text().strip() for p in state.iterdir()) == ["REVIEW_IN_PROGRESS"] * 7
    Path(env["FAKE_LOG"]).unlink()
    second = run(env, *args, extra_env={"FAKE_STATE_DIR": str(state)})
    assert second.rc == 0, second.out
    created = second.aws("cloudformation", "create-change-set")
    assert [c[c.index("--change-set-type") + 1] for c in created] == ["CREATE"] * 7


def test_plan_updates_a_stack_that_exists(env: dict[str, str], tmp_path: Path) -> None:
    state = tmp_path / "stacks"
    state.mkdir()
    (state / "us-east-1-gpu-fleet-prod-hub").write_text("UPDATE_COMPLETE\n")
    result = run(env, "plan", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"],
                 extra_env={"FAKE_STATE_DIR": str(state)})
    assert result.rc == 0, result.out
    types = {c[c.index("--stack-name") + 1] + "@" + c[c.index("--region") + 1]: c[c.index("--change-set-type") + 1]
             for c in result.aws("cloudformation", "create-change-set")}
    assert types.pop("gpu-fleet-prod-hub@us-east-1") == "UPDATE"
    assert set(types.values()) == {"CREATE"}


@pytest.mark.parametrize("answer", ["EMPTY", "NONE", "FAIL"])
@pytest.mark.parametrize(("output", "stack", "stops_before"), [
    ("HubSecurityGroupId", "gpu-fleet-prod-hub", ("gpu-fleet-prod-gpu-workers", "us-east-1")),
    ("WorkerTokenSecretArn", "gpu-fleet-prod-secrets", ("gpu-fleet-prod-gpu-workers", "us-east-1")),
    ("VpcId", "gpu-fleet-prod-network", ("gpu-fleet-prod-network", "eu-west-1")),
    ("HubCidr", "gpu-fleet-prod-network", ("gpu-fleet-prod-gpu-workers", "eu-west-1")),
])
def test_deploy_stops_on_a_missing_stack_output(env: dict[str, str], output: str, stack: str,
                                                 stops_before: tuple[str, str], answer: str) -> None:
    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"],
                 extra_env={f"FAKE_OUTPUTS_{answer}": output})
    assert result.rc != 0
    assert f"stack {stack} in us-east-1 has no output {output}" in result.out
    assert f"stopping before {stops_before[0]} in {stops_before[1]}" in result.out
    deployed = [(c[c.index("--stack-name") + 1], c[c.index("--region") + 1])
                for c in result.aws("cloudformation", "deploy")]
    assert stops_before not in deployed
    for call in result.aws("cloudformation", "deploy"):
        assert not {"HubSecurityGroupId=", "WorkerTokenSecretArn=", "PeerVpcId=", "HubCidr="} & set(call)
        assert not any(a.endswith("=None") for a in call)


def test_deploy_does_not_peer_with_a_missing_peering_id(env: dict[str, str]) -> None:
    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"],
                 extra_env={"FAKE_OUTPUTS_NONE": "PeeringConnectionId"})
    assert result.rc != 0
    assert "stack gpu-fleet-prod-network in eu-west-1 has no output PeeringConnectionId" in result.out
    assert not result.aws("ec2")


def test_plan_skips_a_stack_whose_inputs_do_not_exist_yet(env: dict[str, str]) -> None:
    result = run(env, "plan", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"],
                 extra_env={"FAKE_OUTPUTS_FAIL": "HubSecurityGroupId"})
    assert result.rc == 0, result.out
    assert "no change set for gpu-fleet-prod-gpu-workers in us-east-1" in result.out
    assert "has no output HubSecurityGroupId" in result.out
    created = [(c[c.index("--stack-name") + 1], c[c.index("--region") + 1])
               for c in result.aws("cloudformation", "create-change-set")]
    assert len(created) == 6 and ("gpu-fleet-prod-gpu-workers", "us-east-1") not in created


def _worker_stack_parameters(result: Run) -> list[dict[str, str]]:
    return [_parameters(call) for stack, _, call in _stack_calls(result, "cloudformation", "deploy")
            if stack == "gpu-fleet-prod-gpu-workers"]


@pytest.mark.parametrize(("args", "replies"), [
    (("--llm-model", "us.amazon.nova-micro-v1:0", "--bedrock-region", "us-west-2"),
     {"LlmBackend": "bedrock", "LlmModel": "us.amazon.nova-micro-v1:0", "LlmBaseUrl": "",
      "BedrockRegion": "us-west-2"}),
    (("--llm-backend", "openai", "--llm-model", "llama3.1:8b", "--llm-base-url", "http://10.0.7.20:8000/v1"),
     {"LlmBackend": "openai", "LlmModel": "llama3.1:8b", "LlmBaseUrl": "http://10.0.7.20:8000/v1",
      "LlmApiKeySecretArn": "", "BedrockRegion": ""}),
    (("--llm-backend", "openai", "--llm-model", "gpt-4o-mini", "--llm-base-url", "https://api.openai.com/v1",
      "--llm-api-key-secret", "arn:aws:secretsmanager:ap-south-1:123456789012:secret:llm/api-key-AbC123"),
     {"LlmBackend": "openai", "LlmModel": "gpt-4o-mini", "LlmBaseUrl": "https://api.openai.com/v1",
      "LlmApiKeySecretArn": "arn:aws:secretsmanager:ap-south-1:123456789012:secret:llm/api-key-AbC123"}),
    (("--llm-backend", "canned"), {"LlmBackend": "canned", "LlmModel": "", "LlmBaseUrl": "", "BedrockRegion": ""}),
], ids=["bedrock", "openai", "openai-with-key", "canned"])
def test_a_voice_deploy_tells_every_worker_stack_how_the_engine_replies(env: dict[str, str], args: tuple[str, ...],
                                                                       replies: dict[str, str]) -> None:
    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], "--engine", "voice", *args)
    assert result.rc == 0, result.out
    workers = _worker_stack_parameters(result)
    assert len(workers) == 2, workers
    assert all({k: given[k] for k in ("Engine", *replies)} == {"Engine": "voice", **replies} for given in workers)


def _whisper_model(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "whisper large v3"
    folder.mkdir()
    for name in names:
        (folder / name).write_text(f"bytes of {name}")
    return folder


def test_a_speech_model_is_uploaded_once_under_a_name_that_changes_with_it(env: dict[str, str],
                                                                           tmp_path: Path) -> None:
    """The model's folder goes to the artifact bucket under a key that hashes its files: the same model twice is
    the same key (no worker replaced), a changed one a new key (the workers are replaced with it)."""
    model = _whisper_model(tmp_path, "model.bin", "config.json", "vocabulary.txt", "tokenizer.json")
    args = (*DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], "--engine", "voice", "--llm-backend", "canned",
            "--whisper-model", str(model))

    def deployed_key() -> str:
        result = run(env, "deploy", *args)
        assert result.rc == 0, result.out
        [sync] = result.aws("s3", "sync")[-1:]
        keys = {w["WhisperModelKey"] for w in _worker_stack_parameters(result)[-2:]}
        assert len(keys) == 1 and sync[2:4] == [str(model), f"s3://{sync[3].split('/')[2]}/{next(iter(keys))}"]
        assert "--sse" in sync, sync
        return keys.pop()

    first = deployed_key()
    assert re.fullmatch(r"models/whisper/whisper-large-v3-[0-9a-f]{16}/", first), first
    assert deployed_key() == first
    (model / "config.json").write_text("another config")
    assert deployed_key() != first


@pytest.mark.parametrize(("args", "said"), [
    (("--engine", "voice"), "needs --llm-model"),
    (("--engine", "voice", "--llm-backend", "openai", "--llm-model", "m"), "needs --llm-base-url"),
    (("--engine", "voice", "--llm-backend", "gpt"), "--llm-backend gpt is unknown"),
    (("--engine", "voice", "--llm-model", "m", "--bedrock-region", "mars"), "not an AWS region: mars"),
    (("--engine", "avatar"), "--engine avatar cannot be deployed"),
    (("--engine", "synthetic", "--whisper-model", "/nonexistent"), "--whisper-model is for --engine voice"),
    (("--llm-model", "m"), "the voice options go with --engine voice"),
    (("--llm-backend", "canned"), "the voice options go with --engine voice"),
    (("--engine", "voice", "--llm-backend", "canned", "--whisper-model", "/nonexistent"), "no such folder"),
    (("--engine", "voice", "--llm-model", "m", "--llm-api-key-secret", "arn:aws:secretsmanager:us-east-1:"
      "123456789012:secret:k-AbC123"), "it goes with --llm-backend openai"),
    (("--engine", "voice", "--llm-backend", "openai", "--llm-model", "m", "--llm-base-url", "http://10.0.7.20/v1",
      "--llm-api-key-secret", "arn:aws:secretsmanager:us-east-1:123456789012:secret:k"), "six-character suffix"),
    (("--llm-api-key-secret", "arn:aws:secretsmanager:us-east-1:123456789012:secret:k-AbC123"),
     "the voice options go with --engine voice"),
], ids=["no-model", "openai-without-url", "unknown-backend", "bad-bedrock-region", "unknown-engine",
        "whisper-without-voice", "options-without-engine", "backend-without-engine", "no-whisper-folder",
        "key-without-openai", "key-partial-arn", "key-without-engine"])
def test_an_engine_that_could_not_reply_is_refused_before_any_aws_call(env: dict[str, str], args: tuple[str, ...],
                                                                       said: str) -> None:
    """The template's rules would refuse these too, but only once a change set fails, stack by stack."""
    for command in ("deploy", "plan"):
        result = run(env, command, *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], *args)
        assert result.rc != 0 and said in result.out, result.out
        assert not result.aws("cloudformation") and not result.aws("s3")


def test_behind_cloudfront_the_alb_admits_only_cloudfront(env: dict[str, str]) -> None:
    """The hubs then believe CloudFront-Viewer-Address as the client's address: only safe when nothing else gets
    through to the ALB."""
    cloudfront = ["--cloudfront-certificate-arn", "arn:aws:acm:us-east-1:123456789012:certificate/cf"]
    result = run(env, "deploy", *DEPLOY_ARGS, *cloudfront, "--livekit-regions", env["LIVEKIT"])
    assert result.rc == 0, result.out
    [lookup] = result.aws("ec2", "describe-managed-prefix-lists")
    assert "Name=prefix-list-name,Values=com.amazonaws.global.cloudfront.origin-facing" in lookup
    hub = next(c for c in result.aws("cloudformation", "deploy") if "gpu-fleet-prod-hub" in c)
    assert "CloudFrontPrefixListId=pl-fake123" in hub

    Path(env["FAKE_LOG"]).unlink()  # each run's calls on their own
    missing = run(env, "deploy", *DEPLOY_ARGS, *cloudfront, "--livekit-regions", env["LIVEKIT"],
                  extra_env={"FAKE_PREFIX_LIST": "None"})
    assert missing.rc != 0 and "no CloudFront origin-facing prefix list" in missing.out
    assert missing.aws("cloudformation", "deploy") == []

    Path(env["FAKE_LOG"]).unlink()
    without = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"])
    assert without.aws("ec2", "describe-managed-prefix-lists") == []


# --- Review findings on the AWS deployment ----------------------------------------------------------------------

def _artifact_key(result: Run) -> str:
    assert result.rc == 0, result.out
    [hub] = [c for c in result.aws("cloudformation", "deploy") if "gpu-fleet-prod-hub" in c]
    [key] = [a.removeprefix("ArtifactKey=") for a in hub if a.startswith("ArtifactKey=")]
    return key


def test_two_deploys_of_the_same_source_upload_the_same_artifact(env: dict[str, str], tmp_path: Path) -> None:
    """The real `pip wheel` stamps the build time and the files' mtimes into the wheel: keyed on its bytes, every
    deploy was a new release that rolled every hub and drained every GPU worker."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "build", "dist", "*.egg-info")
    source.mkdir()
    for name in ("deploy.sh", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("cloudformation", "shared", "hub", "worker", "cli"):
        shutil.copytree(ROOT / package, source / package, ignore=ignore)
    (tmp_path / "bin" / "python3").unlink()  # the real build, with the venv's python3 and pip
    real = {**env, "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    args = [BASH, str(source / "deploy.sh"), "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"]]

    def deploy() -> str:
        Path(env["FAKE_LOG"]).unlink(missing_ok=True)
        proc = subprocess.run(args, env=real, capture_output=True, text=True, timeout=60, cwd=source)
        calls = [line.split("\x1f") for line in Path(env["FAKE_LOG"]).read_text().splitlines()]
        return _artifact_key(Run(proc.returncode, proc.stdout + proc.stderr, calls))

    def fresh_checkout(mtime: int) -> None:
        """What a new clone of the same commit looks like: no build directory, every file with a new mtime."""
        for leftover in ("build", "gpu_fleet.egg-info"):
            shutil.rmtree(source / leftover, ignore_errors=True)
        for path in source.rglob("*"):
            os.utime(path, (mtime, mtime))

    first = deploy()
    fresh_checkout(1_700_000_000)
    assert deploy() == first
    module = source / "shared" / "__init__.py"
    module.write_text(module.read_text() + "\n# a change to what the instances run\n")
    assert deploy() != first


def test_a_region_listed_twice_is_refused(env: dict[str, str]) -> None:
    """--regions us-east-1,us-east-1 redeployed the home network stack as a "second region", with another CIDR."""
    result = run(env, "deploy", "--env", "prod", "--regions", "us-east-1,eu-west-1,us-east-1", "--domain",
                 "fleet.example.com", "--livekit-regions", env["LIVEKIT"])
    assert result.rc != 0
    assert "us-east-1 is listed twice in --regions" in result.out
    assert not result.aws("cloudformation") and not result.aws("s3")


def _network_cidrs(result: Run) -> dict[str, str]:
    assert result.rc == 0, result.out
    cidrs = {}
    for call in result.aws("cloudformation", "deploy"):
        if "gpu-fleet-prod-network" in call:
            [cidr] = [a.removeprefix("VpcCidr=") for a in call if a.startswith("VpcCidr=")]
            cidrs[call[call.index("--region") + 1]] = cidr
    return cidrs


def test_a_region_keeps_its_vpc_cidr_when_another_region_is_dropped(env: dict[str, str]) -> None:
    """The CIDR followed the position in --regions: dropping a region (docs/deploy.md, "Drain a region") gave the
    regions after it a new CIDR, which CloudFormation applies by replacing their live VPC."""
    deployed = {"FAKE_VPC_CIDRS": "us-east-1=10.40.0.0/16 eu-west-1=10.41.0.0/16 ap-southeast-1=10.42.0.0/16"}
    result = run(env, "deploy", "--env", "prod", "--regions", "us-east-1,ap-southeast-1", "--domain",
                 "fleet.example.com", "--livekit-regions", env["LIVEKIT"], extra_env=deployed)
    assert _network_cidrs(result) == {"us-east-1": "10.40.0.0/16", "ap-southeast-1": "10.42.0.0/16"}
    routes = {(c[c.index("--region") + 1], c[c.index("--destination-cidr-block") + 1])
              for c in result.aws("ec2", "create-route")}
    assert routes == {("us-east-1", "10.42.0.0/16"), ("ap-southeast-1", "10.40.0.0/16")}


def test_a_new_region_takes_a_cidr_that_no_deployed_region_uses(env: dict[str, str]) -> None:
    deployed = {"FAKE_VPC_CIDRS": "us-east-1=10.40.0.0/16 ap-southeast-1=10.41.0.0/16"}
    result = run(env, "deploy", "--env", "prod", "--regions", "us-east-1,eu-west-1,ap-southeast-1", "--domain",
                 "fleet.example.com", "--livekit-regions", env["LIVEKIT"], extra_env=deployed)
    assert _network_cidrs(result) == {"us-east-1": "10.40.0.0/16", "eu-west-1": "10.42.0.0/16",
                                      "ap-southeast-1": "10.41.0.0/16"}


def test_a_vpc_cidr_that_cannot_be_read_stops_the_deploy(env: dict[str, str]) -> None:
    """Taking a failed lookup for "no network yet" would pick a CIDR, and replace the VPC if it differs."""
    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"],
                 extra_env={"FAKE_OUTPUTS_FAIL": "VpcCidr"})
    assert result.rc != 0
    assert "cannot read the VpcCidr of gpu-fleet-prod-network in us-east-1" in result.out
    assert not result.aws("cloudformation", "deploy")


def test_the_hosted_zone_lookup_ignores_private_zones(env: dict[str, str], tmp_path: Path) -> None:
    """With split-horizon DNS the private zone of the same name can come first; records there are not public."""
    zones = tmp_path / "zones.json"
    private = {"Id": "/hostedzone/Z0PRIVATE", "Name": "example.com.", "Config": {"PrivateZone": True}}
    public = {"Id": "/hostedzone/Z0PUBLIC", "Name": "example.com.", "Config": {"PrivateZone": False}}
    zones.write_text(json.dumps({"HostedZones": [private, public]}))
    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"],
                 extra_env={"FAKE_HOSTED_ZONES": str(zones)})
    assert result.rc == 0, result.out
    [hub] = [c for c in result.aws("cloudformation", "deploy") if "gpu-fleet-prod-hub" in c]
    assert "HostedZoneId=Z0PUBLIC" in hub

    Path(env["FAKE_LOG"]).unlink()
    zones.write_text(json.dumps({"HostedZones": [private]}))
    only_private = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"],
                       extra_env={"FAKE_HOSTED_ZONES": str(zones)})
    assert only_private.rc != 0 and "no hosted zone found for fleet.example.com" in only_private.out
    assert not only_private.aws("cloudformation", "deploy")


# --- --livekit-regions on a re-deploy ----------------------------------------------------------------------------

def _hub_livekit_regions(result: Run) -> str:
    [hub] = [c for c in result.aws("cloudformation", "deploy") if "gpu-fleet-prod-hub" in c]
    [value] = [a.removeprefix("LiveKitRegions=") for a in hub if a.startswith("LiveKitRegions=")]
    return value


def test_a_redeploy_without_livekit_regions_keeps_the_hub_stacks_value(env: dict[str, str], tmp_path: Path) -> None:
    """The issue's own command (no --livekit-regions) was refused even when the hubs already had their regions."""
    state = tmp_path / "stacks"
    state.mkdir()
    first = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"],
                extra_env={"FAKE_STATE_DIR": str(state)})
    assert first.rc == 0, first.out
    deployed = _hub_livekit_regions(first)
    assert json.loads(deployed) == json.loads(Path(env["LIVEKIT"]).read_text())

    Path(env["FAKE_LOG"]).unlink()
    again = run(env, "deploy", "--env", "prod", "--regions", REGIONS, "--domain", "fleet.example.com",
                extra_env={"FAKE_STATE_DIR": str(state)})
    assert again.rc == 0, again.out
    assert _hub_livekit_regions(again) == deployed
    [lookup] = [c for c in again.aws("cloudformation", "describe-stacks") if "LiveKitRegions" in c[-3]]
    assert lookup[lookup.index("--region") + 1] == "us-east-1"
    assert len(again.aws("cloudformation", "deploy")) == 7

    Path(env["FAKE_LOG"]).unlink()
    planned = run(env, "plan", *DEPLOY_ARGS, extra_env={"FAKE_STATE_DIR": str(state)})
    assert planned.rc == 0, planned.out
    assert len(planned.aws("cloudformation", "create-change-set")) == 7


def test_a_first_deploy_without_livekit_regions_says_why_it_needs_the_file(env: dict[str, str],
                                                                           tmp_path: Path) -> None:
    state = tmp_path / "stacks"
    state.mkdir()
    for command in ("deploy", "plan"):
        result = run(env, command, *DEPLOY_ARGS, extra_env={"FAKE_STATE_DIR": str(state)})
        assert result.rc != 0
        assert "first deployment" in result.out and "--livekit-regions FILE" in result.out, result.out
        assert '{"region", "url", "lat", "lon"}' in result.out and "gpu-fleet-prod-hub" in result.out
        assert not result.aws("cloudformation", "deploy") and not result.aws("cloudformation", "create-change-set")
        assert not result.aws("s3")
    # A plan's CREATE change set leaves an empty stack in REVIEW_IN_PROGRESS: still a first deployment.
    (state / "us-east-1-gpu-fleet-prod-hub").write_text("REVIEW_IN_PROGRESS\n")
    reviewed = run(env, "deploy", *DEPLOY_ARGS, extra_env={"FAKE_STATE_DIR": str(state)})
    assert reviewed.rc != 0 and "first deployment" in reviewed.out, reviewed.out


def test_a_dry_run_without_livekit_regions_prints_the_lookup(env: dict[str, str]) -> None:
    result = run(env, "deploy", "--dry-run", *DEPLOY_ARGS)
    assert result.rc == 0, result.out
    assert [c[0] for c in result.calls] == ["cfn-lint"]
    assert "+ aws cloudformation describe-stacks --region us-east-1 --stack-name gpu-fleet-prod-hub" in result.out
    [hub] = [line for line in result.out.splitlines()
             if line.startswith("+ aws cloudformation deploy") and "--stack-name gpu-fleet-prod-hub " in line]
    assert "LiveKitRegions=\\<gpu-fleet-prod-hub.LiveKitRegions\\>" in hub


def _stack_calls(result: Run, *prefix: str) -> list[tuple[str, str, list[str]]]:
    """(stack, region, call) of each aws call starting with ``prefix``."""
    return [(c[c.index("--stack-name") + 1], c[c.index("--region") + 1], c) for c in result.aws(*prefix)]


def _parameters(call: list[str]) -> dict[str, str]:
    given = call[call.index("--parameter-overrides") + 1:]
    return dict(p.split("=", 1) for p in given)


def test_a_stack_that_fails_to_deploy_stops_the_deploy(env: dict[str, str]) -> None:
    """Nothing after a failed stack is deployed (it would build on a stack that is not there), and the script does
    not end by announcing the deployment."""
    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"],
                 extra_env={"FAKE_DEPLOY_FAIL": "gpu-fleet-prod-hub@us-east-1"})
    assert result.rc != 0
    deployed = [(stack, region) for stack, region, _ in _stack_calls(result, "cloudformation", "deploy")]
    assert deployed[-1] == ("gpu-fleet-prod-hub", "us-east-1")
    assert len(deployed) == 4
    assert "deployed: https://" not in result.out


def test_every_stack_is_given_the_parameters_its_template_requires_and_only_those_it_declares(
        env: dict[str, str]) -> None:
    """A parameter without a default that deploy.sh forgets fails the first deployment (and an update keeps a stale
    value); one the template does not declare fails every deployment."""
    from cfnlint.decode import cfn_yaml

    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"])
    assert result.rc == 0, result.out
    for stack, region, call in _stack_calls(result, "cloudformation", "deploy"):
        declared = cfn_yaml.load(call[call.index("--template-file") + 1])["Parameters"]
        required = {name for name, p in declared.items() if "Default" not in p}
        given = _parameters(call)
        assert required <= set(given), (stack, region, required - set(given))
        assert set(given) <= set(declared), (stack, region, set(given) - set(declared))
        if stack == "gpu-fleet-prod-gpu-workers":
            assert given["HomeRegion"] == "us-east-1" and given["HubUrl"] == "https://fleet.example.com", given


def test_the_cloudfront_certificate_reaches_the_hub_stack(env: dict[str, str]) -> None:
    """Without it the hub stack creates no distribution: the domain silently points at the ALB alone."""
    arn = "arn:aws:acm:us-east-1:123456789012:certificate/cf"
    result = run(env, "deploy", *DEPLOY_ARGS, "--cloudfront-certificate-arn", arn, "--livekit-regions", env["LIVEKIT"])
    assert result.rc == 0, result.out
    [hub] = [c for stack, _, c in _stack_calls(result, "cloudformation", "deploy") if stack == "gpu-fleet-prod-hub"]
    assert _parameters(hub)["CloudFrontCertificateArn"] == arn


def test_every_stack_and_change_set_may_create_the_iam_roles_of_the_templates(env: dict[str, str]) -> None:
    """The hub and worker stacks create IAM roles: without CAPABILITY_IAM CloudFormation refuses them."""
    deployed = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"])
    assert deployed.rc == 0, deployed.out
    Path(env["FAKE_LOG"]).unlink()
    planned = run(env, "plan", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"])
    assert planned.rc == 0, planned.out
    calls = deployed.aws("cloudformation", "deploy") + planned.aws("cloudformation", "create-change-set")
    assert len(calls) == 14
    for call in calls:
        assert call[call.index("--capabilities") + 1] == "CAPABILITY_IAM", call


def test_deploy_and_plan_stop_when_a_template_does_not_lint(env: dict[str, str]) -> None:
    for command in ("deploy", "plan"):
        Path(env["FAKE_LOG"]).unlink(missing_ok=True)
        result = run(env, command, *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"],
                     extra_env={"FAKE_CFN_LINT_RC": "2", "FAKE_CFN_LINT_FILE": "cloudformation/hub.yaml"})
        assert result.rc != 0, command
        assert "FAILED  hub.yaml" in result.out
        assert not result.aws("cloudformation") and not result.aws("s3"), command


def test_routes_use_the_peering_only_once_it_is_active(env: dict[str, str]) -> None:
    """A route to a peering that is still pending acceptance is refused by EC2."""
    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"])
    assert result.rc == 0, result.out
    ec2 = result.aws("ec2")
    [wait] = [i for i, c in enumerate(ec2) if c[:2] == ["ec2", "wait"]]
    accept = next(i for i, c in enumerate(ec2) if c[1] == "accept-vpc-peering-connection")
    routes = [i for i, c in enumerate(ec2) if c[1] == "create-route"]
    assert accept < wait < min(routes)
    call = ec2[wait]
    assert call[2] == "vpc-peering-connection-exists" and call[call.index("--region") + 1] == "us-east-1"
    assert call[call.index("--vpc-peering-connection-ids") + 1] == "output-of-PeeringConnectionId"
    assert call[call.index("--filters") + 1] == "Name=status-code,Values=active"


def test_a_route_left_by_an_earlier_peering_is_replaced(env: dict[str, str]) -> None:
    """A re-run, or a re-created peering, finds the routes there: they must point at the current peering, or the hubs
    stop reaching that region's workers."""
    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"],
                 extra_env={"FAKE_ROUTES_EXIST": "1"})
    assert result.rc == 0, result.out
    created = [c[2:] for c in result.aws("ec2", "create-route")]
    replaced = [c[2:] for c in result.aws("ec2", "replace-route")]
    assert created and replaced == created
    assert all(c[c.index("--vpc-peering-connection-id") + 1] == "output-of-PeeringConnectionId" for c in replaced)


def test_destroy_waits_for_each_stack_before_deleting_the_next(env: dict[str, str]) -> None:
    """The network stacks cannot go while the stacks that import their exports are still being deleted."""
    result = run(env, "destroy", "--env", "prod", "--regions", REGIONS, "--yes")
    assert result.rc == 0, result.out
    calls = [c for c in result.aws("cloudformation") if c[1] in ("delete-stack", "wait")]
    assert len(calls) == 14
    for delete, wait in zip(calls[::2], calls[1::2], strict=True):
        assert delete[1] == "delete-stack" and wait[1:3] == ["wait", "stack-delete-complete"]
        assert delete[2:] == wait[3:]  # the same --region and --stack-name


def test_the_certificate_is_looked_up_in_the_home_region_and_must_be_found(env: dict[str, str]) -> None:
    """The ALB takes a certificate of its own region only; a lookup that finds none answers None, which would fail
    the hub stack after the network, secrets and Redis stacks were deployed."""
    args = ["--env", "prod", "--regions", "eu-west-1,us-east-1", "--domain", "fleet.example.com"]
    result = run(env, "deploy", *args, "--livekit-regions", env["LIVEKIT"])
    assert result.rc == 0, result.out
    [lookup] = result.aws("acm", "list-certificates")
    assert lookup[lookup.index("--region") + 1] == "eu-west-1"

    Path(env["FAKE_LOG"]).unlink()
    missing = run(env, "deploy", *args, "--livekit-regions", env["LIVEKIT"], extra_env={"FAKE_CERTIFICATE": "None"})
    assert missing.rc != 0
    assert "no ISSUED ACM certificate for fleet.example.com in eu-west-1" in missing.out
    assert not missing.aws("cloudformation", "deploy")


def test_a_new_artifact_bucket_is_private_and_the_wheel_is_encrypted(env: dict[str, str]) -> None:
    result = run(env, "deploy", "--dry-run", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"])
    assert result.rc == 0, result.out
    bucket = "gpu-fleet-prod-123456789012-us-east-1"
    blocked = r"BlockPublicAcls=true\,IgnorePublicAcls=true\,BlockPublicPolicy=true\,RestrictPublicBuckets=true"  # %q
    assert (f"+ aws s3api put-public-access-block --bucket {bucket} --region us-east-1 "
            f"--public-access-block-configuration {blocked}") in result.out
    [upload] = [line for line in result.out.splitlines() if line.startswith("+ aws s3 cp ")]
    assert " --sse AES256 " in upload


def test_deploy_sh_offers_the_engines_and_llm_backends_the_worker_template_allows() -> None:
    """Two lists of one thing: a choice only deploy.sh knew would fail in a change set, one only the template knew
    would be refused before it."""
    from cfnlint.decode import cfn_yaml

    parameters = cfn_yaml.load(str(ROOT / "cloudformation" / "gpu-workers.yaml"))["Parameters"]
    text = SCRIPT.read_text()
    for shell_list, parameter in (("DEPLOYABLE_ENGINES", "Engine"), ("LLM_BACKENDS", "LlmBackend")):
        [listed] = re.findall(rf"^{shell_list}=\(([^)]*)\)$", text, flags=re.MULTILINE)
        assert listed.split() == parameters[parameter]["AllowedValues"], shell_list


def test_a_speech_model_folder_that_lacks_a_file_is_refused_before_any_aws_call(env: dict[str, str],
                                                                                  tmp_path: Path) -> None:
    model = _whisper_model(tmp_path, "model.bin", "config.json", "tokenizer.json")
    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], "--engine", "voice",
                 "--llm-backend", "canned", "--whisper-model", str(model))
    assert result.rc != 0 and "lacks vocabulary.json or vocabulary.txt" in result.out, result.out
    assert not result.aws("cloudformation") and not result.aws("s3")


def test_deploy_sh_checks_a_speech_model_for_the_files_the_worker_loads() -> None:
    from worker.voice.stt import WHISPER_MODEL_FILES

    [listed] = re.findall(r'^WHISPER_MODEL_FILES="([^"]*)"$', SCRIPT.read_text(), flags=re.MULTILINE)
    assert [tuple(group.split("|")) for group in listed.split()] == list(WHISPER_MODEL_FILES)


ENGINE_PARAMETERS = ("Engine", "LlmBackend", "LlmModel", "LlmBaseUrl", "LlmApiKeySecretArn", "BedrockRegion",
                     "WhisperModelKey")


def test_a_redeploy_without_engine_options_keeps_the_deployed_voice_engine(env: dict[str, str],
                                                                            tmp_path: Path) -> None:
    """A forgotten --engine must not replace every voice worker with a synthetic one: without it, the engine
    settings of the home region's worker stack are kept whole, the speech model's folder included (not uploaded
    again)."""
    state = tmp_path / "stacks"
    state.mkdir()
    model = _whisper_model(tmp_path, "model.bin", "config.json", "vocabulary.txt", "tokenizer.json")
    first = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], "--engine", "voice",
                "--llm-model", "us.amazon.nova-micro-v1:0", "--bedrock-region", "us-west-2", "--whisper-model",
                str(model), extra_env={"FAKE_STATE_DIR": str(state)})
    assert first.rc == 0, first.out
    deployed = [{k: w[k] for k in ENGINE_PARAMETERS} for w in _worker_stack_parameters(first)]
    assert deployed[0]["Engine"] == "voice" and deployed[0]["WhisperModelKey"].startswith("models/whisper/")

    Path(env["FAKE_LOG"]).unlink()
    again = run(env, "deploy", *DEPLOY_ARGS, extra_env={"FAKE_STATE_DIR": str(state)})
    assert again.rc == 0, again.out
    assert [{k: w[k] for k in ENGINE_PARAMETERS} for w in _worker_stack_parameters(again)] == deployed
    assert "keeping the deployed engine: voice" in again.out and not again.aws("s3", "sync")

    Path(env["FAKE_LOG"]).unlink()
    changed = run(env, "deploy", *DEPLOY_ARGS, "--engine", "synthetic", extra_env={"FAKE_STATE_DIR": str(state)})
    assert changed.rc == 0, changed.out
    assert {w["Engine"] for w in _worker_stack_parameters(changed)} == {"synthetic"}


def test_a_redeploy_without_engine_options_keeps_the_openai_servers_key(env: dict[str, str], tmp_path: Path) -> None:
    state = tmp_path / "stacks"
    state.mkdir()
    key = "arn:aws:secretsmanager:ap-south-1:123456789012:secret:llm/api-key-AbC123"
    first = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], "--engine", "voice",
                "--llm-backend", "openai", "--llm-model", "gpt-4o-mini", "--llm-base-url", "https://api.openai.com/v1",
                "--llm-api-key-secret", key, extra_env={"FAKE_STATE_DIR": str(state)})
    assert first.rc == 0, first.out
    Path(env["FAKE_LOG"]).unlink()
    again = run(env, "deploy", *DEPLOY_ARGS, extra_env={"FAKE_STATE_DIR": str(state)})
    assert again.rc == 0, again.out
    assert {w["LlmApiKeySecretArn"] for w in _worker_stack_parameters(again)} == {key}


def test_the_deployed_engine_is_looked_up_in_a_dry_run_and_a_failed_lookup_stops_the_deploy(
        env: dict[str, str], tmp_path: Path) -> None:
    dry = run(env, "deploy", "--dry-run", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"])
    assert dry.rc == 0, dry.out
    assert "describe-stacks --region us-east-1 --stack-name gpu-fleet-prod-gpu-workers" in dry.out
    assert "Engine=\\<gpu-fleet-prod-gpu-workers.Engine\\>" in dry.out, dry.out
    state = tmp_path / "stacks"
    state.mkdir()
    refused = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"],
                  extra_env={"FAKE_STATE_DIR": str(state), "FAKE_PARAMETERS_FAIL": "1"})
    assert refused.rc != 0 and "cannot read the engine settings of gpu-fleet-prod-gpu-workers" in refused.out
    assert not refused.aws("cloudformation", "deploy") and not refused.aws("s3")


def test_a_first_voice_deploy_creates_the_bucket_before_it_uploads_the_speech_model_into_it(
        env: dict[str, str], tmp_path: Path) -> None:
    model = _whisper_model(tmp_path, "model.bin", "config.json", "vocabulary.txt", "tokenizer.json")
    result = run(env, "deploy", "--dry-run", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], "--engine", "voice",
                 "--llm-backend", "canned", "--whisper-model", str(model))
    assert result.rc == 0, result.out
    s3 = [line.split()[3] for line in result.out.splitlines() if line.startswith("+ aws s3 ")]
    assert "mb" in s3 and "sync" in s3 and s3.index("mb") < s3.index("sync"), s3


def test_a_plan_passes_the_speech_model_key_a_deploy_would(env: dict[str, str], tmp_path: Path) -> None:
    """The change sets a plan shows are the deploy's: without the model's key they would show every voice worker
    losing its speech model."""
    model = _whisper_model(tmp_path, "model.bin", "config.json", "vocabulary.txt", "tokenizer.json")
    real_aws = Path(env["PATH"].split(":")[0]) / "aws"
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    planned = tmp_path / "planned.jsonl"
    (wrapper / "aws").write_text(f"""#!{BASH}
prev=""
for arg in "$@"; do
  if [[ $prev == --parameters ]]; then tr -d '\\n' < "${{arg#file://}}" >> "{planned}"; echo >> "{planned}"; fi
  prev="$arg"
done
exec "{real_aws}" "$@"
""")
    (wrapper / "aws").chmod(0o755)
    args = ("--livekit-regions", env["LIVEKIT"], "--engine", "voice", "--llm-backend", "canned", "--whisper-model",
            str(model))
    result = run({**env, "PATH": f"{wrapper}:{env['PATH']}"}, "plan", *DEPLOY_ARGS, *args)
    assert result.rc == 0, result.out
    keys = [{p["ParameterKey"]: p["ParameterValue"] for p in json.loads(line)}.get("WhisperModelKey")
            for line in planned.read_text().splitlines()]
    deployed = run(env, "deploy", *DEPLOY_ARGS, *args)
    assert deployed.rc == 0, deployed.out
    [key] = {w["WhisperModelKey"] for w in _worker_stack_parameters(deployed)}
    assert key.startswith("models/whisper/") and [k for k in keys if k is not None] == [key, key]


@pytest.mark.parametrize("region", ["us-gov-west-1", "ap-southeast-2"])
def test_a_voice_deploy_takes_any_region_name_as_its_bedrock_region(env: dict[str, str], region: str) -> None:
    result = run(env, "deploy", "--dry-run", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], "--engine", "voice",
                 "--llm-model", "m", "--bedrock-region", region)
    assert result.rc == 0, result.out


def test_a_speech_model_whose_file_is_renamed_gets_a_new_key(env: dict[str, str], tmp_path: Path) -> None:
    """The key hashes the files' names with their bytes: a renamed file is another model, whose workers are replaced,
    not an upload beside the old names in a folder the workers already fetched."""
    model = _whisper_model(tmp_path, "model.bin", "config.json", "vocabulary.txt", "tokenizer.json")

    def deployed_key() -> str:
        result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], "--engine", "voice",
                     "--llm-backend", "canned", "--whisper-model", str(model))
        assert result.rc == 0, result.out
        [key] = {w["WhisperModelKey"] for w in _worker_stack_parameters(result)[-2:]}  # this deploy's two
        return key

    first = deployed_key()
    (model / "vocabulary.txt").rename(model / "vocabulary.json")
    assert deployed_key() != first


@pytest.mark.parametrize(("option", "parameter", "value"), [
    ("--llm-model", "LlmModel", "us.amazon.nova-micro-v1:0"),
    ("--llm-model", "LlmModel", "meta-llama/Llama-3.1-8B-Instruct"),
    ("--llm-model", "LlmModel", "my model"),
    ("--llm-model", "LlmModel", "model'"),
    ("--llm-base-url", "LlmBaseUrl", "http://10.0.7.20:8000/v1"),
    ("--llm-base-url", "LlmBaseUrl", "https://llm.internal/v1?x=1"),
    ("--llm-base-url", "LlmBaseUrl", "http://10.0.7.20:8000/v1\\"),
    ("--llm-base-url", "LlmBaseUrl", "http://a b"),
    ("--llm-base-url", "LlmBaseUrl", 'http://a"b'),
    ("--llm-base-url", "LlmBaseUrl", "ftp://10.0.7.20/v1"),
    ("--llm-api-key-secret", "LlmApiKeySecretArn", "arn:aws:secretsmanager:ap-south-1:123456789012:secret:a/b-AbC123"),
    ("--llm-api-key-secret", "LlmApiKeySecretArn", "arn:aws:secretsmanager:ap-south-1:123456789012:secret:a/b"),
    ("--llm-api-key-secret", "LlmApiKeySecretArn", "arn:aws:secretsmanager:ap-south-1:123456789012:secret:a b-AbC123"),
])
def test_deploy_sh_takes_an_llm_value_exactly_when_the_worker_template_does(env: dict[str, str], option: str,
                                                                           parameter: str, value: str) -> None:
    """A value the template's AllowedPattern refuses would fail a change set per stack, after the first stacks were
    deployed; deploy.sh refuses the same values before any AWS call, and takes the others."""
    from cfnlint.decode import cfn_yaml

    pattern = cfn_yaml.load(str(ROOT / "cloudformation" / "gpu-workers.yaml"))["Parameters"][parameter][
        "AllowedPattern"]
    given = {"--llm-model": "m", "--llm-base-url": "http://10.0.7.20:8000/v1", option: value}
    result = run(env, "deploy", "--dry-run", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], "--engine", "voice",
                 "--llm-backend", "openai", *(a for pair in given.items() for a in pair))
    accepted = re.fullmatch(pattern, value) is not None
    assert (result.rc == 0) == accepted, result.out
    assert accepted or f"{option}: not" in result.out, result.out



# --- which cfn-lint (QA finding 6) -----------------------------------------------------------------------------


def _venv_with_cfn_lint(tmp_path: Path, version: str) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    lint = venv / "bin" / "cfn-lint"
    lint.write_text(FAKE_CFN_LINT.replace('echo "cfn-lint"$', 'echo "venv-cfn-lint"$').replace(
        "${FAKE_CFN_LINT_VERSION:-1.58.0}", version))
    lint.chmod(0o755)
    return venv


def test_validate_prefers_the_venvs_cfn_lint_to_an_older_one_on_path(env: dict[str, str], tmp_path: Path) -> None:
    """Regression: the venv had cfn-lint 1.58 (pyproject pins >= 1.56), but the one on PATH, 1.51, stopped
    `./deploy.sh validate` as too old."""
    venv = _venv_with_cfn_lint(tmp_path, "1.58.0")
    result = run({**env, "GPU_FLEET_VENV": str(venv)}, "validate", extra_env={"FAKE_CFN_LINT_VERSION": "1.51.0"})
    assert result.rc == 0, result.out
    assert f"cfn-lint 1.58.0: {venv}/bin/cfn-lint" in result.out  # says which one it used
    assert [c[0] for c in result.calls] == ["venv-cfn-lint"], "PATH's cfn-lint linted"


def test_without_a_venv_cfn_lint_the_one_on_path_lints_and_is_named(env: dict[str, str], tmp_path: Path) -> None:
    result = run(env, "validate")
    assert result.rc == 0, result.out
    assert f"cfn-lint 1.58.0: {tmp_path}/bin/cfn-lint" in result.out
    too_old = run(env, "validate", extra_env={"FAKE_CFN_LINT_VERSION": "1.51.0"})
    assert too_old.rc != 0 and f"this one is {tmp_path}/bin/cfn-lint" in too_old.out, too_old.out


def test_the_venv_deploy_sh_uses_by_default_is_the_projects(env: dict[str, str]) -> None:
    """`make install` puts the project's venv in .venv beside deploy.sh: without GPU_FLEET_VENV, that one lints."""
    if not os.access(ROOT / ".venv" / "bin" / "cfn-lint", os.X_OK):
        pytest.skip("no .venv with cfn-lint beside deploy.sh (make install)")
    without = {k: v for k, v in env.items() if k != "GPU_FLEET_VENV"}
    result = run(without, "validate", extra_env={"FAKE_CFN_LINT_VERSION": "1.51.0"})
    assert result.rc == 0, result.out
    assert f": {ROOT}/.venv/bin/cfn-lint" in result.out and result.aws("cfn-lint") == [], result.out


def test_cors_origins_reach_the_hub_stack_and_a_redeploy_without_the_flag_keeps_them(env: dict[str, str],
                                                                                      tmp_path: Path) -> None:
    """A re-deploy that forgot --cors-origins must not shut every browser client out; `none` clears them."""
    state = tmp_path / "stacks"
    state.mkdir()

    def hub_origins(*args: str) -> str:
        Path(env["FAKE_LOG"]).unlink(missing_ok=True)
        result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], *args,
                     extra_env={"FAKE_STATE_DIR": str(state)})
        assert result.rc == 0, result.out
        [hub] = [_parameters(call) for stack, _, call in _stack_calls(result, "cloudformation", "deploy")
                 if stack == "gpu-fleet-prod-hub"]
        return hub["CorsOrigins"]

    assert hub_origins() == ""  # a first deployment: none
    origins = "https://app.example.com,http://localhost:5173"
    assert hub_origins("--cors-origins", origins) == origins
    assert hub_origins() == origins
    assert hub_origins("--cors-origins", "none") == ""


@pytest.mark.parametrize("value", ["https://app.example.com/", "*", "app.example.com",
                                   "https://app.example.com, https://b.example.com"])
def test_cors_origins_the_hub_stack_would_refuse_are_refused_before_any_aws_call(env: dict[str, str],
                                                                                 value: str) -> None:
    from cfnlint.decode import cfn_yaml

    pattern = cfn_yaml.load(str(ROOT / "cloudformation" / "hub.yaml"))["Parameters"]["CorsOrigins"]["AllowedPattern"]
    assert re.fullmatch(pattern, value) is None
    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], "--cors-origins", value)
    assert result.rc != 0 and "--cors-origins: not origins" in result.out, result.out
    assert not result.aws("cloudformation") and not result.aws("s3")


def test_help_prints_the_whole_usage_and_nothing_of_the_script(env: dict[str, str]) -> None:
    result = run(env, "--help")
    assert result.rc == 0, result.out
    lines = result.out.strip().splitlines()
    assert lines[0].startswith("Deploys gpu-fleet") and lines[-1].endswith("instead of running it.")
    assert "--cors-origins" in result.out and "set -euo" not in result.out


def test_a_dry_run_without_engine_options_shows_the_openai_servers_key_kept_too(env: dict[str, str]) -> None:
    """The plan says every engine parameter is kept as deployed; an empty key ARN there would read as "the key is
    dropped"."""
    dry = run(env, "deploy", "--dry-run", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"])
    assert dry.rc == 0, dry.out
    for parameter in ENGINE_PARAMETERS:
        assert f"{parameter}=\\<gpu-fleet-prod-gpu-workers.{parameter}\\>" in dry.out, (parameter, dry.out)


def test_an_api_key_given_instead_of_its_secrets_arn_is_refused_without_being_shown(env: dict[str, str]) -> None:
    """Pasting the key itself into --llm-api-key-secret is an easy slip: the refusal must not print the key back
    into the terminal's scrollback or a CI log."""
    key = "sk-proj-Abc123SecretValue"
    result = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], "--engine", "voice",
                 "--llm-backend", "openai", "--llm-model", "m", "--llm-base-url", "https://api.openai.com/v1",
                 "--llm-api-key-secret", key)
    assert result.rc != 0 and "--llm-api-key-secret: not the full ARN" in result.out, result.out
    assert key not in result.out and "Abc123Secret" not in result.out, result.out
    assert not result.aws("cloudformation") and not result.aws("s3")


def test_a_plan_names_the_cfn_lint_it_lints_with_once(env: dict[str, str], tmp_path: Path) -> None:
    """A plan checks cfn-lint before it lints and again before the deploy it plans: one line says which it is."""
    result = run(env, "plan", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"])
    assert result.rc == 0, result.out
    assert result.out.count(f"cfn-lint 1.58.0: {tmp_path}/bin/cfn-lint") == 1, result.out


def test_a_failed_lookup_of_the_deployed_cors_origins_stops_the_deploy_before_any_change(env: dict[str, str],
                                                                                      tmp_path: Path) -> None:
    """Passing CorsOrigins="" after a lookup that failed would shut every browser client out."""
    state = tmp_path / "stacks"
    state.mkdir()
    refused = run(env, "deploy", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"], "--engine", "synthetic",
                  extra_env={"FAKE_STATE_DIR": str(state), "FAKE_PARAMETERS_FAIL": "1"})
    assert refused.rc != 0 and "cannot read the CorsOrigins of gpu-fleet-prod-hub" in refused.out, refused.out
    assert not refused.aws("cloudformation", "deploy") and not refused.aws("s3")
    dry = run(env, "deploy", "--dry-run", *DEPLOY_ARGS, "--livekit-regions", env["LIVEKIT"])
    assert "CorsOrigins=\\<gpu-fleet-prod-hub.CorsOrigins\\>" in dry.out, dry.out
