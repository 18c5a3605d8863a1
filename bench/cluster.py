"""Multi-node figures on the rehearsal cluster (``lstmgen cluster rehearse``: cluster.yaml's node
types as separate raylets on this machine, the real autoscaler, SeaweedFS for S3). Prints:

1. seconds from ``lstmgen submit train --gpu --workers 2`` to the first training step, starting
   from zero worker nodes (the autoscaler starts two);
2. a node killed without notice (raylet SIGKILL) at a random moment, at several checkpoint
   intervals: steps and seconds of work lost, and the downtime until training runs again;
3. a spot reclaim with notice (``Rehearsal.reclaim``: the node's watcher reads a fake instance
   metadata notice, drains the node, the node is killed at the deadline): the step of the notice's
   checkpoint, the step resumed from, the training lost, and the downtime from the notice and from
   the kill to the next step;
4. what the per-step reclaim check costs: the workers' per-step all-reduce with and without the
   third value, and one ``ray.train.get_preemption_info()`` call (2 workers, embedded Ray);
5. training chars/s with 1, 2 and 4 workers, one per simulated node.

All nodes share this machine's cores, so (3) shows what the data-parallel plumbing costs, not
how a real cluster scales.

    python bench/cluster.py [--intervals 50,200] [--notice 30] [--seconds 45] [--parts cost,first,lost,reclaim,speed]
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


def wait_training_again(env: dict, job: str) -> str:
    """Until the job logs a training step after its last "resumed from step"; returns the log."""
    while True:
        text = logs(env, job)
        after = text.split("resumed from step")
        if len(after) > 1 and steps_in(after[-1]):
            return text
        check_running(env, job, text)
        time.sleep(0.5)


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
    time.sleep(random.uniform(0, interval / 15))  # a random moment within the next interval (~15 steps/s here)
    text = logs(env, job)
    nodes = {int(r): n for r, n in re.findall(r"train: worker (\d+) of \d+ on node ([0-9a-f]+)", text)}
    rate = re.findall(r"\| ([\d.]+)k chars/s", text)
    step_at_kill = max(steps_in(text))
    cluster.kill_node(nodes[1])
    killed = time.time()
    text = wait_training_again(env, job)
    downtime = time.time() - killed
    resumed = int(re.findall(r"resumed from step (\d+)", text)[-1])
    steps_per_s = float(rate[-1]) * 1e3 / (2 * 32 * 64) if rate else float("nan")
    wait_end(env, job)
    lost = step_at_kill - resumed
    return {"interval": interval, "step_at_kill": step_at_kill, "resumed": resumed, "steps_lost": lost,
            "work_lost_s": lost / steps_per_s, "downtime_s": downtime}


def reclaim(cluster, env: dict, notice_s: float) -> dict:
    """A reclaim with notice, ``notice_s`` ahead, of the node of worker 1, at a random moment."""
    job = submit(env, "notice", "--workers", "2", "--max-steps", "1000000", "--max-minutes", "1.5",
                 "--eval-every", "200", "--max-failures", "3")
    while not steps_in(text := logs(env, job)):
        check_running(env, job, text)
        time.sleep(0.5)
    time.sleep(random.uniform(5, 15))
    node = {int(r): n for r, n in re.findall(r"train: worker (\d+) of \d+ on node ([0-9a-f]+)", logs(env, job))}[1]
    noticed = time.time()
    killed = cluster.reclaim(node, notice_s)  # blocks until the node is killed at the deadline
    text = wait_training_again(env, job)
    back = time.time()
    saved = int(re.findall(r"reclaim notice for worker\(s\) \[[\d, ]+\]; checkpoint at step (\d+)", text)[-1])
    notice_at = text.index("reclaim notice for worker")
    before = text[: notice_at + text[notice_at:].index("resumed from step")]
    last_step = max(steps_in(before))  # the last step trained before the node went
    resumed = int(re.search(r"resumed from step (\d+)", text[notice_at:]).group(1))
    rate = re.findall(r"\| ([\d.]+)k chars/s", before)
    steps_per_s = float(rate[-1]) * 1e3 / (2 * 32 * 64) if rate else float("nan")
    wait_end(env, job)
    return {"notice_s": notice_s, "checkpoint": saved, "last_step": last_step, "resumed": resumed,
            "steps_lost": last_step - resumed, "work_lost_s": (last_step - resumed) / steps_per_s,
            "from_notice_s": back - noticed, "from_kill_s": back - killed, "restarts": text[notice_at:].count("resumed from step")}


def notice_cost(rounds: int = 7) -> dict:
    """Per-call cost of the workers' per-step all-reduce (2 and 3 values) and of Ray Train's
    reclaim notice, measured inside a 2-worker Ray Train run on an embedded Ray."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    def measure(config: dict) -> None:
        import torch
        import torch.distributed as dist

        out = {}
        for _ in range(config["rounds"]):  # interleaved, this machine is noisy
            for values in (2, 3, 4):
                t = torch.zeros(values)
                t0 = time.perf_counter()
                for _ in range(2000):
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                out.setdefault(f"allreduce{values}", []).append((time.perf_counter() - t0) / 2000)
            t0 = time.perf_counter()
            for _ in range(200):
                ray.train.get_preemption_info()
            out.setdefault("notice", []).append((time.perf_counter() - t0) / 200)
        if ray.train.get_context().get_world_rank() == 0:
            Path(config["out"]).write_text(json.dumps({k: sorted(v)[len(v) // 2] for k, v in out.items()}))

    out = Path(tempfile.mkdtemp(prefix="lstmgen-notice-")) / "cost.json"
    ray.init(num_cpus=3, include_dashboard=False)
    try:
        TorchTrainer(measure, train_loop_config={"rounds": rounds, "out": str(out)},
                     scaling_config=ray.train.ScalingConfig(num_workers=2)).fit()
        return json.loads(out.read_text())
    finally:
        ray.shutdown()


def throughput(cluster, env: dict, workers: int, seconds: float, s3) -> float:
    run = f"speed{workers}"
    job = submit(env, run, "--workers", str(workers), "--max-steps", "1000000", "--max-minutes", str(seconds / 60),
                 "--eval-every", "100000")
    wait_end(env, job)
    body = s3.client().get_object(Bucket=BUCKET, Key=f"{run}/metrics.jsonl")["Body"].read().decode()
    return json.loads(body.splitlines()[-1])["chars_per_s"]


def start_cluster(work: Path, s3) -> tuple[rehearse.Rehearsal, dict]:
    """The first 400,000 characters of WikiText-2 prepared into ``s3://bench/data``, and the
    rehearsal cluster with that S3; returns it and the env that submits jobs to it."""
    s3.client().create_bucket(Bucket=BUCKET)
    corpus = work / "corpus.txt"
    corpus.write_text(WIKI.read_text(encoding="utf-8")[:400_000], encoding="utf-8")
    env = dict(os.environ, **s3.env)
    r = cli(env, "prepare", "--corpus", str(corpus), "--out", f"s3://{BUCKET}/data")
    assert r.returncode == 0, r.stderr[-2000:]
    cluster = rehearse.start(work / "cluster", env=s3.env, idle_timeout_s=10, max_per_type=2)
    env.update(RAY_ADDRESS=cluster.url, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.env["RAY_AUTH_TOKEN"],
               LSTMGEN_CODE_ON_NODES=str(ROOT))
    return cluster, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", default="50,200", help="checkpoint intervals (steps) for the lost-node runs")
    parser.add_argument("--notice", type=float, default=30, help="seconds of notice before a reclaim")
    parser.add_argument("--seconds", type=float, default=45, help="training seconds per throughput run")
    parser.add_argument("--parts", default="cost,first,lost,reclaim,speed", help="which of the figures to measure")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "cost" in parts:
        cost = notice_cost()
        print(f"per-step all-reduce: {cost['allreduce2'] * 1e6:.0f} us with 2 values, {cost['allreduce3'] * 1e6:.0f} us with 3, "
              f"{cost['allreduce4'] * 1e6:.0f} us with 4; ray.train.get_preemption_info(): {cost['notice'] * 1e3:.2f} ms per call")
    work = Path(tempfile.mkdtemp(prefix="lstmgen-bench-cluster-"))
    s3 = s3server.start(work / "s3")
    cluster = None
    try:
        cluster, env = start_cluster(work, s3)
        if "first" in parts:
            print(f"submit -> first training step, from zero worker nodes: {first_step(cluster, env):.1f} s")
        if "lost" in parts:
            print(f"{'ckpt every':>10}  {'step at kill':>12}  {'resumed':>8}  {'steps lost':>10}  {'work lost':>9}  {'downtime':>8}")
            for interval in (int(i) for i in args.intervals.split(",")):
                r = lost_node(cluster, env, interval, s3)
                print(f"{r['interval']:>10}  {r['step_at_kill']:>12}  {r['resumed']:>8}  {r['steps_lost']:>10}  "
                      f"{r['work_lost_s']:>8.1f}s  {r['downtime_s']:>7.1f}s")
        if "reclaim" in parts:
            r = reclaim(cluster, env, args.notice)
            print(f"reclaim with {r['notice_s']:.0f} s notice: checkpoint at step {r['checkpoint']}, last step trained "
                  f"{r['last_step']}, resumed from {r['resumed']}: {r['steps_lost']} steps lost ({r['work_lost_s']:.1f} s of "
                  f"training); next step {r['from_notice_s']:.1f} s after the notice, {r['from_kill_s']:.1f} s after the kill "
                  f"({r['restarts']} restart(s))")
        if "speed" in parts:
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
