"""cluster.yaml and infra/ checked offline: Ray's own schema and config validation, botocore's
EC2 RunInstances shape for every node_config, and cfn-lint on the CloudFormation template."""

import copy
import shutil
import subprocess
from pathlib import Path

import botocore.session
import botocore.validate
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema_and_validation():
    config = prepare_config(copy.deepcopy(_cluster()))
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    assert config["idle_timeout_minutes"] > 0
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers and all(v["min_workers"] == 0 for v in workers.values())
    assert any(v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for v in workers.values())


def test_node_configs_match_ec2_run_instances():
    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, node in _cluster()["available_node_types"].items():
        params = dict(node["node_config"], MinCount=1, MaxCount=1)  # Ray adds the counts when it launches
        report = botocore.validate.ParamValidator().validate(params, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"


def test_dashboard_and_job_server_stay_off_the_network():
    config = _cluster()
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=" in head
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()
    for node in config["available_node_types"].values():
        assert node["node_config"]["SecurityGroupIds"], "nodes must use the infra/ security group"
    assert not (ROOT / "infra" / "lstmgen.yaml").read_text().count("0.0.0.0/0")


def test_token_auth_and_imdsv2_on_every_node():
    config = _cluster()
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        starts = [c for c in commands if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), starts
    assert "~/.ray/auth_token" in config["file_mounts"]  # the token every node and `lstmgen submit` read
    watchers = [c for c in config["worker_start_ray_commands"] if "lstmgen.spot" in c]  # the spot reclaim watcher
    assert len(watchers) == 1 and "RAY_AUTH_MODE=token" in watchers[0] and watchers[0].rstrip().endswith("&"), watchers
    for name, node in config["available_node_types"].items():
        assert node["node_config"]["MetadataOptions"]["HttpTokens"] == "required", name


def _template() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, tag, node: {tag: loader.construct_scalar(node)
                                                               if isinstance(node, yaml.ScalarNode) else None})
    return yaml.load((ROOT / "infra" / "lstmgen.yaml").read_text(), Loader=Loader)


def test_the_head_launches_and_tags_only_its_own_cluster_workers():
    role = _template()["Resources"]["HeadRole"]["Properties"]
    statements = [st for policy in role["Policies"] for st in policy["PolicyDocument"]["Statement"]]
    for st in statements:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        if not {"ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances"} & set(actions):
            continue
        assert st["Resource"] != "*", st  # every mutating EC2 action is scoped to resources or conditions
        if "instance/*" in str(st["Resource"]):
            assert st.get("Condition"), st
    launch = next(st for st in statements if st.get("Sid") == "LaunchOnlyThisClustersWorkerInstances")
    keys = set(launch["Condition"]["StringEquals"])
    assert {"aws:RequestTag/ray-cluster-name", "ec2:InstanceProfile", "ec2:InstanceType", "ec2:MetadataHttpTokens"} <= keys


def test_cloudformation_template_lints_clean():
    cfn_lint = shutil.which("cfn-lint")
    assert cfn_lint, "cfn-lint comes with the dev dependencies"
    result = subprocess.run([cfn_lint, str(ROOT / "infra" / "lstmgen.yaml")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
