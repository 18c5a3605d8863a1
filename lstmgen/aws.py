"""``lstmgen cluster init``: a cluster.yaml with nothing left to edit, from the infra/ stack.

The stack knows the instance profiles, the security group and the cluster's name; AWS's public SSM
parameter knows the current Deep Learning AMI of each region. Copying them by hand into eleven
places is where a worker profile lands on the head or an AMI of another region slips in, and that
shows only as a failed ``ray up`` after instances were paid for. Here every value is read, checked
(the stack complete, every output there, the AMI present in the region, the worker types ones
the head may launch) and written into the repository's cluster.yaml, comments kept, through
ruamel.yaml's round trip. Nothing is written unless all of it checks out.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from lstmgen.errors import LstmgenError

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "cluster.yaml"
# AWS's public parameter for "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)":
# Docker, the NVIDIA driver and container toolkit, which the rayproject/ray GPU image needs.
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
OUTPUTS = ("HeadInstanceProfileArn", "WorkerInstanceProfileArn", "SecurityGroupId")
READY = ("CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE")


@dataclass(frozen=True)
class Stack:
    """What a cluster.yaml needs from the deployed infra/ stack."""

    cluster_name: str
    head_profile: str
    worker_profile: str
    security_group: str
    worker_types: tuple[str, ...]  # the only instance types the head's role may launch
    bucket: str


def _aws_error(exc: Exception, what: str, region: str) -> LstmgenError:
    """One line for what boto3 raises: no credentials, no endpoint, or AWS's own refusal."""
    import botocore.exceptions as bex

    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return LstmgenError(f"{what}: no AWS credentials (environment, ~/.aws profile or instance profile)")
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError)):
        return LstmgenError(f"{what}: cannot reach AWS in region {region!r} (is the region right?)")
    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        return LstmgenError(f"{what} in {region}: {error.get('Code', 'error')}: {error.get('Message', exc)}")
    return LstmgenError(f"{what} in {region}: {exc}")


def _client(service: str, region: str):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client(service, region_name=region, config=config)  # AWS_ENDPOINT_URL is honoured


def read_stack(name: str, region: str) -> Stack:
    """The stack's outputs and parameters; one line if it is missing, unfinished or incomplete."""
    import botocore.exceptions as bex

    try:
        stacks = _client("cloudformation", region).describe_stacks(StackName=name)["Stacks"]
    except bex.ClientError as exc:
        if "does not exist" in str(exc):
            raise LstmgenError(f"stack {name!r} not found in region {region} (deployed elsewhere, or another name?)") from None
        raise _aws_error(exc, f"stack {name!r}", region) from None
    except bex.BotoCoreError as exc:
        raise _aws_error(exc, f"stack {name!r}", region) from None
    stack = stacks[0]
    if stack["StackStatus"] not in READY:
        raise LstmgenError(f"stack {name!r} is {stack['StackStatus']}, not complete: wait for it, or fix and redeploy")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    missing = [key for key in (*OUTPUTS, "BucketName") if not outputs.get(key)]
    if missing:
        raise LstmgenError(f"stack {name!r} has no output {', '.join(missing)}: is it infra/lstmgen.yaml?")
    params = {p["ParameterKey"]: p.get("ResolvedValue", p.get("ParameterValue", "")) for p in stack.get("Parameters", [])}
    return Stack(cluster_name=params.get("ClusterName") or "lstmgen",
                 head_profile=outputs["HeadInstanceProfileArn"], worker_profile=outputs["WorkerInstanceProfileArn"],
                 security_group=outputs["SecurityGroupId"], bucket=outputs["BucketName"],
                 worker_types=tuple(t.strip() for t in params.get("WorkerInstanceTypes", "g5.xlarge").split(",") if t.strip()))


