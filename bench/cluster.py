"""Multi-node figures on the rehearsal cluster (``lstmgen cluster rehearse``: cluster.yaml's node
types as separate raylets on this machine, the real autoscaler, SeaweedFS for S3). Prints:

1. seconds from ``lstmgen submit train --gpu --workers 2`` to the first training step, starting
   from zero worker nodes (the autoscaler starts two);
2. a node killed (raylet SIGKILL, as a spot reclaim looks) mid-run at several checkpoint
   intervals: steps and seconds of work lost, and the downtime until training runs again;
3. training chars/s with 1, 2 and 4 workers, one per simulated node.

All nodes share this machine's cores, so (3) shows what the data-parallel plumbing costs, not
how a real cluster scales.

    python bench/cluster.py [--intervals 50,200] [--seconds 45]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lstmgen import rehearse  # noqa: E402
from tests import s3server  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
BUCKET = "bench"


def cli(env: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lstmgen.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def logs(env: dict, job_id: str) -> str:
    return cli(env, "jobs", "logs", job_id).stdout


def status(env: dict, job_id: str) -> str:
    out = cli(env, "jobs", "status", job_id).stdout
    return out.split(":", 1)[1].split()[0] if ":" in out else ""


def check_running(env: dict, job_id: str, text: str) -> None:
    if status(env, job_id) in ("FAILED", "STOPPED"):
        raise SystemExit(f"job {job_id} ended early:\n{text[-3000:]}")


def steps_in(text: str) -> list[int]:
    return [int(s) for s in re.findall(r"step\s+(\d+) \|\s+[\d.]+%", text)]


def wait_nodes_gone(cluster, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while cluster.nodes() and time.time() < deadline:
        time.sleep(2)


def submit(env: dict, run: str, *flags: str) -> str:
    r = cli(env, "submit", "train", "--gpu", "--data", f"s3://{BUCKET}/data", "--run", f"s3://{BUCKET}/{run}",
            "--hidden", "128", "--log-every", "1", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[0]


def wait_end(env: dict, job_id: str, timeout: float = 900) -> str:
    deadline = time.time() + timeout
    while (s := status(env, job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.time() < deadline:
        time.sleep(2)
    return s


def first_step(cluster, env: dict) -> float:
    wait_nodes_gone(cluster)
    t0 = time.time()
    job = submit(env, "zero", "--workers", "2", "--max-steps", "20", "--eval-every", "20")
    while not steps_in(text := logs(env, job)):
        check_running(env, job, text)
        time.sleep(0.5)
    seconds = time.time() - t0
    wait_end(env, job)
    return seconds


def lost_node(cluster, env: dict, interval: int, s3) -> dict:
    run = f"lost{interval}"
    job = submit(env, run, "--workers", "2", "--max-steps", "1000000", "--max-minutes", "1.5",
                 "--eval-every", str(interval), "--max-failures", "3")
    client = s3.client()

    def checkpoints() -> list[int]:
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{run}/").get("Contents", [])
        return sorted(int(m.group(1)) for o in listed if (m := re.search(r"/checkpoint_(\d+)/meta\.json$", o["Key"])))

    while len(checkpoints()) < 2:
        check_running(env, job, "")
        time.sleep(0.5)
    time.sleep(interval / 2 / 15)  # about half an interval on (~15 steps/s here)
    text = logs(env, job)
    nodes = {int(r): n for r, n in re.findall(r"train: worker (\d+) of \d+ on node ([0-9a-f]+)", text)}
    rate = re.findall(r"\| ([\d.]+)k chars/s", text)
    step_at_kill = max(steps_in(text))
    cluster.kill_node(nodes[1])
    killed = time.time()
    while True:  # training runs again: a step line after "resumed from step"
        text = logs(env, job)
        after = text.split("resumed from step")
        if len(after) > 1 and steps_in(after[-1]):
            break
        check_running(env, job, text)
        time.sleep(0.5)
    downtime = time.time() - killed
    resumed = int(re.findall(r"resumed from step (\d+)", text)[-1])
    steps_per_s = float(rate[-1]) * 1e3 / (2 * 32 * 64) if rate else float("nan")
    wait_end(env, job)
    lost = step_at_kill - resumed
    return {"interval": interval, "step_at_kill": step_at_kill, "resumed": resumed, "steps_lost": lost,
            "work_lost_s": lost / steps_per_s, "downtime_s": downtime}


def throughput(cluster, env: dict, workers: int, seconds: float, s3) -> float:
    run = f"speed{workers}"
    job = submit(env, run, "--workers", str(workers), "--max-steps", "1000000", "--max-minutes", str(seconds / 60),
                 "--eval-every", "100000")
    wait_end(env, job)
    body = s3.client().get_object(Bucket=BUCKET, Key=f"{run}/metrics.jsonl")["Body"].read().decode()
    return json.loads(body.splitlines()[-1])["chars_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", default="50,200", help="checkpoint intervals (steps) for the lost-node runs")
    parser.add_argument("--seconds", type=float, default=45, help="training seconds per throughput run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lstmgen-bench-cluster-"))
    s3 = s3server.start(work / "s3")
    cluster = None
    try:
        s3.client().create_bucket(Bucket=BUCKET)
        corpus = work / "corpus.txt"
        corpus.write_text(WIKI.read_text(encoding="utf-8")[:400_000], encoding="utf-8")
        env = dict(os.environ, **s3.env)
        r = cli(env, "prepare", "--corpus", str(corpus), "--out", f"s3://{BUCKET}/data")
        assert r.returncode == 0, r.stderr[-2000:]
        cluster = rehearse.start(work / "cluster", env=s3.env, idle_timeout_s=10, max_per_type=2)
        env.update(RAY_ADDRESS=cluster.url, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.env["RAY_AUTH_TOKEN"],
                   LSTMGEN_CODE_ON_NODES=str(ROOT))
        print(f"submit -> first training step, from zero worker nodes: {first_step(cluster, env):.1f} s")
        print(f"{'ckpt every':>10}  {'step at kill':>12}  {'resumed':>8}  {'steps lost':>10}  {'work lost':>9}  {'downtime':>8}")
        for interval in (int(i) for i in args.intervals.split(",")):
            r = lost_node(cluster, env, interval, s3)
            print(f"{r['interval']:>10}  {r['step_at_kill']:>12}  {r['resumed']:>8}  {r['steps_lost']:>10}  "
                  f"{r['work_lost_s']:>8.1f}s  {r['downtime_s']:>7.1f}s")
        rates = {n: throughput(cluster, env, n, args.seconds, s3) for n in (1, 2, 4)}
        print("workers  chars/s   vs 1 worker")
        for n, rate in rates.items():
            print(f"{n:>7}  {rate / 1e3:6.1f}k  {rate / rates[1]:5.2f}x")
    finally:
        if cluster:
            cluster.stop()
        s3.stop()


if __name__ == "__main__":
    main()
