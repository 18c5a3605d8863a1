"""The AWS path run against an AWS API on loopback: moto's server (CloudFormation, EC2, IAM, S3,
SSM over HTTP), started here on a free port. infra/lstmgen.yaml is deployed through
CloudFormation, ``lstmgen cluster init`` reads that stack, ``ray up`` launches the head from the
file it writes, Ray's AWS node provider launches the workers, and ``ray down`` terminates them.

What moto does not do is said where it matters: its instances have no network (so ``ray up`` is
stopped once the head is launched and Ray is waiting for SSH), its IAM does not enforce policy
conditions (so the head role's conditions are read back from the deployed policy), and its
CloudFormation leaves some bucket properties out (listed by ``BUCKET_GAPS``)."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import one_line_error, run_cli
from .s3server import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
REGION = "eu-central-1"  # not the template's us-west-2, so a region left unfilled shows
CLUSTER = "lstmgen-moto"  # not the template's lstmgen, for the same reason
AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"  # one moto serves
# Bucket properties in the template that moto's CloudFormation does not apply (moto 5.x); the
# test checks each of the others on the deployed bucket, and that these stay declared.
BUCKET_GAPS = {"PublicAccessBlockConfiguration", "VersioningConfiguration", "LifecycleConfiguration", "OwnershipControls"}


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory):
    port, work = free_port(), tmp_path_factory.mktemp("moto")
    log = (work / "moto.log").open("w")
    env = dict(os.environ, MOTO_ENABLE_RECORDING="1", MOTO_RECORDER_FILEPATH=str(work / "calls.jsonl"))
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1).read()
            break
        except OSError:
            assert server.poll() is None, "moto server exited"
            time.sleep(0.1)
    yield url, work / "calls.jsonl"
    server.terminate()
    server.wait(10)


@pytest.fixture
def aws(moto_url, tmp_path, monkeypatch):
    """This test's environment: moto's endpoint, test credentials, a HOME of its own (Ray writes
    the cluster's SSH key under ~/.ssh), and a fresh account (moto reset)."""
    url, calls = moto_url
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10).read()
    calls.write_text("")  # the AWS calls this test makes, recorded by moto
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("moto-test-token\n")  # cluster.yaml's file_mounts name it
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": REGION, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0",
           "AWS_PROFILE": None, "AWS_SESSION_TOKEN": None, "AWS_REGION": None}
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    yield env
    import boto3

    boto3.DEFAULT_SESSION = None  # nothing of moto's credentials stays for the tests after these


def _client(service: str):
    import boto3

    return boto3.session.Session().client(service, region_name=REGION)  # not boto3's default session, which keeps credentials