def find_ami(region: str, ami: str | None, parameter: str = DLAMI_PARAMETER) -> str:
    """``ami``, or the one the public SSM parameter names; either way it must exist in the region."""
    import botocore.exceptions as bex

    if not ami:
        try:
            ami = _client("ssm", region).get_parameter(Name=parameter)["Parameter"]["Value"]
        except bex.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ParameterNotFound":
                raise LstmgenError(f"no AMI parameter {parameter} in region {region}: pass --ami") from None
            raise _aws_error(exc, f"AMI parameter {parameter}", region) from None
        except bex.BotoCoreError as exc:
            raise _aws_error(exc, f"AMI parameter {parameter}", region) from None
    try:
        images = _client("ec2", region).describe_images(ImageIds=[ami])["Images"]
    except bex.ClientError as exc:
        if exc.response.get("Error", {}).get("Code", "").startswith("InvalidAMIID"):
            images = []
        else:
            raise _aws_error(exc, f"AMI {ami}", region) from None
    except bex.BotoCoreError as exc:
        raise _aws_error(exc, f"AMI {ami}", region) from None
    if not images or images[0].get("State", "available") != "available":
        raise LstmgenError(f"AMI {ami} does not exist in region {region} (an AMI id belongs to one region)")
    return ami


def _yaml():
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments, quotes and order stay as the template has them
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def fill(template: str, stack: Stack, region: str, ami: str) -> str:
    """The template with the stack's values in place; the worker types checked against the stack."""
    yaml = _yaml()
    config = yaml.load(template)
    config["cluster_name"] = stack.cluster_name
    config["provider"]["region"] = region
    for name, node in config["available_node_types"].items():
        node_config = node["node_config"]
        head = name == config["head_node_type"]
        if not head and node_config.get("InstanceType") not in stack.worker_types:
            raise LstmgenError(f"node type {name}: {node_config.get('InstanceType')} is not one the head may launch "
                               f"(stack parameter WorkerInstanceTypes: {', '.join(stack.worker_types)})")
        node_config["ImageId"] = ami
        node_config["IamInstanceProfile"]["Arn"] = stack.head_profile if head else stack.worker_profile
        groups = node_config["SecurityGroupIds"]
        groups[0] = stack.security_group  # in place, so the item's comment stays
        del groups[1:]
    out = io.StringIO()
    yaml.dump(config, out)
    return out.getvalue()


def check_ray_schema(text: str) -> None:
    """Ray's own schema and validation, as ``ray up`` applies them before it launches anything."""
    import copy
    import logging

    import yaml
    from ray.autoscaler._private import util

    quiet = logging.getLogger(util.__name__)
    level, quiet.level = quiet.level, logging.WARNING  # prepare_config's INFO lines are about defaults it sets
    try:
        util.validate_config(util.prepare_config(copy.deepcopy(yaml.safe_load(text))))
    except Exception as exc:  # jsonschema's ValidationError or Ray's ValueError
        raise LstmgenError(f"the filled cluster config fails Ray's schema: {str(exc).splitlines()[0]}") from None
    finally:
        quiet.level = level


def init(stack_name: str, region: str, out: str, ami: str | None = None, ami_parameter: str = DLAMI_PARAMETER,
         template: Path = TEMPLATE, overwrite: bool = False) -> Stack:
    """Read, check, fill, validate, then write ``out`` through a temporary file."""
    target = Path(out)
    if target.exists() and not overwrite:
        raise LstmgenError(f"{out} exists (--overwrite replaces it)")
    if not target.parent.is_dir():
        raise LstmgenError(f"{out}: no such directory {target.parent}")
    if not template.is_file():
        raise LstmgenError(f"{template}: no such cluster config template")
    stack = read_stack(stack_name, region)
    image = find_ami(region, ami, ami_parameter)
    text = fill(template.read_text(), stack, region, image)
    check_ray_schema(text)
    staging = target.with_name(f".{target.name}.tmp")
    staging.write_text(text)
    os.replace(staging, target)
    return stack
