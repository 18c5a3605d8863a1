"""Multi-node on one machine: the rehearsal cluster (lstmgen.rehearse, cluster.yaml's node types on
Ray's fake multi-node provider, real autoscaler, a raylet per node) with SeaweedFS for storage.
Scale from zero and back, a node lost mid-run, the driver lost mid-run, and refusals that come in
seconds instead of a wait that never ends."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from lstmgen import rehearse

from .conftest import one_line_error, run_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BUCKET = "rehearsal"
DATA = f"s3://{BUCKET}/data"


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory, wiki_slice):
    s3.client().create_bucket(Bucket=BUCKET)
    r = run_cli("prepare", "--corpus", str(wiki_slice), "--out", DATA, env=s3.env)
    assert r.returncode == 0, r.stderr[-2000:]
    c = rehearse.start(tmp_path_factory.mktemp("rehearsal"), env=s3.env, idle_timeout_s=10, max_per_type=2)
    yield c
    c.stop()


def _env(cluster, s3) -> dict:
    return dict(s3.env, RAY_ADDRESS=cluster.url, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.env["RAY_AUTH_TOKEN"],
                LSTMGEN_CODE_ON_NODES=str(ROOT))  # as `lstmgen cluster rehearse` tells the user to set


def _wait(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)


def _worker_nodes(logs: str, world: int = 2) -> dict[int, str]:
    """rank -> node id, from the job's 'train: worker R of W on node ID' lines of its last attempt
    with ``world`` workers (read before any node is lost: see _train_workers)."""
    first = f"train: worker 0 of {world} on"
    last = logs[logs.rfind(first):] if first in logs else ""
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"train: worker (\d+) of \d+ on node ([0-9a-f]+)", last)}


def _train_workers(cluster) -> dict[str, str]:
    """Every Ray Train worker actor the cluster has started, alive or dead: actor id -> node id,
    from Ray's state API. (The job log is no record of the last attempt: on one machine every
    fake node's log monitor reads the same log directory, and a node that starts late can print
    an earlier attempt's lines again.)"""
    return {a["actor_id"]: a["node_id"] for a in cluster.state("actors") if a["class_name"] == "RayTrainWorker"}


def _metrics(s3, prefix: str) -> list[dict]:
    body = s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}/metrics.jsonl")["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


def _checkpoints(s3, prefix: str) -> list[int]:
    """Steps of the complete checkpoints (meta.json is written last) under the run."""
    listed = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/").get("Contents", [])
    return sorted(int(m.group(1)) for o in listed if (m := re.search(r"/checkpoint_(\d+)/meta\.json$", o["Key"])))


def _job_status(cluster, s3, job_id: str) -> str:
    r = run_cli("jobs", "status", job_id, env=_env(cluster, s3))
    return r.stdout.split(":", 1)[1].split()[0] if r.returncode == 0 and ":" in r.stdout else ""


