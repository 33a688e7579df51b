"""The CloudFormation templates: cfn-lint clean (no error, no warning) and the properties the deployment relies on."""

from __future__ import annotations

import http.server
import ipaddress
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.validate import ParamValidator
from cfnlint.api import ManualArgs, lint_file
from cfnlint.decode import cfn_yaml

from tests.fakes import serving

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "cloudformation"
NAMES = ["network", "secrets", "redis", "hub", "gpu-workers"]
LINT_REGIONS = ["us-east-1", "eu-west-1", "ap-southeast-1"]


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = cfn_yaml.load(str(TEMPLATES / f"{name}.yaml"))
    return data


def resources(template: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in template["Resources"].values() if r["Type"] == kind]


def one(template: dict[str, Any], kind: str) -> dict[str, Any]:
    found = resources(template, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_every_template_is_there() -> None:
    assert sorted(p.stem for p in TEMPLATES.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_cfn_lint_reports_nothing(name: str) -> None:
    matches = lint_file(TEMPLATES / f"{name}.yaml", config=ManualArgs(regions=LINT_REGIONS))
    assert [str(m) for m in matches] == []


def test_the_linter_does_report_warnings(tmp_path: Path) -> None:
    """Guards the test above: the configuration used does surface warnings, not only errors."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("AWSTemplateFormatVersion: '2010-09-09'\nParameters:\n  Unused:\n    Type: String\n"
                   "Resources:\n  Topic:\n    Type: AWS::SNS::Topic\n")
    rules = {m.rule.id for m in lint_file(bad, config=ManualArgs(regions=LINT_REGIONS))}
    assert "W2001" in rules  # unused parameter


@pytest.mark.parametrize("name", NAMES)
def test_standalone_with_parameters_and_exported_outputs(name: str) -> None:
    template = load(name)
    assert "EnvName" in template["Parameters"]
    assert template["Outputs"]
    assert any("Export" in out for out in template["Outputs"].values())


@pytest.mark.parametrize("name", NAMES)
def test_no_secret_is_a_parameter(name: str) -> None:
    for pname in load(name)["Parameters"]:
        lowered = pname.lower()
        if "secret" in lowered:
            assert lowered.endswith("arn"), f"{name}:{pname} must be an ARN, never the secret"
        assert not any(w in lowered for w in ("password", "token", "apikey")) or lowered.endswith("arn")


def test_network_spans_three_azs_with_nat_and_endpoints() -> None:
    t = load("network")
    subnets = resources(t, "AWS::EC2::Subnet")
    assert len(subnets) == 9  # public, private, and the hubs' (home region only) in each AZ
    assert {s["Properties"]["AvailabilityZone"]["Fn::Select"][0] for s in subnets} == {0, 1, 2}
    assert len(resources(t, "AWS::EC2::NatGateway")) == 3
    services = {e["Properties"]["ServiceName"]["Fn::Sub"].rsplit(".", 1)[1]
                for e in resources(t, "AWS::EC2::VPCEndpoint")}
    assert {"s3", "secretsmanager", "monitoring", "ssm"} <= services
    gateway = [e for e in resources(t, "AWS::EC2::VPCEndpoint") if e["Properties"]["VpcEndpointType"] == "Gateway"]
    assert len(gateway) == 1


def test_regional_networks_request_a_peering_with_the_hubs_vpc() -> None:
    t = load("network")
    peering = one(t, "AWS::EC2::VPCPeeringConnection")
    assert peering["Condition"] == "Peered"
    assert peering["Properties"]["PeerVpcId"] == {"Ref": "PeerVpcId"}
    assert t["Parameters"]["PeerVpcId"]["Default"] == ""


def test_secrets_are_generated() -> None:
    secrets = resources(load("secrets"), "AWS::SecretsManager::Secret")
    assert len(secrets) == 5
    for s in secrets:
        assert "GenerateSecretString" in s["Properties"]
        assert "SecretString" not in s["Properties"]


def test_redis_is_clustered_multi_az_encrypted_with_a_resolved_auth_token() -> None:
    props = one(load("redis"), "AWS::ElastiCache::ReplicationGroup")["Properties"]
    assert props["ClusterMode"] == "enabled"
    assert props["AutomaticFailoverEnabled"] is True
    assert props["MultiAZEnabled"] is True
    assert props["TransitEncryptionEnabled"] is True
    assert props["AtRestEncryptionEnabled"] is True
    assert props["AuthToken"]["Fn::Sub"].startswith("{{resolve:secretsmanager:")
    assert props["CacheParameterGroupName"].endswith("cluster.on")


def test_hub_group_alb_dns_and_cloudfront() -> None:
    t = load("hub")
    asg = one(t, "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    assert t["Parameters"]["MinSize"]["MinValue"] >= 2
    assert "Fn::Split" in asg["VPCZoneIdentifier"]  # the three private subnets
    tg = one(t, "AWS::ElasticLoadBalancingV2::TargetGroup")["Properties"]
    assert tg["HealthCheckPath"] == "/ready"  # see test_hub_health_check_survives_a_redis_failover
    assert tg["Port"] == 8080
    listeners = [r["Properties"] for r in resources(t, "AWS::ElasticLoadBalancingV2::Listener")]
    https = [lst for lst in listeners if lst["Protocol"] == "HTTPS"]
    assert https and https[0]["Certificates"][0]["CertificateArn"] == {"Ref": "CertificateArn"}
    records = resources(t, "AWS::Route53::RecordSet")
    assert any(r["Properties"]["Name"] == {"Ref": "DomainName"} and "AliasTarget" in r["Properties"]
               for r in records)
    dist = one(t, "AWS::CloudFront::Distribution")
    assert dist["Condition"] == "UseCloudFront"
    policy = one(t, "AWS::CloudFront::OriginRequestPolicy")["Properties"]["OriginRequestPolicyConfig"]
    assert {"CloudFront-Viewer-Latitude", "CloudFront-Viewer-Longitude", "CloudFront-Viewer-Address"} <= set(
        policy["HeadersConfig"]["Headers"])


def test_behind_cloudfront_only_cloudfront_reaches_the_alb_and_hubs_believe_its_viewer_address() -> None:
    t = load("hub")
    only_cf, open_rules = t["Resources"]["AlbSecurityGroup"]["Properties"]["SecurityGroupIngress"]["Fn::If"][1:]
    assert t["Resources"]["AlbSecurityGroup"]["Properties"]["SecurityGroupIngress"]["Fn::If"][0] == "OnlyCloudFront"
    assert only_cf == [{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443,
                        "SourcePrefixListId": {"Ref": "CloudFrontPrefixListId"},
                        "Description": "HTTPS from CloudFront only"}]
    assert {r.get("CidrIp") for r in open_rules} == {"0.0.0.0/0"}
    data = one(t, "AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]
    script, variables = data["UserData"]["Fn::Base64"]["Fn::Sub"]
    # The header is believed only where the ALB admits nothing but CloudFront.
    assert variables["ClientAddressHeader"] == {"Fn::If": ["OnlyCloudFront", "CloudFront-Viewer-Address", ""]}
    assert 'env["FLEET_CLIENT_ADDRESS_HEADER"] = "${ClientAddressHeader}"' in script
    # The prefix list admits every distribution: only what carries our distribution's secret header is forwarded.
    resolved = {"Fn::Sub": "{{resolve:secretsmanager:${EnvName}/gpu-fleet/origin-verify:SecretString}}"}
    forward = [{"Type": "forward", "TargetGroupArn": {"Ref": "TargetGroup"}}]
    assert t["Resources"]["HttpsListener"]["Properties"]["DefaultActions"] == forward  # without CloudFront: all
    gate, refuse = t["Resources"]["ThroughOurDistributionOnly"], t["Resources"]["RefuseAnythingElseBehindCloudFront"]
    assert gate["Condition"] == refuse["Condition"] == "OnlyCloudFront"
    assert 1 < gate["Properties"]["Priority"] < refuse["Properties"]["Priority"]  # after /metrics' 404
    assert gate["Properties"]["Conditions"] == [{"Field": "http-header", "HttpHeaderConfig": {
        "HttpHeaderName": "X-Origin-Verify", "Values": [resolved]}}] and gate["Properties"]["Actions"] == forward
    assert refuse["Properties"]["Conditions"] == [{"Field": "path-pattern", "PathPatternConfig": {"Values": ["*"]}}]
    assert refuse["Properties"]["Actions"][0]["FixedResponseConfig"]["StatusCode"] == "403"
    # Regression: the listener refused everything before the distribution sent the header (a release-long outage).
    assert gate["DependsOn"] == "Distribution"
    assert set(refuse["DependsOn"]) == {"Distribution", "ThroughOurDistributionOnly"}
    origin = one(t, "AWS::CloudFront::Distribution")["Properties"]["DistributionConfig"]["Origins"][0]
    assert origin["OriginCustomHeaders"]["Fn::If"][:2] == [
        "OnlyCloudFront", [{"HeaderName": "X-Origin-Verify", "HeaderValue": resolved}]]
    secret_names = [s["Properties"]["Name"] for s in resources(load("secrets"), "AWS::SecretsManager::Secret")]
    assert {"Fn::Sub": "${EnvName}/gpu-fleet/origin-verify"} in secret_names


def test_hub_user_data_runs_the_wheel_in_prod_with_secrets_from_secrets_manager() -> None:
    t = load("hub")
    data = one(t, "AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]
    script = data["UserData"]["Fn::Base64"]["Fn::Sub"][0]
    assert "fleet hub --host 0.0.0.0 --port 8080" in script
    assert '"FLEET_ENV": "prod"' in script
    assert "rediss+cluster://" in script
    assert "get_secret_value" in script
    assert "${ArtifactKey}" in script
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    # Every worker group's region gets capacity datapoints, so a group at zero scales out.
    assert '"FLEET_CLOUDWATCH_WORKER_REGIONS": json.dumps([r for r in "${WorkerRegionList}".split(",") if r])' in script
    variables = data["UserData"]["Fn::Base64"]["Fn::Sub"][1]
    assert variables["WorkerRegionList"] == {"Fn::Join": [",", {"Ref": "WorkerRegions"}]}


def _statements(template: dict[str, Any]) -> list[dict[str, Any]]:
    role = one(template, "AWS::IAM::Role")["Properties"]
    return [s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]]


def test_hub_role_is_least_privilege() -> None:
    stmts = {s["Sid"]: s for s in _statements(load("hub"))}
    assert stmts["CapacityMetrics"]["Action"] == "cloudwatch:PutMetricData"
    assert stmts["CapacityMetrics"]["Condition"] == {"StringEquals": {"cloudwatch:namespace":
                                                                      {"Ref": "CloudWatchNamespace"}}}
    assert stmts["Secrets"]["Action"] == "secretsmanager:GetSecretValue"
    assert "*" not in str(stmts["Secrets"]["Resource"])
    assert stmts["Artifact"]["Action"] == "s3:GetObject"
    assert stmts["Artifact"]["Resource"] == {"Fn::Sub": "arn:${AWS::Partition}:s3:::${ArtifactBucket}/${ArtifactKey}"}
    for s in stmts.values():
        assert "*" not in str(s["Action"])


@pytest.mark.parametrize("stack", ["hub", "gpu-workers"])
def test_an_instance_may_open_a_session_manager_shell_and_read_no_parameter(stack: str) -> None:
    """AmazonSSMManagedInstanceCore let every hub and GPU worker read every SSM parameter of the account; the role
    now holds Session Manager's own actions only, and the instance metadata answers no container on the host."""
    template = load(stack)
    role = one(template, "AWS::IAM::Role")["Properties"]
    assert "ManagedPolicyArns" not in role
    shell = {s["Sid"]: s for s in _statements(template) if "Sid" in s}["SessionManagerShell"]
    # All that Session Manager needs of an instance (without one of the channels, an SRE's shell never opens).
    assert sorted(shell["Action"]) == ["ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel",
                                       "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel",
                                       "ssmmessages:OpenDataChannel"]
    assert shell["Effect"] == "Allow" and shell["Resource"] == "*"  # as AWS's own policy grants them
    metadata = one(template, "AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]["MetadataOptions"]
    assert metadata["HttpTokens"] == "required" and metadata["HttpPutResponseHopLimit"] == 1


def test_worker_group_mixes_spot_and_on_demand_with_rebalance_hook_and_warm_pool() -> None:
    t = load("gpu-workers")
    asg = one(t, "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    mixed = asg["MixedInstancesPolicy"]["Fn::If"][1]
    types = [o["InstanceType"] for o in mixed["LaunchTemplate"]["Overrides"]]
    assert types == ["g5.xlarge", "g5.2xlarge", "g4dn.2xlarge"]
    assert mixed["InstancesDistribution"]["OnDemandBaseCapacity"] == {"Ref": "OnDemandBaseCapacity"}
    assert mixed["InstancesDistribution"]["OnDemandPercentageAboveBaseCapacity"] == 0
    assert asg["CapacityRebalance"] == {"Fn::If": ["UseSpotMix", True, False]}
    hooks = asg["LifecycleHookSpecificationList"]
    assert [h["LifecycleTransition"] for h in hooks] == ["autoscaling:EC2_INSTANCE_TERMINATING",
                                                         "autoscaling:EC2_INSTANCE_LAUNCHING"]
    warm = one(t, "AWS::AutoScaling::WarmPool")
    assert warm["Condition"] == "UseWarmPool"
    assert t["Parameters"]["ImageId"]["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"
    assert t["Parameters"]["ImageId"]["Default"].startswith("/aws/service/deeplearning/")


def test_worker_scaling_tracks_the_free_slot_ratio_of_its_region() -> None:
    policy = one(load("gpu-workers"), "AWS::AutoScaling::ScalingPolicy")["Properties"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    metrics = policy["TargetTrackingConfiguration"]["CustomizedMetricSpecification"]["Metrics"]
    stat = next(m for m in metrics if "MetricStat" in m)["MetricStat"]["Metric"]
    assert stat["Namespace"] == {"Ref": "MetricNamespace"}
    assert stat["MetricName"] == "FreeSlotRatio"
    assert stat["Dimensions"] == [{"Name": "Region", "Value": {"Ref": "AWS::Region"}}]
    assert [m["Expression"] for m in metrics if m.get("ReturnData")] == ["1 - free"]


def test_worker_role_is_scoped_to_its_own_group() -> None:
    stmts = {s["Sid"]: s for s in _statements(load("gpu-workers")) if "Sid" in s}  # the rest: conditional
    lifecycle = stmts["OwnGroupLifecycle"]
    assert sorted(lifecycle["Action"]) == ["autoscaling:CompleteLifecycleAction", "autoscaling:SetInstanceProtection"]
    assert lifecycle["Resource"]["Fn::Sub"].endswith("autoScalingGroupName/${EnvName}-fleet-workers-${AWS::Region}")
    assert stmts["WorkerToken"]["Resource"] == {"Ref": "WorkerTokenSecretArn"}
    assert stmts["Artifact"]["Action"] == "s3:GetObject"


def test_worker_user_data_sets_the_worker_environment() -> None:
    t = load("gpu-workers")
    script = one(t, "AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"]
    for var in ("FLEET_HUB_URLS", "FLEET_WORKER_TOKEN", "FLEET_REGION", "FLEET_ENGINE", "FLEET_LIFECYCLE_HOOK_NAME",
                "FLEET_AUTOSCALING_GROUP", "FLEET_PROTECT_FROM_SCALE_IN", "FLEET_ENV"):
        assert f'"{var}"' in script
    assert '"FLEET_PORT": "8000"' in script
    assert "ExecStart=/opt/fleet/bin/fleet worker" in script
    # The worker's HTTP server does not run as root; only the step that writes its environment file does.
    assert "\nUser=fleet\n" in script and "ExecStartPre=+/opt/fleet/bin/python /opt/fleet/worker-env.py" in script
    asg = one(t, "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    hook = asg["LifecycleHookSpecificationList"][0]["LifecycleHookName"]["Fn::Sub"]
    assert f'"FLEET_LIFECYCLE_HOOK_NAME": "{hook}"' in script
    assert f'"FLEET_AUTOSCALING_GROUP": "{asg["AutoScalingGroupName"]["Fn::Sub"]}"' in script


def test_hub_health_check_survives_a_redis_failover() -> None:
    """The ALB sends traffic only to hubs that reach Redis (/ready), but that check must not be the ASG's: a long
    Redis failover would mark every hub unhealthy and replace them all at once. The ASG replaces an instance that
    fails EC2's checks; systemd restarts a hub process that dies."""
    t = load("hub")
    asg = one(t, "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    assert asg["HealthCheckType"] == "EC2"
    tg = one(t, "AWS::ElasticLoadBalancingV2::TargetGroup")["Properties"]
    assert tg["HealthCheckPath"] == "/ready"
    ops = (ROOT / "hub" / "api" / "ops.py").read_text()
    ready = ops.split('@router.get("/ready"')[1].split("@router")[0]
    assert "ping" in ready and "503" in ready  # the route really asks Redis, and says why it is not ready
    script = one(t, "AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"][
        "Fn::Sub"][0]
    unit = script.split("fleet-hub.service <<'UNIT'")[1].split("UNIT")[0]
    assert "Restart=always" in unit.splitlines() and "RestartSec=2" in unit.splitlines()


def test_the_public_load_balancer_never_serves_metrics() -> None:
    """/metrics has no auth: the HTTPS listener answers it with a 404 before any forward, and only an optional
    scraper CIDR reaches the hubs' port directly."""
    t = load("hub")
    rule = t["Resources"]["MetricsStayInside"]["Properties"]
    assert rule["ListenerArn"] == {"Ref": "HttpsListener"} and rule["Priority"] == 1  # before any forward
    paths = {"Values": ["/metrics", "/metrics/*"]}
    assert rule["Conditions"] == [{"Field": "path-pattern", "PathPatternConfig": paths}]
    assert [a["Type"] for a in rule["Actions"]] == ["fixed-response"]
    assert rule["Actions"][0]["FixedResponseConfig"]["StatusCode"] == "404"
    scraper = t["Resources"]["MetricsScraperToHubs"]
    assert scraper["Condition"] == "HasMetricsScraper" and scraper["Properties"]["FromPort"] == 8080
    assert t["Parameters"]["MetricsScraperCidr"]["Default"] == ""


def test_a_release_does_not_reset_the_hub_group_size() -> None:
    asg = one(load("hub"), "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    assert "DesiredCapacity" not in asg
    assert asg["MinSize"] == {"Ref": "MinSize"}


def _assert(expr: Any, params: dict[str, str]) -> Any:
    """The value of a rule assertion (Fn::Not, Fn::Equals, Ref) for ``params``."""
    if not isinstance(expr, dict):
        return expr
    [(name, arg)] = expr.items()
    if name == "Ref":
        return params[arg]
    if name == "Fn::Not":
        return not _assert(arg[0], params)
    if name == "Fn::And":
        return all(_assert(a, params) for a in arg)
    if name == "Fn::Equals":
        return _assert(arg[0], params) == _assert(arg[1], params)
    raise AssertionError(f"cannot evaluate {name}")


def test_a_hub_group_whose_min_size_is_its_max_size_is_refused_before_a_release_fails() -> None:
    """The rolling update keeps MinSize hubs in service, and CloudFormation fails it ("MinInstancesInService must be
    less than the autoscaling group's MaxSize") when MinSize equals MaxSize, which the parameters allowed: every
    release of such a stack failed. A rule refuses it when the stack is created or updated."""
    t = load("hub")
    update = one(t, "AWS::AutoScaling::AutoScalingGroup")["UpdatePolicy"]["AutoScalingRollingUpdate"]
    assert update["MinInstancesInService"] == {"Ref": "MinSize"}
    assertions = [a["Assert"] for rule in t.get("Rules", {}).values() for a in rule["Assertions"]]

    def accepted(min_size: str, max_size: str) -> bool:
        return all(_assert(a, {"MinSize": min_size, "MaxSize": max_size}) for a in assertions)

    assert not accepted("2", "2") and not accepted("4", "4")
    assert accepted("2", "6") and accepted(str(t["Parameters"]["MinSize"]["Default"]),
                                           str(t["Parameters"]["MaxSize"]["Default"]))


def test_redis_admits_only_the_hubs_security_group() -> None:
    redis, hub = load("redis"), load("hub")
    group = one(redis, "AWS::EC2::SecurityGroup")["Properties"]
    assert "SecurityGroupIngress" not in group
    assert "CidrIp" not in str(redis["Resources"])
    assert resources(redis, "AWS::EC2::SecurityGroupIngress") == []
    export = redis["Outputs"]["SecurityGroupId"]
    assert export["Value"] == {"Ref": "SecurityGroup"}
    assert export["Export"]["Name"] == {"Fn::Sub": "${EnvName}-redis-SecurityGroupId"}
    [rule] = [r["Properties"] for r in resources(hub, "AWS::EC2::SecurityGroupIngress")
              if r["Properties"]["GroupId"] == {"Fn::ImportValue": {"Fn::Sub": "${EnvName}-redis-SecurityGroupId"}}]
    hub_group = next(name for name, r in hub["Resources"].items() if r["Type"] == "AWS::EC2::SecurityGroup"
                     and "Hubs" in r["Properties"]["GroupDescription"])
    assert rule["SourceSecurityGroupId"] == {"Ref": hub_group}
    assert one(hub, "AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]["SecurityGroupIds"] == [
        {"Ref": hub_group}]
    port = {"Fn::ImportValue": {"Fn::Sub": "${EnvName}-redis-Port"}}
    assert rule["FromPort"] == port and rule["ToPort"] == port
    assert "CidrIp" not in rule


def test_workers_only_run_an_engine_the_stack_can_configure() -> None:
    engine = load("gpu-workers")["Parameters"]["Engine"]
    assert engine["AllowedValues"] == ["synthetic", "voice"]
    assert engine["Default"] == "synthetic"


def _voice_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **parameters: str) -> dict[str, str]:
    """The environment worker-env.py writes for ``parameters``, also set in this process."""
    proc, env_file, secrets = _run_worker_env(tmp_path, {"autoscaling/target-lifecycle-state": (200, "InService")},
                                              **parameters)
    assert proc.returncode == 0, proc.stderr
    assert secrets == [SUB_VALUES["WorkerTokenSecretArn"]]  # the worker token, and no LiveKit secret
    env = {name: quoted.strip("'") for name, quoted in
           (line.split("=", 1) for line in env_file.read_text().splitlines())}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_a_deployed_voice_worker_talks_to_clients_through_livekit_and_replies_with_bedrock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers sit in private subnets, where no client reaches an audio WebSocket: a voice worker joins each
    session's LiveKit room and announces no audio URL. The environment worker-env.py writes is one the worker's
    own settings accept in prod, without the LiveKit secret it no longer needs; Bedrock runs in the workers'
    region unless BedrockRegion names another."""
    from worker.settings import WorkerSettings
    from worker.voice.engine import VoiceEngine
    from worker.voice.settings import VoiceSettings

    env = _voice_env(tmp_path, monkeypatch, Engine="voice", LlmModel="us.amazon.nova-micro-v1:0")
    assert "FLEET_VOICE_LLM_BASE_URL" not in env and not any("LIVEKIT_API" in name for name in env)
    worker, voice = WorkerSettings(), VoiceSettings()
    assert worker.env == "prod" and worker.engine == "voice" and voice.env == "prod"
    assert not voice.client_websocket and voice.livekit_transport
    assert (voice.llm_backend, voice.llm_model, voice.bedrock_region) == ("bedrock", "us.amazon.nova-micro-v1:0",
                                                                          SUB_VALUES["AWS::Region"])
    assert VoiceEngine.from_settings(worker).client_audio_path is None
    (tmp_path / "other").mkdir()
    other = _voice_env(tmp_path / "other", monkeypatch, Engine="voice", LlmModel="m", BedrockRegion="us-west-2")
    assert other["FLEET_VOICE_BEDROCK_REGION"] == "us-west-2"


def test_a_deployed_voice_worker_can_take_its_replies_from_an_openai_compatible_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.voice.settings import VoiceSettings

    _voice_env(tmp_path, monkeypatch, Engine="voice", LlmBackend="openai", LlmModel="llama3.1:8b",
               LlmBaseUrl="http://10.0.7.20:8000/v1")
    voice = VoiceSettings()
    assert (voice.llm_backend, voice.llm_model, voice.llm_base_url) == ("openai", "llama3.1:8b",
                                                                        "http://10.0.7.20:8000/v1")


LLM_KEY_ARN = "arn:aws:secretsmanager:ap-south-1:123456789012:secret:llm/api-key-AbC123"


def test_a_deployed_voice_worker_sends_its_openai_server_the_key_held_in_a_secret(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key never is a stack parameter: worker-env.py reads it from the secret, in the secret's own region (here
    neither the workers' nor the home region), at every start, without the newline a pasted key often ends with."""
    from worker.voice.llm import build_llm
    from worker.voice.settings import VoiceSettings

    proc, env_file, secrets = _run_worker_env(
        tmp_path, {"autoscaling/target-lifecycle-state": (200, "InService")}, {LLM_KEY_ARN: "sk-live-0123\n"},
        Engine="voice", LlmBackend="openai", LlmModel="gpt-4o-mini", LlmBaseUrl="https://api.openai.com/v1",
        LlmApiKeySecretArn=LLM_KEY_ARN)
    assert proc.returncode == 0, proc.stderr
    assert secrets == [SUB_VALUES["WorkerTokenSecretArn"], LLM_KEY_ARN]
    for line in env_file.read_text().splitlines():
        name, quoted = line.split("=", 1)
        monkeypatch.setenv(name, quoted.strip("'"))
    voice = VoiceSettings()
    assert voice.llm_api_key is not None and voice.llm_api_key.get_secret_value() == "sk-live-0123"
    assert build_llm(voice).api_key == "sk-live-0123"  # type: ignore[attr-defined]


def test_a_key_the_worker_env_cannot_hold_fails_the_start_without_showing_it(tmp_path: Path) -> None:
    proc, env_file, _ = _run_worker_env(
        tmp_path, {"autoscaling/target-lifecycle-state": (200, "InService")}, {LLM_KEY_ARN: "sk-it's-0123"},
        Engine="voice", LlmBackend="openai", LlmModel="m", LlmBaseUrl="http://10.0.7.20:8000/v1",
        LlmApiKeySecretArn=LLM_KEY_ARN)
    assert proc.returncode != 0 and "FLEET_VOICE_LLM_API_KEY: one line without a single quote" in proc.stderr
    assert "sk-it" not in proc.stderr + proc.stdout
    assert not env_file.exists() or "sk-it" not in env_file.read_text()


def test_a_key_secret_is_read_only_by_a_voice_worker_replying_from_an_openai_server(tmp_path: Path) -> None:
    """The stack's rule refuses such a combination; should one get through, worker-env.py still reads no secret it
    does not use (the role may not read it either, below)."""
    proc, env_file, secrets = _run_worker_env(
        tmp_path, {"autoscaling/target-lifecycle-state": (200, "InService")}, {LLM_KEY_ARN: "sk-live-0123"},
        Engine="voice", LlmModel="us.amazon.nova-micro-v1:0", LlmApiKeySecretArn=LLM_KEY_ARN)
    assert proc.returncode == 0, proc.stderr
    assert secrets == [SUB_VALUES["WorkerTokenSecretArn"]] and "LLM_API_KEY" not in env_file.read_text()


def test_only_a_voice_worker_with_an_openai_key_may_read_that_secret() -> None:
    t = load("gpu-workers")
    [key] = [s for s in _statements(t) if "Fn::If" in s and s["Fn::If"][0] == "OpenAiKeyFromSecret"]
    condition, statement, otherwise = key["Fn::If"]
    assert otherwise == {"Ref": "AWS::NoValue"}
    assert (statement["Action"], statement["Resource"]) == ("secretsmanager:GetSecretValue",
                                                            {"Ref": "LlmApiKeySecretArn"})
    assert t["Conditions"][condition] == {"Fn::And": [
        {"Condition": "IsVoice"}, {"Fn::Equals": [{"Ref": "LlmBackend"}, "openai"]},
        {"Fn::Not": [{"Fn::Equals": [{"Ref": "LlmApiKeySecretArn"}, ""]}]}]}


def test_a_synthetic_worker_gets_no_voice_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _voice_env(tmp_path, monkeypatch, LlmModel="ignored")
    assert env["FLEET_ENGINE"] == "synthetic" and not any(name.startswith("FLEET_VOICE_") for name in env)


def test_the_voice_engines_replies_need_a_model_and_an_openai_server_a_url() -> None:
    """Rules refuse, when the stack is created or updated, a voice stack whose first reply would fail."""
    t = load("gpu-workers")

    def accepted(**params: str) -> bool:
        values = {"Engine": "voice", "LlmBackend": "bedrock", "LlmModel": "", "LlmBaseUrl": "",
                  "LlmApiKeySecretArn": "", **params}
        return all(_assert(a["Assert"], values) for rule in t["Rules"].values()
                   if _assert(rule["RuleCondition"], values) for a in rule["Assertions"])

    assert not accepted() and accepted(LlmModel="us.amazon.nova-micro-v1:0")
    assert not accepted(LlmBackend="openai", LlmModel="llama3.1:8b")
    assert accepted(LlmBackend="openai", LlmModel="llama3.1:8b", LlmBaseUrl="http://10.0.7.20:8000/v1")
    assert accepted(LlmBackend="canned") and accepted(Engine="synthetic")
    openai = {"LlmBackend": "openai", "LlmModel": "gpt-4o-mini", "LlmBaseUrl": "https://api.openai.com/v1"}
    assert accepted(**openai, LlmApiKeySecretArn=LLM_KEY_ARN)
    assert not accepted(LlmModel="m", LlmApiKeySecretArn=LLM_KEY_ARN)  # a key Bedrock would never use
    assert not accepted(**openai, Engine="synthetic", LlmApiKeySecretArn=LLM_KEY_ARN)


def test_only_a_voice_worker_replying_with_bedrock_may_invoke_its_models() -> None:
    t = load("gpu-workers")
    [bedrock] = [s for s in _statements(t) if "Fn::If" in s and s["Fn::If"][0] == "RepliesFromBedrock"]
    condition, statement, otherwise = bedrock["Fn::If"]
    assert otherwise == {"Ref": "AWS::NoValue"} and statement["Action"] == "bedrock:InvokeModelWithResponseStream"
    conditions = t["Conditions"]
    assert conditions[condition] == {"Fn::And": [{"Condition": "IsVoice"},
                                                 {"Fn::Equals": [{"Ref": "LlmBackend"}, "bedrock"]}]}
    assert conditions["IsVoice"] == {"Fn::Equals": [{"Ref": "Engine"}, "voice"]}


@pytest.mark.parametrize(("engine", "model", "installed"), [
    ("synthetic", "", ".whl"), ("voice", "", ".whl[voice]"),
    ("voice", "models/whisper/large-v3-0123/", ".whl[voice,gpu]"),
    ("synthetic", "models/whisper/large-v3-0123/", ".whl"),
])
def test_a_voice_worker_installs_the_wheel_with_its_voice_extras_and_fetches_its_speech_model(
        tmp_path: Path, engine: str, model: str, installed: str) -> None:
    proc, calls, root = _run_bootstrap(tmp_path, env={"FAKE_TARGET_STATE": "InService"}, Engine=engine,
                                       WhisperModelKey=model)
    assert proc.returncode == 0, proc.stderr
    wheels = [call[-1] for call in calls if call[0] == "pip" and "boto3" not in call]
    assert len(wheels) == 1 and wheels[0].endswith("/opt/fleet/dist/*" + installed), wheels
    fetched = [call for call in calls if call[0] == "python" and call[-1].endswith("fetch-whisper.py")]
    assert fetched == ([["python", f"{root}/opt/fleet/fetch-whisper.py"]] if engine == "voice" and model else [])


FAKE_S3 = '''
import json, os, shutil


class S3:
    def __init__(self):
        self.objects = json.loads(os.environ["FAKE_S3_OBJECTS"])

    def get_paginator(self, name):
        assert name == "list_objects_v2", name
        objects = self.objects

        class Pages:
            def paginate(self, Bucket, Prefix):
                keys = [k for k in objects if k.startswith(Prefix)]
                return [{"Contents": [{"Key": k} for k in keys[:2]]}, {"Contents": [{"Key": k} for k in keys[2:]]}]
        return Pages()

    def download_file(self, bucket, key, path):
        with open(path, "w") as f:
            f.write(self.objects[key])


def client(service, region_name=None):
    assert service == "s3", service
    return S3()
'''

WHISPER_KEY = "models/whisper/large-v3-0123/"


def _fetch_whisper(tmp_path: Path, names: list[str]) -> tuple[subprocess.CompletedProcess[str], Path]:
    """fetch-whisper.py, as the user data writes it, against a fake S3 holding ``names`` in the model folder."""
    into = tmp_path / "models" / "whisper"
    code = _sub(_user_data_file(_worker_script(), "fetch-whisper.py") + "\n", WhisperModelKey=WHISPER_KEY)
    (tmp_path / "fetch-whisper.py").write_text(code.replace("/opt/fleet/models/whisper", str(into)))
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    (fakes / "boto3.py").write_text(FAKE_S3)
    objects = {WHISPER_KEY + name: f"bytes of {name}" for name in names}
    objects["models/whisper/other-model/model.bin"] = "another model's"
    proc = subprocess.run([sys.executable, str(tmp_path / "fetch-whisper.py")], capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": f"{fakes}:{ROOT}", "FAKE_S3_OBJECTS": json.dumps(objects)})
    return proc, into


def test_the_speech_model_is_fetched_whole_into_the_folder_the_worker_reads(tmp_path: Path) -> None:
    names = ["model.bin", "config.json", "vocabulary.json", "tokenizer.json", "../../outside", "sub/extra.txt",
             "marker/"]
    proc, into = _fetch_whisper(tmp_path, names)
    assert proc.returncode == 0, proc.stderr
    got = sorted(str(p.relative_to(into)) for p in into.rglob("*") if p.is_file())
    assert got == ["config.json", "model.bin", "sub/extra.txt", "tokenizer.json", "vocabulary.json"]
    assert (into / "model.bin").read_text() == "bytes of model.bin"  # this model's, not the other one's
    assert not (tmp_path / "outside").exists()


def test_a_speech_model_that_lacks_a_file_fails_the_bootstrap_naming_it(tmp_path: Path) -> None:
    """faster-whisper would fail at every start of the worker; the launch is abandoned instead, with the reason."""
    proc, _ = _fetch_whisper(tmp_path, ["model.bin", "config.json", "vocabulary.txt"])
    assert proc.returncode != 0
    assert "lacks tokenizer.json" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_voice_worker_with_a_speech_model_transcribes_with_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.voice.settings import VoiceSettings
    from worker.voice.stt import WhisperSTT, build_stt

    env = _voice_env(tmp_path, monkeypatch, Engine="voice", LlmBackend="canned", WhisperModelKey=WHISPER_KEY)
    assert env["FLEET_VOICE_WHISPER_MODEL_DIR"] == "/opt/fleet/models/whisper"
    assert isinstance(build_stt(VoiceSettings()), WhisperSTT)


def test_only_a_worker_with_a_speech_model_may_read_it_and_nothing_else_of_the_bucket() -> None:
    t = load("gpu-workers")
    conditional = {s["Fn::If"][1]["Sid"]: s["Fn::If"] for s in _statements(t) if "Fn::If" in s}
    model, listing = conditional["WhisperModel"], conditional["WhisperModelListing"]
    assert model[0] == listing[0] == "WhisperFromArtifacts" and model[2] == listing[2] == {"Ref": "AWS::NoValue"}
    assert model[1]["Action"] == "s3:GetObject"
    assert model[1]["Resource"] == {"Fn::Sub": "arn:${AWS::Partition}:s3:::${ArtifactBucket}/${WhisperModelKey}*"}
    assert listing[1]["Action"] == "s3:ListBucket"
    assert listing[1]["Condition"] == {"StringLike": {"s3:prefix": {"Fn::Sub": "${WhisperModelKey}*"}}}
    assert t["Conditions"]["WhisperFromArtifacts"] == {"Fn::And": [
        {"Condition": "IsVoice"}, {"Fn::Not": [{"Fn::Equals": [{"Ref": "WhisperModelKey"}, ""]}]}]}


def test_a_voice_worker_may_stream_replies_from_any_model_and_inference_profile_in_any_region() -> None:
    """A cross-region inference profile such as us.amazon.nova-micro-v1:0 runs its model in another region than its
    own: the worker needs both the profile and the models, wherever they are, or its first reply is AccessDenied."""
    [bedrock] = [s["Fn::If"][1] for s in _statements(load("gpu-workers"))
                 if "Fn::If" in s and s["Fn::If"][1]["Sid"] == "BedrockReplies"]
    assert bedrock["Resource"] == [
        {"Fn::Sub": "arn:${AWS::Partition}:bedrock:*::foundation-model/*"},
        {"Fn::Sub": "arn:${AWS::Partition}:bedrock:*:${AWS::AccountId}:inference-profile/*"}]


def test_the_speech_models_folder_is_listed_on_the_bucket_itself() -> None:
    """s3:ListBucket is granted on the bucket's ARN, not on its objects': on any other resource the bootstrap's
    listing of the model folder is refused, and every launch of a voice worker with a speech model is abandoned."""
    [listing] = [s["Fn::If"][1] for s in _statements(load("gpu-workers"))
                 if "Fn::If" in s and s["Fn::If"][1]["Sid"] == "WhisperModelListing"]
    assert listing["Resource"] == {"Fn::Sub": "arn:${AWS::Partition}:s3:::${ArtifactBucket}"}


@pytest.mark.parametrize(("parameter", "value", "allowed"), [
    ("LlmModel", "us.amazon.nova-micro-v1:0", True),
    ("LlmModel", "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3", True),
    ("LlmModel", "llama3.1:8b", True),
    ("LlmModel", "it's", False),
    ("LlmBaseUrl", "http://10.0.7.20:8000/v1", True),
    ("LlmBaseUrl", "https://llm.internal.example.com/v1", True),
    ("LlmBaseUrl", "http://10.0.7.20:8000/v1'", False),
    ("LlmBaseUrl", 'http://10.0.7.20:8000/v1"', False),
    ("LlmBaseUrl", "http://10.0.7.20:8000/v1\\", False),
    ("LlmBaseUrl", "http://10.0.7.20:8000/v1 x", False),
    ("LlmBaseUrl", "ftp://10.0.7.20/v1", False),
    ("BedrockRegion", "us-west-2", True),
    ("BedrockRegion", "us-gov-west-1", True),
    ("BedrockRegion", "mars", False),
    ("WhisperModelKey", "models/whisper/whisper-large-v3-0123456789abcdef/", True),
    ("WhisperModelKey", "models/whisper/whisper large v3/", False),
    ("LlmApiKeySecretArn", "", True),
    ("LlmApiKeySecretArn", "arn:aws:secretsmanager:ap-south-1:123456789012:secret:llm/api-key-AbC123", True),
    ("LlmApiKeySecretArn", "arn:aws-us-gov:secretsmanager:us-gov-west-1:123456789012:secret:k-AbC123", True),
    ("LlmApiKeySecretArn", "arn:aws:secretsmanager:ap-south-1:123456789012:secret:llm/api-key", False),
    ("LlmApiKeySecretArn", "arn:aws:secretsmanager:ap-south-1:123456789012:secret:k'-AbC123", False),
    ("LlmApiKeySecretArn", "sk-live-0123", False),
])
def test_the_voice_parameters_take_real_ids_and_urls_and_nothing_that_would_break_the_worker_env(
        parameter: str, value: str, allowed: bool) -> None:
    """The parameters land in worker-env.py's Python strings and in the single-quoted worker.env: a quote or a
    backslash there would fail every start of the worker, so the stack refuses them when it is created or updated."""
    pattern = load("gpu-workers")["Parameters"][parameter]["AllowedPattern"]
    assert (re.fullmatch(pattern, value) is not None) == allowed


def test_a_key_that_would_land_beside_the_speech_models_folder_is_not_fetched(tmp_path: Path) -> None:
    """A folder whose name merely starts like the model's (``whisper-old``) is outside it, too."""
    proc, into = _fetch_whisper(tmp_path, ["model.bin", "config.json", "vocabulary.json", "tokenizer.json",
                                           "../whisper-old/model.bin"])
    assert proc.returncode == 0, proc.stderr
    assert not (into.parent / "whisper-old").exists()


def test_a_voice_worker_without_a_speech_model_transcribes_with_pocketsphinx(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Pointed at a model folder the bootstrap never filled, the worker would fail every start on the missing model."""
    from worker.voice.settings import VoiceSettings
    from worker.voice.stt import WhisperSTT, build_stt

    env = _voice_env(tmp_path, monkeypatch, Engine="voice", LlmBackend="canned")
    assert "FLEET_VOICE_WHISPER_MODEL_DIR" not in env
    assert not isinstance(build_stt(VoiceSettings()), WhisperSTT)


def test_worker_group_has_a_launch_hook_that_abandons_by_default() -> None:
    t = load("gpu-workers")
    asg = one(t, "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    [hook] = [h for h in asg["LifecycleHookSpecificationList"]
              if h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_LAUNCHING"]
    assert hook["DefaultResult"] == "ABANDON"
    assert hook["HeartbeatTimeout"] >= 900  # apt (with its 300 s lock wait), venv, pip
    # The instance role may complete it: CompleteLifecycleAction is scoped to this very group.
    lifecycle = {s["Sid"]: s for s in _statements(t) if "Sid" in s}["OwnGroupLifecycle"]
    assert "autoscaling:CompleteLifecycleAction" in lifecycle["Action"]
    assert lifecycle["Resource"]["Fn::Sub"].endswith("autoScalingGroupName/" + asg["AutoScalingGroupName"]["Fn::Sub"])


def _worker_script() -> str:
    script: str = one(load("gpu-workers"), "AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"][
        "UserData"]["Fn::Base64"]["Fn::Sub"]
    return script


def test_worker_unit_comes_back_after_a_standby_and_apt_waits_for_the_lock() -> None:
    """Regression: Restart=on-failure never restarted the worker that drained (exit 0) for a Standby, so the instance
    came back InService without a worker. worker-env.py, not the unit, keeps a leaving instance from registering."""
    script = _worker_script()
    unit = script[script.index("cat > /etc/systemd/system/fleet-worker.service"):]
    unit = unit[:unit.index("UNIT\n", unit.index("[Install]"))]
    assert "\nRestart=always\n" in unit and "Restart=on-failure" not in unit
    assert re.search(r"\nRestartSec=([1-9]\d*)\n", unit)
    # The refusals while in Standby must not run into systemd's start limit and leave the unit failed for good.
    assert "\nStartLimitIntervalSec=0\n" in unit[:unit.index("[Service]")]
    assert "ExecStartPre=+/opt/fleet/bin/python /opt/fleet/worker-env.py" in unit
    apt = [line.strip() for line in script.splitlines() if re.match(r"\s*apt-get\b", line)]
    assert apt and all("-o DPkg::Lock::Timeout=300" in line for line in apt), apt
    # add-apt-repository would run its own `apt-get update` without the timeout.
    assert all("--no-update" in line for line in script.splitlines() if "add-apt-repository" in line)


def test_every_imds_call_of_the_user_data_is_bounded_in_time() -> None:
    """Regression: curl to IMDS had no timeout, so a wedged metadata service hung the bootstrap until the hook's
    timeout instead of failing it (and retrying a blip first)."""
    commands = _worker_script().replace("\\\n", " ").splitlines()  # continued lines joined
    calls = [line.strip() for line in commands if re.search(r"(^|\$\()\s*curl\b", line.strip())]
    assert len(calls) == 4, calls
    for call in calls:
        assert re.search(r"--max-time [1-9]\b", call) and re.search(r"--retry [1-9]\b", call), call


# --- worker-env.py, the ExecStartPre of every (re)start, against a fake IMDS and a fake boto3 ------------------

FAKE_BOTO3 = '''
import json
import os


class SecretsManager:
    def __init__(self, region_name):
        self.region_name = region_name

    def get_secret_value(self, SecretId):
        # As the service: a secret is read from its own region's endpoint.
        assert self.region_name == SecretId.split(":")[3], (self.region_name, SecretId)
        with open(os.environ["FAKE_BOTO3_LOG"], "a") as log:
            log.write(SecretId + "\\n")
        held = json.loads(os.environ.get("FAKE_SECRETS", "{}"))
        return {"SecretString": held.get(SecretId, "a-worker-token-of-more-than-32-chars")}


def client(service, region_name=None):
    assert service == "secretsmanager", service
    return SecretsManager(region_name)
'''


def _worker_env_script(**parameters: str) -> str:
    return _sub(_user_data_file(_worker_script(), "worker-env.py") + "\n", **parameters)


def _run_worker_env(tmp_path: Path, metadata: dict[str, tuple[int, str]], secrets: dict[str, str] | None = None,
                    **parameters: str) -> tuple[subprocess.CompletedProcess[str], Path, list[str]]:
    """worker-env.py with IMDS answering ``metadata`` (path under meta-data/ → status, body; else 404), Secrets
    Manager holding ``secrets`` (by ARN; any other is the worker token), for the stack
    parameters of SUB_VALUES updated with ``parameters``."""
    import http.server
    import sys

    class Imds(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            self._answer((200, "TOKEN") if self.path == "/latest/api/token" else (404, ""))

        def do_GET(self) -> None:
            if self.headers.get("X-aws-ec2-metadata-token") != "TOKEN":
                self._answer((401, ""))
                return
            self._answer(metadata.get(self.path.removeprefix("/latest/meta-data/"), (404, "")))

        def _answer(self, answer: tuple[int, str]) -> None:
            self.send_response(answer[0])
            self.send_header("Content-Length", str(len(answer[1])))
            self.end_headers()
            self.wfile.write(answer[1].encode())

        def log_message(self, *args: object) -> None:
            pass

    fakes = tmp_path / "fakes"
    fakes.mkdir()
    (fakes / "boto3.py").write_text(FAKE_BOTO3)
    run = tmp_path / "run"
    with serving(Imds) as imds:
        text = _worker_env_script(**parameters).replace("http://169.254.169.254", imds)
        (tmp_path / "worker-env.py").write_text(text.replace("/run/fleet", str(run)))
        log = tmp_path / "secrets-read"
        proc = subprocess.run([sys.executable, str(tmp_path / "worker-env.py")], capture_output=True, text=True,
                              timeout=30, env={"PYTHONPATH": str(fakes), "FAKE_BOTO3_LOG": str(log),
                                               "FAKE_SECRETS": json.dumps(secrets or {})})
    return proc, run / "worker.env", log.read_text().splitlines() if log.exists() else []


def test_worker_env_starts_the_worker_of_an_instance_in_service(tmp_path: Path) -> None:
    proc, env_file, secrets = _run_worker_env(tmp_path, {"autoscaling/target-lifecycle-state": (200, "InService")})
    assert proc.returncode == 0, proc.stderr
    assert "FLEET_WORKER_TOKEN='a-worker-token-of-more-than-32-chars'" in env_file.read_text()
    assert secrets == [SUB_VALUES["WorkerTokenSecretArn"]]
    assert env_file.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("metadata", "said"), [
    ({"autoscaling/target-lifecycle-state": (200, "Standby")}, "Standby"),
    ({"autoscaling/target-lifecycle-state": (200, "Terminated")}, "Terminated"),
    ({"autoscaling/target-lifecycle-state": (200, "Detached")}, "Detached"),
    ({"autoscaling/target-lifecycle-state": (200, "InService"),
      "spot/instance-action": (200, '{"action": "terminate", "time": "2026-11-23T08:22:00Z"}')}, "spot"),
    ({"autoscaling/target-lifecycle-state": (500, "")}, "target-lifecycle-state"),
], ids=["standby", "terminating", "detached", "spot-notice", "imds-failing"])
def test_worker_env_refuses_a_restart_on_an_instance_that_is_leaving_or_unknown(
        tmp_path: Path, metadata: dict[str, tuple[int, str]], said: str) -> None:
    """With Restart=always the worker that drained is started again: on an instance that is leaving (or whose state
    cannot be read) it must not register, only fail this start and let systemd try again later."""
    proc, env_file, secrets = _run_worker_env(tmp_path, metadata)
    assert proc.returncode != 0
    assert not env_file.exists() and secrets == []
    assert said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- The worker user data, run against fake commands (aws, curl, systemctl, apt, python3.11) -------------------

SUB_VALUES = {"AWS::Region": "eu-west-1", "EnvName": "prod", "HomeRegion": "us-east-1", "Engine": "synthetic",
              "LlmBackend": "bedrock", "LlmModel": "", "LlmBaseUrl": "", "LlmApiKeySecretArn": "",
              "BedrockRegion": "", "WhisperModelKey": "",
              "HubUrl": "https://fleet.example.com", "ArtifactBucket": "bucket",
              "ArtifactKey": "artifacts/prod/0123/gpu_fleet-0.1.0-py3-none-any.whl",
              "WorkerTokenSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/gpu-fleet/wt"}
BASH = shutil.which("bash") or "/bin/bash"
INSTANCE_ID = "i-0123456789abcdef0"

FAKES = {
    "aws": """[[ -z "${FAKE_AWS_FAIL:-}" ]] || exit 254""",
    "systemctl": """[[ "$1 $2" != "${FAKE_SYSTEMCTL_FAIL:-}" ]] || exit 1""",
    "curl": f"""case "${{@: -1}}" in
  */latest/api/token) echo TOKEN ;;
  */meta-data/instance-id) echo {INSTANCE_ID} ;;
  */meta-data/autoscaling/target-lifecycle-state)
    [[ -n "${{FAKE_TARGET_STATE:-}}" ]] || exit 22
    echo "$FAKE_TARGET_STATE" ;;
  *) exit 22 ;;
esac""",
    # The venv's pip and python are copies of the two fakes below.
    "python3.11": """[[ "$1 $2" != "-m venv" ]] || { mkdir -p "$3/bin"; cp "${0%/*}"/{pip,python} "$3/bin/"; }""",
    "pip": """[[ -z "${FAKE_PIP_FAIL:-}" ]]""",
    "python": "cat > /dev/null",  # reads its heredoc, downloads nothing
    "apt-get": "", "add-apt-repository": "", "sleep": "",
}


def _sub(script: str, **parameters: str) -> str:
    """What Fn::Sub makes of the script for the stack parameters of SUB_VALUES updated with ``parameters``:
    ${Param} replaced, ${!literal} unescaped; an unknown name fails."""
    values = {**SUB_VALUES, **parameters}
    return re.sub(r"\$\{(!?)([^}]+)\}", lambda m: "${" + m[2] + "}" if m[1] else values[m[2]], script)


def _run_bootstrap(tmp_path: Path, *, script: str | None = None, aws: bool = True, env: dict[str, str],
                   **parameters: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]], Path]:
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    text = _sub(script if script is not None else _worker_script(), **parameters)
    for path in ("/opt/fleet", "/etc/systemd/system", "/var/lib/fleet"):
        text = text.replace(path, f"{root}{path}")
    (tmp_path / "user-data.sh").write_text(text)
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    for name, body in FAKES.items():
        if name == "aws" and not aws:
            continue
        (fakes / name).write_text(f"#!{BASH}\n(IFS=$'\\x1f'; echo \"{name}\"$'\\x1f'\"$*\") >> \"$FAKE_LOG\"\n{body}\n")
        (fakes / name).chmod(0o755)
    tools = tmp_path / "tools"  # only these real commands: no real aws, curl or systemctl can be reached
    tools.mkdir()
    for tool in ("mkdir", "cat", "chmod", "touch", "rm", "cp"):
        found = shutil.which(tool)
        assert found
        (tools / tool).symlink_to(found)
    log = tmp_path / "calls"
    proc = subprocess.run([BASH, str(tmp_path / "user-data.sh")], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{fakes}:{tools}", "FAKE_LOG": str(log), **env})
    calls = [line.split("\x1f") for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls, root


def _hook_completions(calls: list[list[str]]) -> list[str]:
    """The lifecycle-action results the script sent, after checking each targets this instance's launch hook."""
    template = load("gpu-workers")
    asg = one(template, "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    [hook] = [h for h in asg["LifecycleHookSpecificationList"]
              if h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_LAUNCHING"]
    results = []
    for call in calls:
        if call[:3] != ["aws", "autoscaling", "complete-lifecycle-action"]:
            continue
        arg = dict(zip(call[3::2], call[4::2], strict=True))
        assert arg["--lifecycle-hook-name"] == _sub(hook["LifecycleHookName"]["Fn::Sub"])
        assert arg["--auto-scaling-group-name"] == _sub(asg["AutoScalingGroupName"]["Fn::Sub"])
        assert arg["--instance-id"] == INSTANCE_ID
        assert arg["--region"] == "eu-west-1"
        results.append(arg["--lifecycle-action-result"])
    return results


def test_worker_bootstrap_completes_the_launch_hook_after_starting_the_worker(tmp_path: Path) -> None:
    proc, calls, root = _run_bootstrap(tmp_path, env={"FAKE_TARGET_STATE": "InService"})
    assert proc.returncode == 0, proc.stderr
    assert _hook_completions(calls) == ["CONTINUE"]
    names = [c[0] if c[0] != "systemctl" else " ".join(c[:3]) for c in calls]
    assert names.index("systemctl start fleet-worker.service") < names.index("aws")
    assert names.index("pip") < names.index("aws")
    unit = (root / "etc/systemd/system/fleet-worker.service").read_text()
    assert "Restart=always" in unit
    assert not (root / "var/lib/fleet/warmed").exists()


def test_worker_bootstrap_into_the_warm_pool_completes_the_hook_at_both_launches(tmp_path: Path) -> None:
    proc, calls, root = _run_bootstrap(tmp_path, env={"FAKE_TARGET_STATE": "Warmed:Stopped"})
    assert proc.returncode == 0, proc.stderr
    assert _hook_completions(calls) == ["CONTINUE"]
    assert ["systemctl", "start", "fleet-worker.service"] not in calls  # the instance is about to be stopped
    enabled = [c for c in calls if c[:2] == ["systemctl", "enable"]]
    assert enabled and {"fleet-launch-hook.service", "fleet-worker.service"} <= set(enabled[0])
    marker = root / "var/lib/fleet/warmed"
    assert marker.exists()
    # Leaving the warm pool the hook pauses the instance again and user data does not rerun: the unit completes it.
    unit = (root / "etc/systemd/system/fleet-launch-hook.service").read_text()
    assert f"ConditionPathExists={marker}" in unit
    assert "Before=fleet-worker.service" in unit
    exec_start = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart="))
    (tmp_path / "calls").unlink()
    path = f"{tmp_path / 'fakes'}:{tmp_path / 'tools'}"
    again = subprocess.run(exec_start.split(), capture_output=True, text=True, timeout=30,
                           env={"PATH": path, "FAKE_LOG": str(tmp_path / "calls")})
    assert again.returncode == 0, again.stderr
    assert _hook_completions([line.split("\x1f") for line in (tmp_path / "calls").read_text().splitlines()]) == [
        "CONTINUE"]


@pytest.mark.parametrize("failure", [{"FAKE_PIP_FAIL": "1"}, {"FAKE_SYSTEMCTL_FAIL": "start fleet-worker.service"}],
                         ids=["pip", "worker-start"])
def test_a_failed_worker_bootstrap_abandons_the_launch(tmp_path: Path, failure: dict[str, str]) -> None:
    proc, calls, _ = _run_bootstrap(tmp_path, env={"FAKE_TARGET_STATE": "InService", **failure})
    assert proc.returncode != 0
    assert _hook_completions(calls) == ["ABANDON"]
    assert "bootstrap failed" in proc.stderr


def test_worker_bootstrap_without_an_aws_cli_fails_clearly(tmp_path: Path) -> None:
    proc, calls, _ = _run_bootstrap(tmp_path, aws=False, env={"FAKE_TARGET_STATE": "InService"})
    assert proc.returncode != 0
    assert "aws CLI" in proc.stderr
    assert not [c for c in calls if c[0] in ("apt-get", "pip", "systemctl")]


def test_the_bootstrap_harness_does_see_a_script_that_never_completes_the_hook(tmp_path: Path) -> None:
    """Guards the tests above: a script that installs and starts the worker but has no hook call is caught."""
    script = _worker_script()
    cut = script[:script.index("/opt/fleet/launch-hook.sh CONTINUE\ntrap - ERR")]
    proc, calls, _ = _run_bootstrap(tmp_path, script=cut, env={"FAKE_TARGET_STATE": "InService"})
    assert proc.returncode == 0, proc.stderr
    assert ["systemctl", "start", "fleet-worker.service"] in calls
    assert _hook_completions(calls) == []


# --- Review findings on the AWS deployment ----------------------------------------------------------------------

def test_secrets_survive_a_destroy_and_a_replacement() -> None:
    """CloudFormation deletes a secret without any recovery window: the tokens and LiveKit keys would be gone for
    good with `deploy.sh destroy` (or a replacement). docs/deploy.md says how to delete them on purpose."""
    for secret in resources(load("secrets"), "AWS::SecretsManager::Secret"):
        assert secret.get("DeletionPolicy") == "Retain"
        assert secret.get("UpdateReplacePolicy") == "Retain"


def test_a_release_replaces_the_warm_pool_workers_too() -> None:
    """AutoScalingRollingUpdate replaces InService instances only: stopped warm-pool workers stayed on the old
    wheel. An instance refresh replaces the warm pool too; skip matching keeps an unchanged deploy a no-op."""
    t = load("gpu-workers")
    asg = one(t, "AWS::AutoScaling::AutoScalingGroup")
    assert one(t, "AWS::AutoScaling::WarmPool")["Properties"]["AutoScalingGroupName"] == {"Ref": "AutoScalingGroup"}
    policy = asg["UpdatePolicy"]
    assert "AutoScalingRollingUpdate" not in policy
    refresh = policy["AutoScalingInstanceRefresh"]
    assert refresh["Strategy"] == "Rolling"
    preferences = refresh["Preferences"]
    assert preferences["SkipMatching"] is True
    # Busy workers protect themselves from scale-in: waiting for that would fail the refresh (and the stack update);
    # replacing them goes through the drain lifecycle hook, as the rolling update did.
    assert preferences["ScaleInProtectedInstances"] == "Refresh"
    model = botocore.session.get_session().get_service_model("autoscaling")
    report = ParamValidator().validate({"AutoScalingGroupName": "g", "Preferences": dict(preferences)},
                                       model.operation_model("StartInstanceRefresh").input_shape)
    assert not report.has_errors(), report.generate_report()


def test_the_domain_is_one_record_whose_target_follows_cloudfront() -> None:
    """Two records for one name (one per CloudFront condition) made turning CloudFront on or off fail: the new one
    is created before the old one is deleted, and Route 53 refuses the duplicate."""
    t = load("hub")
    [record] = [r for r in resources(t, "AWS::Route53::RecordSet") if r["Properties"]["Name"] == {"Ref": "DomainName"}]
    assert "Condition" not in record
    alias = record["Properties"]["AliasTarget"]
    assert alias["DNSName"] == {"Fn::If": ["UseCloudFront", {"Fn::GetAtt": ["Distribution", "DomainName"]},
                                           {"Fn::GetAtt": ["LoadBalancer", "DNSName"]}]}
    assert alias["HostedZoneId"] == {"Fn::If": ["UseCloudFront", "Z2FDTNDATAQYW2",
                                                {"Fn::GetAtt": ["LoadBalancer", "CanonicalHostedZoneID"]}]}


def _evaluate(expr: Any, params: dict[str, str]) -> Any:
    """The value of the few intrinsic functions network.yaml uses for its subnets (Ref, Select, Cidr, GetAZs)."""
    if not isinstance(expr, dict):
        return expr
    [(name, arg)] = expr.items()
    if name == "Ref":
        return params[arg]
    if name == "Fn::GetAZs":
        return ["az-a", "az-b", "az-c"]
    if name == "Fn::Select":
        return _evaluate(arg[1], params)[_evaluate(arg[0], params)]
    if name == "Fn::Cidr":
        block, count, bits = (_evaluate(a, params) for a in arg)
        network = ipaddress.ip_network(block)
        return [str(s) for s in network.subnets(new_prefix=32 - bits)][:count]
    raise AssertionError(f"cannot evaluate {name}")


def test_only_the_hubs_live_in_the_cidr_that_remote_workers_admit() -> None:
    """Remote workers admitted the whole home VPC on port 8000, where the home region's workers live too (and hold
    the worker token). The hubs now have their own subnets inside one block, HubCidr, that nothing else uses."""
    t = load("network")
    params = {"VpcCidr": t["Parameters"]["VpcCidr"]["Default"]}
    subnets = {name: r for name, r in t["Resources"].items() if r["Type"] == "AWS::EC2::Subnet"}
    cidrs = {name: ipaddress.IPv4Network(_evaluate(r["Properties"]["CidrBlock"], params))
             for name, r in subnets.items()}
    outputs = t["Outputs"]
    hub_cidr = ipaddress.IPv4Network(_evaluate(outputs["HubCidr"]["Value"], params))
    assert outputs["HubCidr"]["Export"]["Name"] == {"Fn::Sub": "${EnvName}-network-HubCidr"}
    hubs = [ref["Ref"] for ref in outputs["HubSubnetIds"]["Value"]["Fn::Join"][1]]
    assert len(hubs) == 3
    assert {_evaluate(subnets[h]["Properties"]["AvailabilityZone"], params) for h in hubs} == {"az-a", "az-b", "az-c"}
    for name, cidr in cidrs.items():
        assert cidr.subnet_of(ipaddress.IPv4Network(params["VpcCidr"]))
        assert cidr.subnet_of(hub_cidr) if name in hubs else not cidr.overlaps(hub_cidr), name
        assert not any(cidr.overlaps(other) for o, other in cidrs.items() if o != name), name
    # Only in the home region (no peer), where the hubs run.
    home = {"Fn::Equals": [{"Ref": "PeerVpcId"}, ""]}
    assert all(t["Conditions"][subnets[h]["Condition"]] == home for h in hubs)
    assert t["Conditions"][outputs["HubCidr"]["Condition"]] == home
    # Routed like the other private subnets, so the peering routes deploy.sh adds reach the hubs.
    private_tables = [ref["Ref"] for ref in outputs["PrivateRouteTableIds"]["Value"]["Fn::Join"][1]]
    associations = {r["Properties"]["SubnetId"]["Ref"]: r["Properties"]["RouteTableId"]["Ref"]
                    for r in resources(t, "AWS::EC2::SubnetRouteTableAssociation")}
    assert sorted(associations[h] for h in hubs) == sorted(private_tables)
    # The hub group runs in those subnets and nowhere else.
    hub_asg = one(load("hub"), "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    assert hub_asg["VPCZoneIdentifier"] == {"Fn::Split": [",", {"Fn::ImportValue": {
        "Fn::Sub": outputs["HubSubnetIds"]["Export"]["Name"]["Fn::Sub"]}}]}


@pytest.mark.parametrize("cors_origins", ["", "https://app.example.com,http://localhost:5173"])
def test_the_hub_env_script_writes_settings_the_hub_reads_whatever_the_redis_token_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cors_origins: str) -> None:
    """hub-env.py, as the hub's UserData writes it, run against a fake Secrets Manager. Regression: the Redis AUTH
    token went into the URL unencoded, so a rotated token with '#' or '?' (ElastiCache allows both) made another
    URL of it and the hub crash-looped, logging part of the token."""
    from redis.asyncio.connection import parse_url

    from hub.settings import HubSettings

    script = one(load("hub"), "AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]["UserData"]
    text = script["Fn::Base64"]["Fn::Sub"][0]
    code = _user_data_file(text, "hub-env.py")
    token = "Tok3n#with?odd/chars:and@more" + "x" * 16
    secrets = {"arn:redis": token, "arn:worker": "w" * 40, "arn:admin": "a" * 40,
               "arn:livekit": json.dumps({"api_key": "APIkey", "api_secret": "s" * 40})}
    values = {"AWS::Region": "us-east-1", "LiveKitArn": "arn:livekit", "RedisArn": "arn:redis",
              "WorkerArn": "arn:worker", "AdminArn": "arn:admin", "RedisHost": "clustercfg.example.cache.amazonaws.com",
              "RedisPort": "6379", "VpcCidr": "10.0.0.0/16", "CloudWatchNamespace": "GpuFleet",
              "WorkerRegionList": "us-east-1,eu-central-1", "ClientAddressHeader": "", "CorsOrigins": cors_origins}
    code = re.sub(r"\$\{([^}]+)\}", lambda m: values[m.group(1)], code)
    regions_file, run_dir = tmp_path / "regions.json", tmp_path / "run"
    regions_file.write_text(json.dumps([{"region": "us-east-1", "url": "wss://lk.example.com", "lat": 38.9,
                                         "lon": -77.4}]))
    code = code.replace("/etc/fleet-livekit-regions.json", str(regions_file)).replace("/run/fleet", str(run_dir))
    (tmp_path / "hub-env.py").write_text(code)
    fake = tmp_path / "fake" / "boto3"  # a Secrets Manager that answers from FAKE_SECRETS
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import json, os, types\n"
        "def client(*args, **kwargs):\n"
        "    secrets = json.loads(os.environ['FAKE_SECRETS'])\n"
        "    return types.SimpleNamespace(get_secret_value=lambda SecretId: {'SecretString': secrets[SecretId]})\n")
    subprocess.run([sys.executable, str(tmp_path / "hub-env.py")], check=True, timeout=30,
                   env={"PYTHONPATH": str(fake.parent), "FAKE_SECRETS": json.dumps(secrets)})

    assert (run_dir / "hub.env").stat().st_mode & 0o777 == 0o600  # the secrets: root only
    env = dict(line.split("=", 1) for line in (run_dir / "hub.env").read_text().splitlines())
    for name, quoted in env.items():
        monkeypatch.setenv(name, quoted.strip("'"))
    settings = HubSettings()  # what the hub reads at start, in prod
    assert settings.redis_url is not None
    parsed = parse_url(settings.redis_url.replace("+cluster://", "://"))
    assert parsed["password"] == token and parsed["host"] == values["RedisHost"] and parsed["port"] == 6379
    assert settings.cors_origins == [origin for origin in cors_origins.split(",") if origin]


@pytest.mark.parametrize(("value", "allowed"), [
    ("", True), ("https://app.example.com", True), ("https://app.example.com,http://localhost:5173", True),
    ("https://app.example.com/", False), ("*", False), ("https://app.example.com, http://localhost:5173", False),
    ("https://app.example.com'", False),
])
def test_the_hub_stack_takes_cors_origins_the_hub_takes(value: str, allowed: bool) -> None:
    """What the parameter allows lands in hub-env.py's strings and FLEET_CORS_ORIGINS: a value the hub refuses
    would stop every hub at start."""
    from hub.settings import HubSettings

    pattern = load("hub")["Parameters"]["CorsOrigins"]["AllowedPattern"]
    assert (re.fullmatch(pattern, value) is not None) == allowed
    if allowed:
        origins = [origin for origin in value.split(",") if origin]
        assert HubSettings(cors_origins=origins).cors_origins == origins  # taken, not refused


def test_a_release_replaces_a_hub_only_once_the_new_one_answers_ready_and_rolls_back_if_it_never_does() -> None:
    """Without signals, a release whose hubs never became ready replaced every hub, one per pause: an outage."""
    t = load("hub")
    [(name, asg)] = [(n, r) for n, r in t["Resources"].items() if r["Type"] == "AWS::AutoScaling::AutoScalingGroup"]
    update = asg["UpdatePolicy"]["AutoScalingRollingUpdate"]
    assert update["WaitOnResourceSignals"] is True and update["MaxBatchSize"] == 1
    assert asg["CreationPolicy"]["ResourceSignal"]["Count"] == {"Ref": "MinSize"}
    script = _user_data_file(_hub_script(), "hub-ready.py")
    assert f'LogicalResourceId="{name}"' in script and 'StackName="${AWS::StackName}"' in script
    deadline_s = int(re.search(r"DEADLINE_S = (\d+)", script).group(1))  # type: ignore[union-attr]
    for timeout in (update["PauseTime"], asg["CreationPolicy"]["ResourceSignal"]["Timeout"]):
        minutes = re.fullmatch(r"PT(\d+)M", timeout)
        assert minutes and int(minutes.group(1)) * 60 > deadline_s + 120  # the hub's own verdict comes first
    assert _hub_script().rstrip().endswith("/opt/fleet/bin/python /opt/fleet/hub-ready.py")
    stmts = {s["Sid"]: s for s in _statements(t)}
    assert stmts["ReadySignal"]["Action"] == "cloudformation:SignalResource"
    assert stmts["ReadySignal"]["Resource"] == {"Ref": "AWS::StackId"}


def _user_data_file(script: str, name: str) -> str:
    """The text of the file ``name`` that user data ``script`` writes with a ``<<'PY'`` heredoc."""
    return script.split(f"{name} <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]


class _HubAndImds(http.server.BaseHTTPRequestHandler):
    """A hub that answers /ready with 503 ``not_ready`` times, then 200; and IMDSv2, for the instance id."""

    not_ready = 0

    def do_PUT(self) -> None:
        self._answer(200, b"imds-token" if self.path == "/latest/api/token" else b"")

    def do_GET(self) -> None:
        if self.path == "/latest/meta-data/instance-id":
            ok = self.headers.get("X-aws-ec2-metadata-token") == "imds-token"
            self._answer(200 if ok else 401, b"i-0123456789abcdef0")
        elif self.path == "/ready":
            type(self).not_ready -= 1
            self._answer(503 if type(self).not_ready >= 0 else 200, b"")
        else:
            self._answer(404, b"")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("not_ready", "refused", "status", "rc"), [
    (2, False, "SUCCESS", 0),  # ready after a few tries
    (10**6, False, "FAILURE", 1),  # never ready: the release fails now, not at its timeout
    (0, True, "SUCCESS", 0),  # launched by scaling: no one waits for its signal
])
def test_the_ready_script_signals_what_the_new_hub_answers(tmp_path: Path, not_ready: int, refused: bool,
                                                           status: str, rc: int) -> None:
    _HubAndImds.not_ready = not_ready
    with serving(_HubAndImds) as local:
        code = _user_data_file(_hub_script(), "hub-ready.py")
        values = {"AWS::Region": "eu-west-1", "AWS::StackName": "gpu-fleet-prod-hub"}
        code = re.sub(r"\$\{([^}]+)\}", lambda m: values[m.group(1)], code)
        code = (code.replace("http://127.0.0.1:8080", local).replace("http://169.254.169.254", local)
                .replace("DEADLINE_S = 600", "DEADLINE_S = 1").replace("time.sleep(2)", "time.sleep(0.02)"))
        (tmp_path / "hub-ready.py").write_text(code)
        fake = tmp_path / "fake" / "boto3"  # CloudFormation, recording signals; refusing them with FAKE_REFUSE
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text(
            "import json, os, types\n"
            "from botocore.exceptions import ClientError\n"
            "def client(service, region_name):\n"
            "    def signal_resource(**call):\n"
            "        with open(os.environ['FAKE_SIGNALS'], 'a') as f:\n"
            "            f.write(json.dumps({'service': service, 'region': region_name, **call}) + '\\n')\n"
            "        if os.environ.get('FAKE_REFUSE'):\n"
            "            raise ClientError({'Error': {'Code': 'ValidationError', 'Message': 'not waiting'}},\n"
            "                              'SignalResource')\n"
            "    return types.SimpleNamespace(signal_resource=signal_resource)\n")
        signals = tmp_path / "signals.jsonl"
        ran = subprocess.run([sys.executable, str(tmp_path / "hub-ready.py")], timeout=30, capture_output=True,
                             text=True, env={"PYTHONPATH": str(fake.parent), "FAKE_SIGNALS": str(signals),
                                             **({"FAKE_REFUSE": "1"} if refused else {})})
    assert ran.returncode == rc, ran.stdout + ran.stderr
    assert [json.loads(line) for line in signals.read_text().splitlines()] == [
        {"service": "cloudformation", "region": "eu-west-1", "StackName": "gpu-fleet-prod-hub",
         "LogicalResourceId": "AutoScalingGroup", "UniqueId": "i-0123456789abcdef0", "Status": status}]
    assert ("nothing waits for this instance" in ran.stdout) is refused


def _hub_script() -> str:
    script: str = one(load("hub"), "AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]["UserData"][
        "Fn::Base64"]["Fn::Sub"][0]
    return script


def _unit(script: str, name: str) -> list[str]:
    """The lines of the systemd unit the script writes to /etc/systemd/system/``name``."""
    body = script.split(f"cat > /etc/systemd/system/{name} <<'UNIT'\n", 1)[1]
    return body[:body.index("UNIT\n")].splitlines()


def test_hubs_admit_only_the_load_balancer_on_their_port() -> None:
    """The hubs trust the ALB's X-Forwarded-For and serve /metrics without auth: nothing else may reach port 8080
    (but the optional scraper CIDR, see test_the_public_load_balancer_never_serves_metrics)."""
    t = load("hub")
    rules = t["Resources"]["HubSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert rules == [{"IpProtocol": "tcp", "FromPort": 8080, "ToPort": 8080,
                      "SourceSecurityGroupId": {"Ref": "AlbSecurityGroup"}, "Description": "ALB to hubs"}]
    assert one(t, "AWS::ElasticLoadBalancingV2::TargetGroup")["Properties"]["Port"] == rules[0]["FromPort"]
    assert "ExecStart=/opt/fleet/bin/fleet hub --host 0.0.0.0 --port 8080" in _unit(_hub_script(), "fleet-hub.service")


def test_the_load_balancer_is_public_speaks_only_modern_tls_and_redirects_plain_http() -> None:
    t = load("hub")
    alb = one(t, "AWS::ElasticLoadBalancingV2::LoadBalancer")["Properties"]
    assert alb["Scheme"] == "internet-facing"
    public = {"Fn::ImportValue": {"Fn::Sub": "${EnvName}-network-PublicSubnetIds"}}
    assert alb["Subnets"] == {"Fn::Split": [",", public]}
    assert {"Key": "routing.http.drop_invalid_header_fields.enabled", "Value": "true"} in alb["LoadBalancerAttributes"]
    https = t["Resources"]["HttpsListener"]["Properties"]
    assert https["Protocol"] == "HTTPS" and https["Port"] == 443
    assert https["SslPolicy"].startswith("ELBSecurityPolicy-TLS13-1-2-")  # TLS 1.2 and 1.3 only
    http = t["Resources"]["HttpListener"]["Properties"]
    assert http["Port"] == 80
    assert http["DefaultActions"] == [{"Type": "redirect", "RedirectConfig": {"Protocol": "HTTPS", "Port": "443",
                                                                             "StatusCode": "HTTP_301"}}]


def test_cloudfront_speaks_https_to_viewers_and_to_the_origin_record_the_stack_creates() -> None:
    t = load("hub")
    config = one(t, "AWS::CloudFront::Distribution")["Properties"]["DistributionConfig"]
    assert config["ViewerCertificate"]["MinimumProtocolVersion"].startswith("TLSv1.2_")
    assert config["DefaultCacheBehavior"]["ViewerProtocolPolicy"] in ("redirect-to-https", "https-only")
    [origin] = config["Origins"]
    assert origin["CustomOriginConfig"]["OriginProtocolPolicy"] == "https-only"
    assert origin["CustomOriginConfig"]["OriginSSLProtocols"] == ["TLSv1.2"]
    record = t["Resources"]["OriginToAlb"]
    assert record["Condition"] == "UseCloudFront"
    assert record["Properties"]["Name"] == origin["DomainName"]
    assert record["Properties"]["AliasTarget"]["DNSName"] == {"Fn::GetAtt": ["LoadBalancer", "DNSName"]}


def test_hubs_run_unprivileged() -> None:
    """Only ExecStartPre, which reads the secrets into a root-only file, runs as root."""
    unit = _unit(_hub_script(), "fleet-hub.service")
    assert "User=fleet" in unit
    assert [line for line in unit if line.startswith("ExecStartPre=")] == [
        "ExecStartPre=+/opt/fleet/bin/python /opt/fleet/hub-env.py"]


def test_a_hub_release_keeps_min_size_hubs_in_service() -> None:
    update = one(load("hub"), "AWS::AutoScaling::AutoScalingGroup")["UpdatePolicy"]["AutoScalingRollingUpdate"]
    assert update["MinInstancesInService"] == {"Ref": "MinSize"}
    assert update["MaxBatchSize"] == 1


def test_redis_authenticates_with_the_token_the_hubs_read_and_keeps_a_final_snapshot() -> None:
    """Another secret would lock the hubs out (and a secret the workers read would open Redis to them)."""
    redis, secrets, hub = load("redis"), load("secrets"), load("hub")
    group = one(redis, "AWS::ElastiCache::ReplicationGroup")
    token = secrets["Resources"]["RedisAuthToken"]["Properties"]
    assert group["Properties"]["AuthToken"] == {
        "Fn::Sub": "{{resolve:secretsmanager:" + token["Name"]["Fn::Sub"] + ":SecretString}}"}
    assert secrets["Outputs"]["RedisAuthTokenSecretArn"]["Value"] == {"Ref": "RedisAuthToken"}
    exported = secrets["Outputs"]["RedisAuthTokenSecretArn"]["Export"]["Name"]
    hub_reads = hub["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"][
        "Fn::Sub"][1]["RedisArn"]
    assert hub_reads == {"Fn::ImportValue": exported}
    # ElastiCache refuses an AUTH token with '"', '/', '@' or a space: alphanumerics only.
    assert token["GenerateSecretString"]["ExcludePunctuation"] is True
    assert 16 <= token["GenerateSecretString"]["PasswordLength"] <= 128
    # destroy says Redis keeps a final snapshot; Multi-AZ failover needs a replica in each shard.
    assert group["DeletionPolicy"] == group["UpdateReplacePolicy"] == "Snapshot"
    assert redis["Parameters"]["ReplicasPerShard"]["MinValue"] >= 1


def test_workers_admit_only_the_hubs_on_port_8000() -> None:
    """A worker serves sessions to whoever reaches port 8000: the hubs' group in the home region, the hubs' own
    subnets (HubCidr) elsewhere, nothing else."""
    t = load("gpu-workers")
    group = t["Resources"]["WorkerSecurityGroup"]["Properties"]
    assert "SecurityGroupIngress" not in group
    # Egress everywhere: the workers reach the hubs through the public ALB (over the NAT), and package mirrors.
    assert [(r["IpProtocol"], r["CidrIp"]) for r in group["SecurityGroupEgress"]] == [("-1", "0.0.0.0/0")]
    rules = {name: r for name, r in t["Resources"].items() if r["Type"] == "AWS::EC2::SecurityGroupIngress"}
    assert {name: r["Condition"] for name, r in rules.items()} == {"FromHubSecurityGroup": "HubInVpc",
                                                                   "FromHubCidr": "HubPeered"}
    sources = set()
    for r in rules.values():
        props = r["Properties"]
        assert props["GroupId"] == {"Ref": "WorkerSecurityGroup"}
        assert (props["IpProtocol"], props["FromPort"], props["ToPort"]) == ("tcp", 8000, 8000)
        sources |= {json.dumps(props[k]) for k in ("SourceSecurityGroupId", "CidrIp") if k in props}
    assert sources == {json.dumps({"Ref": "HubSecurityGroupId"}), json.dumps({"Ref": "HubCidr"})}
    assert '"FLEET_PORT": "8000"' in _worker_script()


def test_a_draining_worker_is_neither_killed_by_systemd_nor_cut_off_by_the_drain_hook() -> None:
    """SIGTERM starts the drain, which waits up to drain_timeout_s for sessions; systemd must not SIGKILL the
    worker before, and the termination hook must not time out (and terminate the instance) before systemd is done."""
    from worker.settings import WorkerSettings

    unit = _unit(_worker_script(), "fleet-worker.service")
    settings = dict(line.split("=", 1) for line in unit if "=" in line)
    assert settings["KillSignal"] == "SIGTERM"
    stop_timeout = int(settings["TimeoutStopSec"])
    asg = one(load("gpu-workers"), "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    [drain] = [h for h in asg["LifecycleHookSpecificationList"]
               if h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"]
    assert "FLEET_DRAIN_TIMEOUT_S" not in _worker_script()  # the default applies
    drain_timeout = WorkerSettings.model_fields["drain_timeout_s"].default
    assert drain_timeout < stop_timeout < drain["HeartbeatTimeout"]


def test_busy_workers_protect_themselves_and_the_group_still_scales_in() -> None:
    t = load("gpu-workers")
    assert '"FLEET_PROTECT_FROM_SCALE_IN": "true"' in _worker_script()
    asg = one(t, "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    assert asg["NewInstancesProtectedFromScaleIn"] is False
    policy = one(t, "AWS::AutoScaling::ScalingPolicy")["Properties"]
    assert policy["TargetTrackingConfiguration"]["DisableScaleIn"] is False


def test_each_private_subnet_leaves_through_the_nat_of_its_own_az_and_the_public_ones_assign_no_ip() -> None:
    """A NAT in another AZ makes that AZ's loss cut off two; the public subnets hold only the ALB and the NATs."""
    t = load("network")
    res = t["Resources"]
    for az in "ABC":
        [route] = [r["Properties"] for r in resources(t, "AWS::EC2::Route")
                   if r["Properties"]["RouteTableId"] == {"Ref": f"PrivateRouteTable{az}"}]
        assert route == {"RouteTableId": {"Ref": f"PrivateRouteTable{az}"}, "DestinationCidrBlock": "0.0.0.0/0",
                         "NatGatewayId": {"Ref": f"Nat{az}"}}
        assert res[f"Nat{az}"]["Properties"]["SubnetId"] == {"Ref": f"PublicSubnet{az}"}
        assert res[f"PrivateSubnet{az}"]["Properties"]["AvailabilityZone"] == res[f"PublicSubnet{az}"]["Properties"][
            "AvailabilityZone"]
        assert res[f"PublicSubnet{az}"]["Properties"]["MapPublicIpOnLaunch"] is False
    # A route to the internet gateway fails until the gateway is attached to the VPC.
    assert res["PublicDefaultRoute"]["DependsOn"] == "GatewayAttachment"


def test_a_regional_network_peers_with_the_hubs_vpc_in_the_home_region() -> None:
    """Without PeerRegion the peering is requested in the regional network's own region, where the hubs' VPC is not."""
    props = one(load("network"), "AWS::EC2::VPCPeeringConnection")["Properties"]
    assert props["PeerRegion"] == {"Ref": "PeerRegion"}
    assert props["VpcId"] == {"Ref": "Vpc"}
