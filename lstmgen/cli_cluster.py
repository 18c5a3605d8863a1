"""The cluster half of the ``lstmgen`` command line: ``submit`` sends a job command to a Ray
cluster's job server (the same flags as the local command), ``jobs`` follows, lists and stops the
jobs there, and ``cluster rehearse`` starts a cluster shaped like cluster.yaml on this machine.
``lstmgen.cli`` mounts these beside the job commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from lstmgen import aws as aws_defaults
from lstmgen.errors import LstmgenError

jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster: list, status, logs, stop.")
cluster_app = typer.Typer(no_args_is_help=True, help="Fill cluster.yaml from your AWS stack, or rehearse it on this machine.")
SUBMIT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}  # the job's own flags pass through
REPO = Path(__file__).resolve().parent.parent  # the checkout: cluster.yaml, and the code the rehearsal's nodes run
JOB_SERVER = typer.Option(None, "--address", envvar="RAY_ADDRESS",
                          help="Job server (dashboard) URL, e.g. http://127.0.0.1:8265 through `ray dashboard cluster.yaml`.")


def submit(
    ctx: typer.Context,
    job: str = typer.Argument(..., help="prepare | train | tune | generate | evaluate | checkpoints"),
    address: Optional[str] = JOB_SERVER,
    follow_logs: bool = typer.Option(False, "--follow", help="Tail the logs; exit with the job's status."),
) -> None:
    """Submit a job to a Ray cluster: `lstmgen submit train --data s3://... --run s3://...` takes the
    same options as the local command and runs jobs/<job>.py on the cluster."""
    from lstmgen import submit as sub

    args = list(ctx.args)
    _validate_job_args(ctx, job, args)
    job_id = sub.submit(job, args, address, gpu="--gpu" in args)
    typer.echo(job_id)
    if follow_logs:
        status = sub.follow(sub.client(address), job_id)
        typer.echo(f"job {job_id}: {status}", err=True)
        raise typer.Exit(0 if status == "SUCCEEDED" else 1)


def _validate_job_args(ctx: typer.Context, job: str, args: list[str]) -> None:
    """Parse the job's arguments with the local command's parser, so a bad flag fails here, now."""
    command = getattr(ctx.find_root().command, "commands", {}).get(job)
    if job not in ("prepare", "train", "tune", "generate", "evaluate", "checkpoints") or command is None:
        raise LstmgenError(f"cannot submit {job!r}; choose prepare, train, tune, generate, evaluate or checkpoints")
    try:
        command.make_context(job, list(args), resilient_parsing=False)
    except Exception as exc:  # Typer's own (vendored) click exceptions
        if type(exc).__name__ == "Exit":
            return
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise LstmgenError(f"{job}: {message}") from None


@jobs_app.command("list")
def jobs_list(address: Optional[str] = JOB_SERVER) -> None:
    """A table of the cluster's jobs."""
    from lstmgen import submit as sub

    typer.echo(sub.list_table(sub.client(address)))


@jobs_app.command("status")
def jobs_status(job_id: str = typer.Argument(...), address: Optional[str] = JOB_SERVER) -> None:
    """A job's status and message."""
    from lstmgen import submit as sub

    info = sub.status_of(sub.client(address), job_id)
    typer.echo(f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))


@jobs_app.command("logs")
def jobs_logs(job_id: str = typer.Argument(...), follow_logs: bool = typer.Option(False, "--follow", help="Until the job ends."),
              address: Optional[str] = JOB_SERVER) -> None:
    """A job's logs (with --follow: until it ends, exiting with its status)."""
    from lstmgen import submit as sub

    c = sub.client(address)
    sub.status_of(c, job_id)
    if not follow_logs:
        typer.echo(c.get_job_logs(job_id), nl=False)
        return
    status = sub.follow(c, job_id)
    typer.echo(f"job {job_id}: {status}", err=True)
    raise typer.Exit(0 if status == "SUCCEEDED" else 1)


