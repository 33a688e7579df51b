"""The CloudFormation templates: cfn-lint clean (no error, no warning) and the properties the deployment relies on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import ManualArgs, lint_file
from cfnlint.decode import cfn_yaml

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
    assert len(subnets) == 6
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
    assert len(secrets) == 4
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
    assert asg["HealthCheckType"] == "ELB"
    assert "Fn::Split" in asg["VPCZoneIdentifier"]  # the three private subnets
    tg = one(t, "AWS::ElasticLoadBalancingV2::TargetGroup")["Properties"]
    assert tg["HealthCheckPath"] == "/ready"
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
    assert {"CloudFront-Viewer-Latitude", "CloudFront-Viewer-Longitude"} <= set(policy["HeadersConfig"]["Headers"])


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
    assert [h["LifecycleTransition"] for h in hooks] == ["autoscaling:EC2_INSTANCE_TERMINATING"]
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
    stmts = {s["Sid"]: s for s in _statements(load("gpu-workers"))}
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
    asg = one(t, "AWS::AutoScaling::AutoScalingGroup")["Properties"]
    hook = asg["LifecycleHookSpecificationList"][0]["LifecycleHookName"]["Fn::Sub"]
    assert f'"FLEET_LIFECYCLE_HOOK_NAME": "{hook}"' in script
    assert f'"FLEET_AUTOSCALING_GROUP": "{asg["AutoScalingGroupName"]["Fn::Sub"]}"' in script