def deploy(name: str = "lstmgen", template: str | None = None, **params: str) -> dict:
    """create_stack with the template and wait until it is complete; its outputs."""
    vpc = _client("ec2").describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    values = {"ClusterName": CLUSTER, "VpcId": vpc, "SshCidr": "203.0.113.7/32", **params}
    body = template or (ROOT / "infra" / "lstmgen.yaml").read_text()
    cfn = _client("cloudformation")
    cfn.create_stack(StackName=name, TemplateBody=body, Capabilities=["CAPABILITY_NAMED_IAM"],
                     Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in values.items()
                                 if f"  {k}:" in body])
    cfn.get_waiter("stack_create_complete").wait(StackName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
    return {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}


def _policy(document) -> dict:
    """A role policy as IAM returns it: JSON, or (moto) the template's mapping printed by Python."""
    if isinstance(document, dict):
        return document
    try:
        return json.loads(document)
    except ValueError:
        return ast.literal_eval(document)


def test_the_stack_deploys_as_the_template_says(aws):
    outputs = deploy()
    s3, iam, ec2 = _client("s3"), _client("iam"), _client("ec2")
    bucket = outputs["BucketName"]
    assert bucket == f"{CLUSTER}-123456789012-{REGION}"
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    template = yaml.load((ROOT / "infra" / "lstmgen.yaml").read_text(), Loader=_IgnoreTags)
    declared = template["Resources"]["Bucket"]["Properties"]
    assert BUCKET_GAPS <= set(declared), "a property moto leaves out is no longer in the template"
    print(f"not covered by moto's CloudFormation (declared, checked by cfn-lint only): {sorted(BUCKET_GAPS)}")

    # Both roles and instance profiles, each profile holding its own role.
    for kind, arn in (("head", outputs["HeadInstanceProfileArn"]), ("worker", outputs["WorkerInstanceProfileArn"])):
        profile = iam.get_instance_profile(InstanceProfileName=arn.rsplit("/", 1)[1])["InstanceProfile"]
        assert profile["Arn"] == arn and [r["RoleName"] for r in profile["Roles"]] == [f"{CLUSTER}-ray-{kind}"]
    # The head's conditions, read from the deployed policy (moto's IAM does not enforce them).
    statements = _policy(iam.get_role_policy(RoleName=f"{CLUSTER}-ray-head", PolicyName="ray-autoscaler")["PolicyDocument"])
    launch = next(st for st in statements["Statement"] if st["Sid"] == "LaunchOnlyThisClustersWorkerInstances")
    conditions = launch["Condition"]["StringEquals"]
    assert conditions["aws:RequestTag/ray-cluster-name"] == CLUSTER
    assert conditions["ec2:InstanceProfile"] == outputs["WorkerInstanceProfileArn"]
    assert conditions["ec2:MetadataHttpTokens"] == "required" and conditions["ec2:InstanceType"] in (["g5.xlarge"], "g5.xlarge")
    pass_role = next(st for st in statements["Statement"] if st["Sid"] == "HandWorkersTheirProfileOnly")
    assert pass_role["Resource"].endswith(f":role/{CLUSTER}-ray-worker")

    # The security group: SSH from the one CIDR, everything else only from the group itself.
    group = ec2.describe_security_groups(GroupIds=[outputs["SecurityGroupId"]])["SecurityGroups"][0]
    public = [p for p in group["IpPermissions"] if p["IpRanges"] or p.get("Ipv6Ranges")]
    assert [(p["IpProtocol"], p["FromPort"], p["ToPort"], [r["CidrIp"] for r in p["IpRanges"]]) for p in public] == \
        [("tcp", 22, 22, ["203.0.113.7/32"])]
    internal = [p for p in group["IpPermissions"] if p["UserIdGroupPairs"]]
    assert [(p["IpProtocol"], [g["GroupId"] for g in p["UserIdGroupPairs"]]) for p in internal] == [("-1", [group["GroupId"]])]


class _IgnoreTags(yaml.SafeLoader):
    pass


_IgnoreTags.add_multi_constructor("!", lambda loader, tag, node: None)


def test_cluster_init_fills_every_value_and_keeps_the_rest(aws, tmp_path):
    outputs = deploy()
    out = tmp_path / "my-cluster.yaml"
    result = run_cli("cluster", "init", "--stack", "lstmgen", "--region", REGION, "--out", str(out),
                     "--ami-parameter", AMI_PARAMETER, env=aws)
    assert result.returncode == 0, result.stderr
    ami = _client("ssm").get_parameter(Name=AMI_PARAMETER)["Parameter"]["Value"]
    config = yaml.safe_load(out.read_text())
    assert config["cluster_name"] == CLUSTER and config["provider"]["region"] == REGION
    for name, node in config["available_node_types"].items():
        profile = outputs["HeadInstanceProfileArn"] if name == "head" else outputs["WorkerInstanceProfileArn"]
        assert node["node_config"]["IamInstanceProfile"]["Arn"] == profile, name
        assert node["node_config"]["SecurityGroupIds"] == [outputs["SecurityGroupId"]], name
        assert node["node_config"]["ImageId"] == ami, name

    # Only the eleven account values changed; every other line, comments included, is the template's.
    template = (ROOT / "cluster.yaml").read_text().splitlines()
    written = out.read_text().splitlines()
    assert len(written) == len(template)
    changed = [(a, b) for a, b in zip(template, written) if a != b]
    assert len(changed) == 11, changed
    assert all(a.split("#")[1:] == b.split("#")[1:] for a, b in changed), "a comment was lost"
    assert "init:" in "".join(written)  # the comments say where each value came from

    from lstmgen.aws import check_ray_schema

    check_ray_schema(out.read_text())  # raises on anything Ray's schema refuses


def test_cluster_init_bad_input_is_one_line_and_writes_nothing(aws, tmp_path):
    deploy()
    out = tmp_path / "c.yaml"

    def init(*flags: str, **env: str):
        return run_cli("cluster", "init", "--out", str(out), "--ami-parameter", AMI_PARAMETER, *flags, env={**aws, **env})

    one_line_error(init("--stack", "nope", "--region", REGION), "stack 'nope' not found", REGION)
    one_line_error(init("--region", "us-west-2"), "stack 'lstmgen' not found", "us-west-2")  # deployed elsewhere
    one_line_error(init("--region", REGION, "--ami", "ami-0000000000000dead"), "ami-0000000000000dead", "does not exist")
    one_line_error(init("--region", REGION, "--ami-parameter", "/aws/service/nothing/here"), "/aws/service/nothing/here", "--ami")
    one_line_error(init("--region", REGION, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}"), "cannot reach AWS")

    # A stack of another template (an output missing), and one not yet created (a change set under review).
    small = "Resources:\n  Topic:\n    Type: AWS::SNS::Topic\nOutputs:\n  BucketName:\n    Value: b\n"
    deploy("other", template=small)
    one_line_error(init("--stack", "other", "--region", REGION), "no output", "HeadInstanceProfileArn")
    _client("cloudformation").create_change_set(StackName="pending", ChangeSetName="first", ChangeSetType="CREATE",
                                                TemplateBody=small)
    one_line_error(init("--stack", "pending", "--region", REGION), "REVIEW_IN_PROGRESS", "not complete")
    # Workers of a type the head's role may not launch.
    deploy("narrow", WorkerInstanceTypes="g6.xlarge", ClusterName="narrow")
    one_line_error(init("--stack", "narrow", "--region", REGION), "g5.xlarge", "WorkerInstanceTypes")
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "home"]

    out.write_text("mine\n")
    one_line_error(init("--region", REGION), str(out), "--overwrite")
    assert out.read_text() == "mine\n"


def _calls(recording: Path) -> set[str]:
    """service:Action of every request moto recorded (query and JSON protocols; S3 by method)."""
    from urllib.parse import parse_qs

    calls = set()
    for line in recording.read_text().splitlines():
        entry = json.loads(line)
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        scope = headers.get("authorization", "").split("Credential=")[-1].split("/")
        service = scope[3] if len(scope) > 3 else "?"
        body = entry.get("body") or ""
        if entry.get("body_encoded"):
            import base64

            body = base64.b64decode(body).decode("utf-8", "replace")
        action = parse_qs(body).get("Action", [None])[0] or headers.get("x-amz-target", "").rpartition(".")[2]
        calls.add(f"{service}:{action or entry['method']}")
    return calls


LAUNCH_WORKERS = """
import sys, yaml
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.providers import _get_node_provider
from ray.autoscaler.tags import TAG_RAY_NODE_KIND, TAG_RAY_NODE_NAME, TAG_RAY_USER_NODE_TYPE
config = _bootstrap_config(yaml.safe_load(open(sys.argv[1]).read()), no_config_cache=True)
provider = _get_node_provider(config["provider"], config["cluster_name"])
for name in ("gpu_ondemand", "gpu_spot"):
    tags = {TAG_RAY_NODE_KIND: "worker", TAG_RAY_USER_NODE_TYPE: name, TAG_RAY_NODE_NAME: "ray-worker"}
    provider.create_node(config["available_node_types"][name]["node_config"], tags, 1)
"""


def _instances(**tags: str) -> list[dict]:
    filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
    reservations = _client("ec2").describe_instances(Filters=filters)["Reservations"]
    return [i for r in reservations for i in r["Instances"]]


def _tags(instance: dict) -> dict:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def test_ray_up_launches_the_head_and_ray_down_leaves_nothing(aws, tmp_path, moto_url):
    aws_recording = moto_url[1]
    outputs = deploy()
    config_path = tmp_path / "my-cluster.yaml"
    assert run_cli("cluster", "init", "--region", REGION, "--out", str(config_path), "--ami-parameter", AMI_PARAMETER,
                   env=aws).returncode == 0
    # moto's instances have no network: SSH goes through a proxy that fails at once, where it
    # would otherwise wait out ssh's ConnectTimeout (ray down's `docker stop`: 120 s).
    config = yaml.safe_load(config_path.read_text())
    config["auth"]["ssh_proxy_command"] = "false"
    config_path.write_text(yaml.safe_dump(config))
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ)
    mounted = tmp_path / "checkout"  # file_mounts' `~/lstmgen: .`: ray up hashes it, and a checkout may hold live Ray temp files
    mounted.mkdir()

    # ray up: stopped once the head is launched and Ray waits for its SSH, which never comes.
    up = subprocess.Popen([ray_cli, "up", "-y", "--no-config-cache", str(config_path)], cwd=mounted, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and up.poll() is None:
        heads = [i for i in _instances(**{"ray-cluster-name": CLUSTER, "ray-node-type": "head"})
                 if _tags(i).get("ray-node-status") == "waiting-for-ssh"]
        if heads:
            break
        time.sleep(1)
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGTERM)
    log = up.communicate(timeout=30)[0]
    assert heads, f"ray up launched no head:\n{log[-3000:]}"
    print("ray up stopped after the head's launch: moto's instances run no SSH")
    head = heads[0]
    assert head["InstanceType"] == "m6i.xlarge"
    assert head["IamInstanceProfile"]["Arn"] == outputs["HeadInstanceProfileArn"]
    assert head["MetadataOptions"]["HttpTokens"] == "required" and head["MetadataOptions"]["HttpPutResponseHopLimit"] == 2
    assert [g["GroupId"] for g in head["SecurityGroups"]] == [outputs["SecurityGroupId"]]
    assert _tags(head)["ray-user-node-type"] == "head"
    assert head["ImageId"] == config["available_node_types"]["head"]["node_config"]["ImageId"]

    # The workers, as the autoscaler on the head launches them: Ray's AWS node provider with each
    # node config (in a process of its own: Ray caches its boto3 clients, credentials included).
    launch = subprocess.run([sys.executable, "-c", LAUNCH_WORKERS, str(config_path)], cwd=mounted, env=env,
                            capture_output=True, text=True, timeout=120)
    assert launch.returncode == 0, launch.stderr[-3000:]
    workers = {_tags(i)["ray-user-node-type"]: i for i in _instances(**{"ray-cluster-name": CLUSTER, "ray-node-type": "worker"})}
    assert sorted(workers) == ["gpu_ondemand", "gpu_spot"]
    for worker in workers.values():
        assert worker["InstanceType"] == "g5.xlarge"
        assert worker["IamInstanceProfile"]["Arn"] == outputs["WorkerInstanceProfileArn"]
        assert worker["MetadataOptions"]["HttpTokens"] == "required"
        assert [g["GroupId"] for g in worker["SecurityGroups"]] == [outputs["SecurityGroupId"]]
    assert workers["gpu_spot"].get("InstanceLifecycle") == "spot"
    assert workers["gpu_ondemand"].get("InstanceLifecycle") in (None, "scheduled", "normal")

    # ray down: every instance of the cluster terminated.
    down = subprocess.run([ray_cli, "down", "-y", str(config_path)], cwd=mounted, env=env, capture_output=True,
                          text=True, timeout=180)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    left = [(i["InstanceId"], i["State"]["Name"]) for i in _instances(**{"ray-cluster-name": CLUSTER})]
    assert len(left) == 3 and all(state == "terminated" for _, state in left), left

    calls = _calls(aws_recording)
    print("AWS calls of deploy, cluster init, ray up, the node provider and ray down:", ", ".join(sorted(calls)))
    assert {"cloudformation:CreateStack", "cloudformation:DescribeStacks", "ssm:GetParameter", "ec2:DescribeImages",
            "ec2:RunInstances", "ec2:CreateKeyPair", "ec2:DescribeSubnets", "ec2:TerminateInstances"} <= calls, calls


def test_the_spot_watcher_reads_motos_instance_metadata(moto_url):
    url = moto_url[0]
    """moto serves the instance metadata (IMDSv2 token, instance-life-cycle) of an on-demand
    instance, but not spot/instance-action: the reclaim itself stays with tests/test_spot.py's fake."""
    result = subprocess.run([sys.executable, "-m", "lstmgen.spot", "--address", f"127.0.0.1:{free_port()}",
                             "--metadata-url", url, "--every", "0.2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "an on-demand instance" in result.stdout
