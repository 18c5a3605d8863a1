"""A multi-node Ray cluster on one machine, shaped like ``cluster.yaml``: rehearse a cluster job
before paying for AWS.

Ray ships a fake multi-node node provider (``fake_multinode``, the one behind
``ray.cluster_utils.AutoscalingCluster``): the real autoscaler runs on the head and starts and
stops worker "nodes", each a separate raylet with its own resources, on this machine. We build
its config from ``cluster.yaml``: the same worker node types (names, min/max workers), the idle
timeout scaled down from minutes to seconds. The nodes have no GPU, so each worker node offers
one unit of the custom resource ``rehearsal_gpu`` instead, and ``LSTMGEN_GPU_RESOURCE`` tells
jobs on this cluster that ``--gpu`` means one unit of it (the job then trains on the CPU). So
``lstmgen submit train --gpu --workers 2 ...`` is the same command here as on AWS.

A spot reclaim with AWS's notice is rehearsed with ``Rehearsal.reclaim`` (``lstmgen cluster
reclaim``): a fake instance metadata service on loopback announces it, the node's watcher
(``lstmgen.spot``, as on AWS) drains the node, and the node is killed when the time comes.

What differs from AWS: every node shares this machine's disk and cores, so use ``s3://`` paths
(or ``--shared-fs``) as a real cluster needs, and read throughput figures as what they are.
Everything listens on 127.0.0.1 or this machine's own address; token authentication is on.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lstmgen.errors import LstmgenError

GPU_STANDIN = "rehearsal_gpu"
CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"
NODE_OBJECT_STORE_BYTES = 512 << 20  # per node: Ray's default (30 % of RAM) on every simulated node would not fit
NODE_ID_ENV = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"  # the fake provider gives each node's processes its id
HEAD_NODE_ID = "f" * 51 + "00000"  # the id the fake provider expects of the head
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_under(temp_dir: str):
    """The processes of a Ray started with ``--temp-dir temp_dir`` (every one names it)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in (p.info["cmdline"] or [])):
                yield p
        except psutil.Error:
            continue


