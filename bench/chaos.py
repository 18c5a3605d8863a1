"""A fault soak: one training run on the rehearsal cluster (``lstmgen cluster rehearse``, S3 on
SeaweedFS) under a random fault about once a minute, then what survived.

Faults, drawn at random: a training worker killed (SIGKILL), a worker node lost without notice
(its raylet and everything it started killed), a spot reclaim with notice (the node's watcher reads
the fake instance metadata, drains the node, the node is killed at the deadline), S3 unreachable
for 30 s (the server stopped with SIGSTOP), S3 answering slowly for 60 s (stopped and continued
every half second), and the driver killed (``lstmgen jobs stop``) and the run submitted again with
``--resume``. Then: faults by kind, whether the run finished, steps lost per fault against the
checkpoint interval (the last step logged before the fault against the step training resumed
from), metrics rows doubled or missing, and whether every checkpoint loads.

    python bench/chaos.py [--minutes 20] [--every 60] [--interval 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import BUCKET, cli, logs, start_cluster, status, steps_in  # noqa: E402  (bench/cluster.py)

from lstmgen import rehearse  # noqa: E402
from tests import s3server  # noqa: E402

KINDS = ("worker", "node", "notice", "s3_down", "s3_slow", "driver")
RUN = "soak"


def submit(env: dict, minutes: float, interval: int, resume: bool = False) -> str:
    r = cli(env, "submit", "train", "--gpu", "--data", f"s3://{BUCKET}/data", "--run", f"s3://{BUCKET}/{RUN}",
            "--workers", "2", "--hidden", "128", "--max-steps", "100000000", "--max-minutes", str(minutes),
            "--eval-every", str(interval), "--log-every", "10", "--max-failures", "1000", *(["--resume"] if resume else []))
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[0]


def worker_nodes(text: str) -> dict[int, str]:
    return {int(r): n for r, n in re.findall(r"train: worker (\d+) of \d+ on node ([0-9a-f]+)", text)}


def kill_a_worker(cluster) -> int:
    """SIGKILL one Ray Train worker process of the cluster's nodes."""
    import psutil

    nodes = {n["id"] for n in cluster.nodes()}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) and p.environ().get(rehearse.NODE_ID_ENV) in nodes:
                p.kill()
                return p.pid
        except psutil.Error:
            continue
    return 0


def s3_pause(s3, seconds: float, duty: float = 1.0) -> None:
    """The S3 server stopped for ``seconds`` (``duty`` < 1: stopped that share of every second)."""
    end = time.time() + seconds
    while time.time() < end:
        s3.process.send_signal(signal.SIGSTOP)
        time.sleep(min(end - time.time(), duty if duty < 1 else seconds))
        s3.process.send_signal(signal.SIGCONT)
        if duty < 1:
            time.sleep(1 - duty)


def inject(kind: str, cluster, env: dict, s3, job: str, args) -> str:
    """One fault; returns the job that trains the run afterwards (a new one after ``driver``)."""
    if kind == "worker":
        kill_a_worker(cluster)
    elif kind == "node":
        nodes = worker_nodes(logs(env, job))
        if nodes:
            cluster.kill_node(nodes[max(nodes)])
    elif kind == "notice":
        nodes = worker_nodes(logs(env, job))
        if nodes:
            cluster.reclaim(nodes[max(nodes)], notice_s=20)  # blocks until the node is killed at the deadline
    elif kind == "s3_down":
        s3_pause(s3, 30)
    elif kind == "s3_slow":
        s3_pause(s3, 60, duty=0.5)
    elif kind == "driver":
        cli(env, "jobs", "stop", job)
        while status(env, job) not in ("STOPPED", "FAILED", "SUCCEEDED"):
            time.sleep(1)
        job = submit(env, args.minutes, args.interval, resume=True)
    return job