def _submit_timed_run(env: dict, run: str, workers: str, minutes: str) -> str:
    """A --gpu training job with a time budget, checkpoints every 100 steps; returns its id."""
    r = run_cli("submit", "train", "--gpu", "--workers", workers, "--data", DATA, "--run", f"s3://{BUCKET}/{run}",
                "--max-steps", "1000000", "--max-minutes", minutes, "--hidden", "32", "--eval-every", "100",
                "--max-failures", "3", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[0]


def _while_running(cluster, s3, job_id: str, predicate, timeout: float, what: str, every: float = 0.5):
    """Wait for ``predicate`` while the job runs; if the job ends first or the time runs out, fail
    with what explains it: the job's status and log, the worker nodes, the autoscaler's log."""
    deadline, checked = time.time() + timeout, time.time()
    while not (value := predicate()):
        status = ""
        if time.time() - checked > 10 or time.time() > deadline:  # the CLI costs a core for a second
            status, checked = _job_status(cluster, s3, job_id), time.time()
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.time() > deadline:
            logs = run_cli("jobs", "logs", job_id, env=_env(cluster, s3)).stdout
            monitor = sorted(Path(cluster.temp_dir).glob("session_latest/logs/monitor.log"))
            autoscaler = monitor[0].read_text(errors="replace")[-3000:] if monitor else "(no monitor.log)"
            pytest.fail(f"no {what} after {timeout - (deadline - time.time()):.0f} s; job {status or '?'}; "
                        f"worker nodes {cluster.nodes()}\n--- job log ---\n{logs[-5000:]}\n"
                        f"--- autoscaler ---\n{autoscaler}")
        time.sleep(every)
    return value


def _logs_once_succeeded(cluster, s3, job_id: str) -> str:
    env = _env(cluster, s3)
    _wait(lambda: _job_status(cluster, s3, job_id) in ("SUCCEEDED", "FAILED", "STOPPED"), 480, "the job to end", every=3)
    logs = run_cli("jobs", "logs", job_id, env=env).stdout
    assert _job_status(cluster, s3, job_id) == "SUCCEEDED", logs[-3000:]
    return logs


def _assert_went_on_elsewhere(cluster, before: dict[str, str], lost: str) -> None:
    """Training went on in new worker actors (``before``: _train_workers before the loss), none on ``lost``."""
    restarted_on = [node for actor, node in _train_workers(cluster).items() if actor not in before]
    assert len(restarted_on) >= 2 and lost not in restarted_on, restarted_on


def test_train_scales_from_zero_loses_no_step_to_a_reclaim_notice_and_scales_back(cluster, s3):
    env, run = _env(cluster, s3), "runs/zero"
    _wait(lambda: not cluster.nodes(), 90, "the cluster to start at zero worker nodes")
    r = run_cli("submit", "train", "--gpu", "--workers", "2", "--data", DATA, "--run", f"s3://{BUCKET}/{run}",
                "--max-steps", "1000", "--hidden", "32", "--eval-every", "100000", "--log-every", "50", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    job_id = r.stdout.strip().splitlines()[0]
    logs = lambda: run_cli("jobs", "logs", job_id, env=env).stdout  # noqa: E731
    _while_running(cluster, s3, job_id, lambda: "step    100 |" in logs(), 420, "step 100")
    nodes = _worker_nodes(logs())
    assert sorted(nodes) == [0, 1] and nodes[0] != nodes[1], nodes  # two workers, two worker nodes
    assert rehearse.HEAD_NODE_ID not in nodes.values()
    # A spot reclaim with notice: the node's watcher finds no notice (404) a few times, then one
    # 15 s ahead; it drains the node, and the node is killed when the 15 s are up.
    before = _train_workers(cluster)
    cluster.reclaim(nodes[1], notice_s=15, quiet_polls=3)
    text = _logs_once_succeeded(cluster, s3, job_id)
    noticed = re.search(r"reclaim notice for worker\(s\) \[1\]; checkpoint at step (\d+), waiting (\d+) s", text)
    assert noticed, text[-5000:]
    step = int(noticed.group(1))
    assert 0 < int(noticed.group(2)) <= 15  # the drain carried the deadline the metadata gave
    rows = _metrics(s3, run)
    assert [row["step"] for row in rows] == [step, 1000], rows  # the notice's checkpoint, then the end
    assert rows[-1]["resumed_from"] == step, rows  # resumed from exactly the notice's step: no step lost
    _assert_went_on_elsewhere(cluster, before, nodes[1])
    _wait(lambda: not cluster.nodes(), 120, "idle worker nodes to be terminated")


def test_resume_after_the_driver_is_killed_on_the_cluster(cluster, s3):
    env, run = _env(cluster, s3), "runs/driver"
    _wait(lambda: not cluster.nodes(), 120, "the cluster to settle at zero worker nodes")
    args = ["--data", DATA, "--run", f"s3://{BUCKET}/{run}", "--gpu", "--workers", "2"]
    r = run_cli("submit", "train", *args, "--max-steps", "100000", "--hidden", "32", "--eval-every", "20", env=env)
    job_id = r.stdout.strip().splitlines()[0]
    _while_running(cluster, s3, job_id, lambda: 60 in _checkpoints(s3, run), 420, "checkpoint 60")
    drivers = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("python")
               and "jobs/train.py" in p.info["cmdline"] and f"s3://{BUCKET}/{run}" in p.info["cmdline"]]
    assert len(drivers) == 1
    drivers[0].send_signal(signal.SIGKILL)
    _wait(lambda: _job_status(cluster, s3, job_id) in ("FAILED", "STOPPED"), 120, "the job to be marked ended", every=2)
    r = run_cli("submit", "train", *args, "--resume", "--max-steps", "100", "--follow", env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _metrics(s3, run)
    assert rows[-1]["step"] == 100 and rows[-1]["resumed_from"] >= 40
    assert [row["step"] for row in rows] == sorted({row["step"] for row in rows})


def test_impossible_requests_fail_in_seconds_with_one_line(cluster, s3):
    env = _env(cluster, s3)
    t0 = time.time()  # 2 node types x 2 nodes x 1 GPU stand-in: 5 GPU workers can never be placed
    r = run_cli("submit", "train", "--gpu", "--workers", "5", "--data", DATA, "--run", f"s3://{BUCKET}/runs/big",
                "--follow", env=env, timeout=300)
    assert r.returncode == 1 and "asks for 5 x {CPU: 1, rehearsal_gpu: 1}" in r.stdout and "at most 4" in r.stdout, r.stdout[-2000:]
    assert time.time() - t0 < 90
    r = run_cli("submit", "train", "--data", DATA, "--run", "/tmp/not-shared", "--follow", env=env, timeout=300)
    assert r.returncode == 1 and "--run /tmp/not-shared is a local path" in r.stdout and "s3://" in r.stdout, r.stdout[-2000:]


def test_embedded_gpu_request_without_a_gpu_fails_at_once(tmp_path, wiki_slice):
    r = run_cli("prepare", "--corpus", str(wiki_slice), "--out", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr[-2000:]
    t0 = time.time()
    one_line_error(run_cli("train", "--data", str(tmp_path / "d"), "--run", str(tmp_path / "r"), "--gpu", timeout=120),
                   "asks for 2 x {CPU: 1, GPU: 1}", "no GPU anywhere")
    assert time.time() - t0 < 60 and not (tmp_path / "r" / "train_config.json").exists()


def test_elastic_workers_grow_and_a_node_lost_just_after_a_checkpoint_costs_nothing_before_it(cluster, s3):
    env, run = _env(cluster, s3), "runs/elastic"
    job_id = _submit_timed_run(env, run, "1-2", "1.5")
    _while_running(cluster, s3, job_id, lambda: _checkpoints(s3, run) and any(row["workers"] == 2 for row in _metrics(s3, run)),
                   420, "metrics from two workers")
    nodes = _worker_nodes(run_cli("jobs", "logs", job_id, env=env).stdout)
    # Lost without notice just after the next checkpoint is complete on S3, before Ray Train's
    # controller has registered it: the restart must still start from it.
    newest = _checkpoints(s3, run)[-1]
    _while_running(cluster, s3, job_id, lambda: _checkpoints(s3, run)[-1] > newest, 120, "the next checkpoint", every=0.1)
    newest = _checkpoints(s3, run)[-1]
    before = _train_workers(cluster)
    assert cluster.kill_node(nodes[1]) > 0  # the raylet and its workers SIGKILLed, no warning
    _logs_once_succeeded(cluster, s3, job_id)
    rows = _metrics(s3, run)
    sizes = [row["workers"] for row in rows]
    print("workers per metrics row:", sizes, "; node lost after checkpoint", newest)
    assert sizes[0] in (1, 2) and 2 in sizes
    assert rows[-1]["elapsed_s"] >= 80  # the time budget was trained (by the fastest worker's clock)
    assert all(row["resumed_from"] >= newest for row in rows if row["step"] > newest), (newest, rows)
    assert [row["step"] for row in rows] == sorted({row["step"] for row in rows})
    _assert_went_on_elsewhere(cluster, before, nodes[1])