def stop_processes_under(temp_dir: str) -> None:
    """SIGTERM those processes, then SIGKILL whatever is left after 15 s."""
    import psutil

    procs = list(processes_under(temp_dir))
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def rehearsal_config(cluster_yaml: Path, gcs_address: str, cpus_per_node: int, head_cpus: int,
                     idle_timeout_s: float, max_per_type: int | None = None) -> dict:
    """The autoscaler config of the rehearsal: cluster.yaml's worker node types on fake nodes."""
    import yaml

    try:
        source = yaml.safe_load(Path(cluster_yaml).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LstmgenError(f"{cluster_yaml}: cannot read the cluster config ({exc})") from None
    head_type = source.get("head_node_type")
    node_types = {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}}
    for name, spec in (source.get("available_node_types") or {}).items():
        if name == head_type:
            continue
        most = int(spec.get("max_workers", source.get("max_workers", 2)))
        resources = {"CPU": cpus_per_node, GPU_STANDIN: 1, "object_store_memory": NODE_OBJECT_STORE_BYTES}
        node_types[name] = {"resources": resources, "node_config": {},
                            "min_workers": int(spec.get("min_workers", 0)),
                            "max_workers": most if max_per_type is None else min(most, max_per_type)}
    if len(node_types) == 1:
        raise LstmgenError(f"{cluster_yaml}: no worker node types under available_node_types")
    empty: list = []
    return {
        "cluster_name": f"{source.get('cluster_name', 'lstmgen')}-rehearsal",
        "max_workers": int(source.get("max_workers", 2)),
        "upscaling_speed": float(source.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": idle_timeout_s / 60,
        # "external" + module: the fake provider itself, without the defaults file the wheel lacks
        "provider": {"type": "external", "module": FAKE_PROVIDER, "gcs_address": gcs_address,
                     "launch_multiple": True, "head_node_id": HEAD_NODE_ID},
        "auth": {"ssh_user": "ray"},
        "available_node_types": node_types,
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": empty, "file_mounts_sync_continuously": False,
        "rsync_exclude": empty, "rsync_filter": empty, "initialization_commands": empty, "setup_commands": empty,
        "head_setup_commands": empty, "worker_setup_commands": empty, "head_start_ray_commands": empty,
        "worker_start_ray_commands": empty,
    }


@dataclass
class Rehearsal:
    """A running rehearsal cluster: its job server URL, GCS address, and the env that reaches it."""

    url: str
    gcs_address: str
    temp_dir: str
    env: dict = field(repr=False)
    token_path: Path = field(repr=False)

    def _processes(self):
        return processes_under(self.temp_dir)

    def stop(self) -> None:
        """Stop every process of this cluster (and only those): head, autoscaler, nodes, workers."""
        stop_processes_under(self.temp_dir)
        Path(self.temp_dir).unlink(missing_ok=True)

    def nodes(self) -> list[dict]:
        """Alive worker nodes as {"id", "type", "resources"} (the head is not listed), from the
        job server's state API."""
        import psutil

        listed = self.state("nodes")
        types = {}
        for p in self._processes():  # the fake provider tells each node's raylet its type
            try:
                environ = p.environ()
            except psutil.Error:
                continue
            if environ.get(NODE_ID_ENV):
                types[environ[NODE_ID_ENV]] = environ.get("RAY_NODE_TYPE_NAME", "")
        return [{"id": n["node_id"], "type": types.get(n["node_id"], ""), "resources": n["resources_total"]}
                for n in listed if n["state"] == "ALIVE" and not n["is_head_node"]]

    def state(self, resource: str) -> list[dict]:
        """Ray's state API through the job server: ``nodes``, ``actors`` (alive or dead), ..."""
        request = urllib.request.Request(f"{self.url}/api/v0/{resource}?limit=10000&detail=true",
                                         headers={"authorization": f"Bearer {self.token_path.read_text().strip()}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["data"]["result"]["result"]

    def reclaim(self, node_id: str, notice_s: float = 30.0, quiet_polls: int = 0) -> float:
        """A spot reclaim as on AWS: the instance metadata (a fake service on loopback) announces
        it ``notice_s`` seconds ahead, the node's watcher (``python -m lstmgen.spot``) reads it
        and drains the node with reason preemption and that deadline, and at the deadline the node
        is killed. With ``quiet_polls``, the watcher first finds no notice (404) that many times.
        Blocks until the kill; returns its time."""
        metadata = FakeMetadata()
        try:
            watcher = subprocess.Popen([sys.executable, "-m", "lstmgen.spot", "--address", self.gcs_address, "--node-id", node_id,
                                        "--metadata-url", metadata.url, "--every", "0.5"],
                                       env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = time.time() + 60
            while metadata.polls() < quiet_polls and time.time() < deadline:
                time.sleep(0.1)
            metadata.reclaim_at = time.time() + notice_s
            try:
                out, _ = watcher.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                watcher.kill()
                out, _ = watcher.communicate()
        finally:
            metadata.stop()
        if watcher.returncode != 0:
            raise LstmgenError(f"the watcher did not drain node {node_id}: {out.strip()[-500:]}")
        time.sleep(max(0.0, metadata.reclaim_at - time.time()))
        self.kill_node(node_id)
        return time.time()

    def kill_node(self, node_id: str) -> int:
        """Take a worker node away the way a spot reclaim looks to Ray: SIGKILL its raylet and
        every process it started, with no warning. Returns how many processes were killed."""
        import psutil

        victims = []
        for p in self._processes():
            try:
                if p.environ().get(NODE_ID_ENV) == node_id:  # the node's raylet, and all it started
                    victims += [p, *p.children(recursive=True)]
            except psutil.Error:
                continue
        for p in victims:
            try:
                p.kill()
            except psutil.Error:
                pass
        return len(victims)


def start(workdir: Path, cluster_yaml: Path = CLUSTER_YAML, cpus_per_node: int = 1, head_cpus: int = 1,
          idle_timeout_s: float = 30.0, max_per_type: int | None = None, env: dict | None = None) -> Rehearsal:
    """Start the head (with the autoscaler); worker nodes start at cluster.yaml's min_workers and
    scale with demand. ``env`` is added to every node's environment (e.g. S3 endpoint, keys)."""
    workdir = Path(workdir).resolve()
    (workdir / "ray").mkdir(parents=True, exist_ok=True)
    link = tempfile.mktemp(prefix="lsr", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    os.symlink(workdir / "ray", link)
    config_path = workdir / "autoscaler.json"
    token_path = workdir / "auth_token"
    if not token_path.exists():
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
    token = token_path.read_text().strip()

    node_env = dict(os.environ)
    node_env.update(env or {})
    node_env.pop("RAY_ADDRESS", None)
    node_env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_USAGE_STATS_ENABLED="0",
                    RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, LSTMGEN_GPU_RESOURCE=GPU_STANDIN,
                    LSTMGEN_CLUSTER_CONFIG=str(config_path),  # what jobs read to know the largest cluster
                    RAY_TRAIN_ENABLE_PRINT_PATCH="0", RAY_DATA_LOG_LEVEL="WARNING",
                    # Autoscaler v2: it reconciles the provider's nodes with what Ray sees alive
                    # (a killed node is replaced) and publishes the node types' limits.
                    RAY_enable_autoscaler_v2="1", RAY_CLOUD_INSTANCE_ID=HEAD_NODE_ID, **{NODE_ID_ENV: HEAD_NODE_ID})
    ray_bin = str(Path(sys.executable).parent / "ray")
    for attempt in range(3):  # ports are picked free, but another process may take one before Ray binds it
        gcs_port, dashboard_port = free_port(), free_port()
        gcs_address = f"127.0.0.1:{gcs_port}"
        config = rehearsal_config(cluster_yaml, gcs_address, cpus_per_node, head_cpus, idle_timeout_s, max_per_type)
        config_path.write_text(json.dumps(config, indent=1))
        cmd = [ray_bin, "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
               f"--autoscaling-config={config_path}", f"--num-cpus={head_cpus}", f"--temp-dir={link}",
               f"--object-store-memory={NODE_OBJECT_STORE_BYTES}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}"]
        out = subprocess.run(cmd, env=node_env, capture_output=True, text=True, timeout=180)
        cluster = Rehearsal(f"http://127.0.0.1:{dashboard_port}", gcs_address, link, node_env, token_path)
        if out.returncode == 0:
            break
        stop_processes_under(link)
        lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
        if attempt == 2 or not any("port" in line for line in lines):
            Path(link).unlink(missing_ok=True)
            reason = next((line for line in lines if "rror" in line), lines[-1] if lines else "no output")
            raise LstmgenError(f"ray start --head failed: {reason}")
    try:
        wait_for_job_server(cluster.url, token, timeout=90)
    except LstmgenError:
        cluster.stop()
        raise
    (workdir / "cluster.json").write_text(json.dumps({"url": cluster.url, "gcs_address": gcs_address, "temp_dir": link}))
    return cluster


def attach(workdir: Path) -> Rehearsal:
    """The rehearsal cluster running from ``workdir`` (started by another process)."""
    workdir = Path(workdir).resolve()
    try:
        info = json.loads((workdir / "cluster.json").read_text())
        token = (workdir / "auth_token").read_text().strip()
    except (OSError, ValueError):
        raise LstmgenError(f"{workdir}: no rehearsal cluster here; start one with lstmgen cluster rehearse") from None
    if not any(True for _ in processes_under(info["temp_dir"])):
        raise LstmgenError(f"{workdir}: its rehearsal cluster is not running")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env.pop("RAY_ADDRESS", None)
    return Rehearsal(info["url"], info["gcs_address"], info["temp_dir"], env, workdir / "auth_token")


def wait_for_job_server(url: str, token: str, timeout: float) -> None:
    """Until ``GET /api/version`` answers (with this cluster's own token)."""
    request = urllib.request.Request(f"{url}/api/version", headers={"authorization": f"Bearer {token}"})
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                response.read()
            return
        except Exception as exc:  # noqa: BLE001 - not up yet
            if time.time() > deadline:
                raise LstmgenError(f"{url}: the job server did not answer in {timeout:.0f} s ({exc})") from None
            time.sleep(1)


class FakeMetadata:
    """The part of EC2's instance metadata service (IMDSv2) a spot watcher reads, on loopback: a
    session token (required), ``instance-life-cycle``, ``local-ipv4``, and
    ``spot/instance-action`` (404 until ``reclaim_at`` is set)."""

    def __init__(self, reclaim_at: float | None = None, life_cycle: str = "spot", unavailable: int = 0,
                 local_ipv4: str = "127.0.0.1"):
        self.reclaim_at, self.life_cycle, self.local_ipv4, self.requests = reclaim_at, life_cycle, local_ipv4, []
        self.unavailable = unavailable  # answer this many requests first with 503, as at boot
        metadata = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):  # noqa: N802
                metadata.requests.append(("PUT", self.path))
                if metadata.refuse():
                    return self._answer(503, None)
                if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "").isdigit():
                    return self._answer(400, None)  # as EC2: a token needs its TTL
                self._answer(200, "token-1" if self.path == "/latest/api/token" else None)

            def do_GET(self):  # noqa: N802
                metadata.requests.append(("GET", self.path))
                if metadata.refuse():
                    return self._answer(503, None)
                if self.headers.get("X-aws-ec2-metadata-token") != "token-1":
                    return self._answer(401, None)
                self._answer(200, metadata.answer(self.path.removeprefix("/latest/meta-data/")))

            def _answer(self, code: int, body: str | None):
                code = 404 if body is None and code == 200 else code
                self.send_response(code)
                self.end_headers()
                self.wfile.write((body or "").encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def refuse(self) -> bool:
        self.unavailable -= 1
        return self.unavailable >= 0

    def polls(self) -> int:
        """How often the notice was asked for."""
        return sum(1 for method, path in self.requests if method == "GET" and path.endswith("/spot/instance-action"))

    def answer(self, path: str) -> str | None:
        if path == "instance-life-cycle":
            return self.life_cycle
        if path == "local-ipv4":
            return self.local_ipv4
        if path == "spot/instance-action" and self.reclaim_at is not None:
            when = datetime.fromtimestamp(self.reclaim_at, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            return json.dumps({"action": "terminate", "time": when})
        return None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