@jobs_app.command("stop")
def jobs_stop(job_id: str = typer.Argument(...), address: Optional[str] = JOB_SERVER,
              timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for it to stop.")) -> None:
    """Stop a job and wait until it has stopped."""
    from lstmgen import submit as sub

    c = sub.client(address)
    sub.status_of(c, job_id)
    c.stop_job(job_id)
    status = sub.wait(c, job_id, timeout)
    typer.echo(f"{job_id}: {status}")
    if status not in sub.TERMINAL:
        raise LstmgenError(f"{job_id}: still {status} after {timeout:.0f} s")


@cluster_app.command("init")
def cluster_init(
    stack: str = typer.Option("lstmgen", "--stack", help="The deployed infra/lstmgen.yaml stack."),
    region: str = typer.Option(..., "--region", envvar="AWS_REGION", help="The stack's region, e.g. us-west-2."),
    out: str = typer.Option(..., "--out", help="The cluster config to write, e.g. my-cluster.yaml."),
    ami: Optional[str] = typer.Option(None, "--ami",
                                      help="AMI id for every node (default: AWS's current Deep Learning GPU AMI, Ubuntu 22.04)."),
    ami_parameter: str = typer.Option(aws_defaults.DLAMI_PARAMETER, "--ami-parameter",
                                      help="The public SSM parameter that names the AMI when --ami is not given."),
    template: str = typer.Option(str(REPO / "cluster.yaml"), "--template", help="The cluster config to fill (comments kept)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Write a cluster config for `ray up` with every account value filled from the stack's outputs
    (instance profiles, security group, cluster name) and the region's AMI, each checked first."""
    from lstmgen import aws

    info = aws.init(stack, region, out, ami=ami, ami_parameter=ami_parameter, template=Path(template), overwrite=overwrite)
    typer.echo(f"{out}: cluster {info.cluster_name} in {region}; data goes to s3://{info.bucket}/\n"
               f"next: ray get-auth-token --generate (once), then ray up {out}")


@cluster_app.command("rehearse")
def cluster_rehearse(
    cluster_yaml: str = typer.Option(str(REPO / "cluster.yaml"), "--cluster-yaml",
                                     help="The cluster config whose worker node types to mirror."),
    workdir: str = typer.Option(".lstmgen-rehearsal", "--workdir", help="Ray's logs and the cluster's token go here."),
    cpus_per_node: int = typer.Option(1, "--cpus-per-node", help="CPUs each simulated worker node offers."),
    max_nodes_per_type: int = typer.Option(4, "--max-nodes-per-type", help="Cap on each node type's max_workers."),
    idle_timeout: float = typer.Option(30.0, "--idle-timeout", help="Seconds before an idle worker node is removed."),
    s3_endpoint: Optional[str] = typer.Option(None, "--s3-endpoint", envvar="AWS_ENDPOINT_URL",
                                              help="S3-compatible endpoint URL, passed to every node."),
) -> None:
    """Start a multi-node Ray cluster on this machine shaped like cluster.yaml: a head with the real
    autoscaler, worker nodes (separate raylets) that start at zero and go when idle. Ctrl-C stops it."""
    import signal
    import time as clock

    from lstmgen import rehearse

    env = {"AWS_ENDPOINT_URL": s3_endpoint} if s3_endpoint else {}
    cluster = rehearse.start(Path(workdir), Path(cluster_yaml), cpus_per_node=cpus_per_node,
                             max_per_type=max_nodes_per_type, idle_timeout_s=idle_timeout, env=env)
    types = json.loads((Path(workdir) / "autoscaler.json").read_text())["available_node_types"]
    shape = ", ".join(f"{name} {t['min_workers']}-{t['max_workers']}" for name, t in types.items() if "min_workers" in t)
    typer.echo(f"rehearsal: job server {cluster.url}; worker node types {shape} (1 {rehearse.GPU_STANDIN} each, "
               f"standing in for a GPU), idle timeout {idle_timeout:g} s\n"
               f"In another terminal:\n  export RAY_ADDRESS={cluster.url} RAY_AUTH_TOKEN_PATH={cluster.token_path} "
               f"LSTMGEN_CODE_ON_NODES={REPO}\n"
               "  lstmgen submit train --gpu --workers 2 --data s3://BUCKET/data --run s3://BUCKET/runs/r1 --follow\n"
               "Ctrl-C stops the cluster.")

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops the cluster as Ctrl-C does
    seen = None
    try:
        while True:
            nodes = sorted(n["type"] for n in cluster.nodes())
            if nodes != seen:
                typer.echo(f"rehearsal: {len(nodes)} worker node(s) up" + (f": {', '.join(nodes)}" if nodes else ""))
                seen = nodes
            clock.sleep(2)
    except KeyboardInterrupt:
        typer.echo("rehearsal: stopping")
    finally:
        cluster.stop()


@cluster_app.command("reclaim")
def cluster_reclaim(
    node_id: str = typer.Argument(..., help="The worker node to reclaim (its id, as `train` logs where its workers run)."),
    notice: float = typer.Option(30.0, "--notice", help="Seconds of notice, as AWS gives two minutes."),
    workdir: str = typer.Option(".lstmgen-rehearsal", "--workdir", help="The running rehearsal's --workdir."),
) -> None:
    """Reclaim a node of the running rehearsal as AWS reclaims a spot instance: the notice comes
    through a fake instance metadata service, the node's watcher (lstmgen.spot) drains the node,
    and the node is killed when the notice runs out."""
    from lstmgen import rehearse

    cluster = rehearse.attach(Path(workdir))
    if node_id not in {n["id"] for n in cluster.nodes()}:
        raise LstmgenError(f"{node_id}: not an alive worker node of this rehearsal")
    typer.echo(f"reclaim: notice for node {node_id}, reclaimed in {notice:g} s")
    cluster.reclaim(node_id, notice)
    typer.echo(f"reclaim: node {node_id} killed")