def all_logs(env: dict, jobs: list[str]) -> str:
    return "".join(logs(env, j) for j in jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20, help="the run's training budget (--max-minutes)")
    parser.add_argument("--every", type=float, default=60, help="mean seconds between faults")
    parser.add_argument("--interval", type=int, default=100, help="--eval-every (a checkpoint with each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help="the faults to draw from")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="lstmgen-chaos-"))
    s3 = s3server.start(work / "s3")
    cluster = None
    faults: list[dict] = []
    try:
        cluster, env = start_cluster(work, s3)
        jobs = [submit(env, args.minutes, args.interval)]
        started = time.time()
        while not steps_in(logs(env, jobs[-1])):
            time.sleep(1)
        print(f"training from {time.time() - started:.0f} s; a fault about every {args.every:.0f} s", flush=True)
        while status(env, jobs[-1]) in ("PENDING", "RUNNING"):
            time.sleep(rng.uniform(0.5, 1.5) * args.every)
            if status(env, jobs[-1]) not in ("PENDING", "RUNNING"):
                break
            kind = rng.choice(args.kinds.split(","))
            before = steps_in(all_logs(env, jobs))
            fault = {"kind": kind, "at_s": round(time.time() - started), "last_step": max(before, default=0),
                     "log_at": len(all_logs(env, jobs))}
            job = inject(kind, cluster, env, s3, jobs[-1], args)
            jobs += [job] if job != jobs[-1] else []
            faults.append(fault)
            print(f"{fault['at_s']:5d} s  {kind:8s} at step {fault['last_step']}", flush=True)
        final = status(env, jobs[-1])
        text = all_logs(env, jobs)
        (work / "logs.txt").write_text(text + "".join(cli(env, "jobs", "status", j).stdout for j in jobs))
        print(f"the jobs' logs: {work / 'logs.txt'}")
    finally:
        if cluster:
            cluster.stop()
    try:
        report(faults, text, final, s3, args)
    finally:
        s3.stop()


def report(faults: list[dict], text: str, final: str, s3, args) -> None:
    """What survived: per fault the steps lost, then the run's rows and checkpoints."""
    from lstmgen import checkpoint

    # Each simulated node forwards the shared log directory, so a line can come once per node, and
    # late: a restart is where its "resumed from step" line first appears.
    first: dict[str, int] = {}
    for m in re.finditer(r"resumed from step (\d+)", text):
        first.setdefault(text[text.rfind("\n", 0, m.start()) + 1 : m.end()].split(") ", 1)[-1] + f"@{m.group(1)}", m.start())
    restarts = sorted((at, int(key.rsplit("@", 1)[1])) for key, at in first.items())
    ends = [f["log_at"] for f in faults[1:]] + [len(text)]
    for f, end in zip(faults, ends):  # the first restart after the fault and before the next one, if any
        after = [(at, step) for at, step in restarts if f["log_at"] < at < end]
        f["resumed"] = after[0][1] if after else None
        notice = re.search(r"reclaim notice for worker\(s\) \[[\d, ]*\]; checkpoint at step (\d+)", text[f["log_at"] : end])
        if notice:  # no step after a notice's checkpoint (step lines of the next attempt can come first: Ray's log dedup)
            f["last_step"] = int(notice.group(1))
        elif after:  # the last step trained before the restart (logged every 10) against the step resumed from
            f["last_step"] = max([f["last_step"], *steps_in(text[f["log_at"] : after[0][0]])])
        f["lost"] = max(0, f["last_step"] - f["resumed"]) if after else 0
    print(f"\nrun: {final}; faults: {dict(Counter(f['kind'] for f in faults))}")
    print(f"{'kind':8s}  {'at':>6s}  {'last step':>9s}  {'resumed':>7s}  {'lost':>5s}  (checkpoint every {args.interval})")
    for f in faults:
        print(f"{f['kind']:8s}  {f['at_s']:5d}s  {f['last_step']:9d}  {str(f['resumed']):>7s}  {f['lost']:5d}")
    client = s3.client()
    body = client.get_object(Bucket=BUCKET, Key=f"{RUN}/metrics.jsonl")["Body"].read().decode()
    steps = [json.loads(line)["step"] for line in body.splitlines() if line.strip()]
    expected = set(range(args.interval, max(steps) + 1, args.interval))
    doubled = len(steps) - len(set(steps))
    missing = sorted(expected - set(steps))
    print(f"metrics rows: {len(steps)}, last step {max(steps)}, doubled {doubled}, missing {len(missing)} {missing[:10]}, "
          f"in order: {steps == sorted(steps)}")
    for key, value in s3.env.items():
        os.environ[key] = value
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{RUN}/checkpoint_").get("Contents", [])
    names = sorted({m.group(0) for o in listed if (m := re.match(r"checkpoint_\d+$", o["Key"].split("/")[1]))})
    broken = []
    for name in names:
        try:
            checkpoint.load(f"s3://{BUCKET}/{RUN}/{name}").model()
        except Exception as exc:  # noqa: BLE001 - counted and named
            broken.append(f"{name}: {exc}")
    print(f"checkpoints: {len(names)} kept, {len(names) - len(broken)} load" + "".join(f"\n  {b}" for b in broken))
    print(f"restarts: {len(restarts)}; lost beyond one interval: "
          f"{sum(f['lost'] > args.interval for f in faults)}; lost with notice: {sum(f['lost'] for f in faults if f['kind'] == 'notice')}")


if __name__ == "__main__":
    main()
