"""Where the distributed job's step time goes, against what the hardware gives.

For each worker count N, in one run on the same machine:

(a) the ceiling: N plain training loops at once (no Ray, no communication), each pinned to its
    own share of the cores with the threads a job worker gets, the job's model, optimizer,
    precision and carried-state batches;
(b) ``lstmgen train --workers N`` with default flags over ``--steps`` steps, its steps/s from
    ``--from-step`` on, evaluation and checkpoints included (the loop untimed);
(c) the same job with every part of the loop timed (``LSTMGEN_STEP_TIMES``, lstmgen/steptime.py):
    forward, backward, the gradient all-reduce, the optimizer, reading the round's batches, the
    agreement all-reduce, the reclaim-notice query, log lines, evaluation, metrics and checkpoints.

It prints (a)-(c) side by side, the breakdown per step, and the start-up milestones of (b)
(seconds from the command's start to each stage, up to the first step).

    python bench/step_time.py [--workers 1 2] [--steps 2000] [--from-step 200] [--gpu]
    python bench/step_time.py --allreduce ROUNDS [--workers 2] [--steps 800]   # DDP and the all-reduce alone
    python bench/step_time.py --idle-actors K [--workers 2] [--steps 800]      # what idle Ray actors cost
    python bench/step_time.py --in-actors ROUNDS [--workers 2] [--steps 800]   # the joined loops inside Ray actors

On a GPU machine (``--gpu``) each plain loop and each job worker takes one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
LSTMGEN = [sys.executable, "-m", "lstmgen.cli"]
COMPUTE = ("forward", "backward", "optimizer")


def plain_loop(data: str, steps: int, from_step: int, threads: int, gpu: bool, ddp: str) -> None:
    """One plain training loop, the job's step without Ray (run in its own process); with ``ddp``
    (RANK,WORLD,PORT,HOW) one of WORLD such loops joined by DistributedDataParallel over
    torch.distributed, the gradients not all-reduced (``none``: DDP's own cost), not all-reduced
    but the workers meeting once a step (``lockstep``), all-reduced by gloo (``gloo``) or as the job does it
    (``job``: through shared memory where the workers share a machine's CPUs)."""
    import torch
    import torch.distributed as dist

    from lstmgen import allreduce, steptime
    from lstmgen.config import TrainConfig
    from lstmgen.corpus import Vocab
    from lstmgen.model import CharLSTM, ModelConfig, bits_per_char, default_precision, detach
    from lstmgen.train import keep_freed_memory
    from lstmgen.windows import read_split, window_ids

    cfg = TrainConfig(data=data, run="")
    device = torch.device("cuda" if gpu else "cpu")
    torch.set_num_threads(threads)
    keep_freed_memory()
    vocab = Vocab.from_json(Path(data, "vocab.json").read_text())
    model = CharLSTM(ModelConfig(vocab_size=len(vocab), embed=cfg.embed, hidden=cfg.hidden, layers=cfg.layers,
                                 dropout=cfg.dropout, embed_dropout=cfg.embed_dropout, cell=cfg.cell)).to(device)
    opt = model.optimizer(cfg.lr, cfg.weight_decay)
    if ddp:
        *numbers, how = ddp.split(",")
        rank, world, port = map(int, numbers)
        dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        clock = steptime.StepClock(device, rank)
        if how in ("none", "lockstep"):
            _no_allreduce(model, clock, lockstep=how == "lockstep")
        else:
            reduce = allreduce.gradient_allreduce(model, device, rank, world) if how == "job" else None
            allreduce.register(model, reduce, world, clock)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=default_precision(device) == "bf16")
    ids = window_ids(read_split(data, "train")).astype(np.int64)
    seq = 64
    starts = np.random.default_rng(0).integers(0, len(ids) - (steps + 1) * seq - 1, cfg.batch_size)
    clock, carried = (clock if ddp else steptime.StepClock(device, 0)), None
    for step in range(steps):
        rows = np.stack([ids[s + step * seq: s + step * seq + seq + 1] for s in starts])
        batch = torch.from_numpy(rows).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        clock.lap("data")
        model.train()
        with amp:
            logits, carried = model(x, carried)
            loss = bits_per_char(logits.float(), y)
        carried = detach(carried)
        clock.lap("forward")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clock.lap("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        clock.lap("optimizer")
        clock.step_done(step + 1)
    clock.report()
    if ddp:
        dist.barrier()  # then leave: a gloo group torn down while its peer still reports can hang that peer
        sys.stdout.flush()
        os._exit(0)


def _no_allreduce(model, clock, lockstep: bool) -> None:
    """DDP with a hook that sums nothing: what DDP alone costs; with ``lockstep``, the workers still
    meet once a step (a one-number all-reduce), so each waits for the slowest as in the job."""
    import torch
    import torch.distributed as dist

    def hook(_state, bucket):
        clock.lap("backward")
        if lockstep:
            dist.all_reduce(torch.zeros(1))
            clock.lap("allreduce wait")
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    model.register_comm_hook(None, hook)


def ceiling(data: str, n: int, steps: int, from_step: int, gpu: bool, ddp: str = "") -> list[dict]:
    """N plain loops at once, each pinned to its share of the cores; their step_times. With ``ddp``
    (``none``, ``lockstep``, ``gloo`` or ``job``, see ``plain_loop``) the N loops are one DDP job
    (torch.distributed, no Ray)."""
    cores = sorted(os.sched_getaffinity(0))
    threads = max(1, len(cores) // n)
    procs, port = [], 29500 + os.getpid() % 1000
    for i in range(n):
        env = dict(os.environ, LSTMGEN_STEP_TIMES=str(from_step), CUDA_VISIBLE_DEVICES=str(i) if gpu else "")
        cmd = [sys.executable, __file__, "--plain", data, "--steps", str(steps), "--from-step", str(from_step),
               "--threads", str(threads)] + (["--gpu"] if gpu else []) + (["--ddp", f"{i},{n},{port},{ddp}"] if ddp else [])
        mine = cores[i * threads:(i + 1) * threads] or cores
        procs.append(subprocess.Popen(["taskset", "-c", ",".join(map(str, mine))] + cmd, env=env,
                                      stdout=subprocess.PIPE, text=True))
    return [_lines(p.communicate()[0], "step_times")[0] for p in procs]


def job(data: str, run: str, n: int, steps: int, setting: str, gpu: bool, extra: list[str]) -> tuple[list[dict], dict, float]:
    """``lstmgen train`` as a user runs it; (each rank's step_times, rank 0's startup, seconds)."""
    cmd = LSTMGEN + ["train", "--data", data, "--run", run, "--workers", str(n), "--max-steps", str(steps)]
    cmd += (["--gpu"] if gpu else []) + extra
    t0 = time.time()
    out = subprocess.run(cmd, env=dict(os.environ, LSTMGEN_STEP_TIMES=setting), capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"lstmgen train failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    times = sorted(_lines(out.stdout + out.stderr, "step_times"), key=lambda t: t["rank"])
    startup = (_lines(out.stdout + out.stderr, "startup") or [{}])[0]
    return times, startup, time.time() - t0


def _lines(text: str, tag: str) -> list[dict]:
    return [json.loads(line.split(tag + " ", 1)[1]) for line in text.splitlines() if tag + " {" in line]


def rate(t: dict) -> float:
    return t["steps"] / t["wall_s"]


def report(n: int, plain: list[dict], untimed: list[dict], timed: list[dict], startup: dict, steps: int, from_step: int) -> None:
    best = min(rate(t) for t in plain)
    job_rate, timed_rate = rate(untimed[0]), rate(timed[0])
    r0 = timed[0]
    parts = r0["parts"]
    bookkeeping = sum(parts.get(k, 0.0) for k in ("evaluate", "metrics", "checkpoint", "log"))
    between = r0["steps"] / (r0["wall_s"] - bookkeeping)
    print(f"\n== {n} worker(s), steps {from_step}..{steps}")
    print(f"{'':44} {'steps/s':>8} {'of ceiling':>10}")
    print(f"{'(a) plain loops, each (slowest)':44} {best:8.2f} {1.0:10.2f}   " + " ".join(f"{rate(t):.2f}" for t in plain))
    print(f"{'(b) lstmgen train, untimed':44} {job_rate:8.2f} {job_rate / best:10.2f}")
    print(f"{'(c) lstmgen train, every part timed':44} {timed_rate:8.2f} {timed_rate / best:10.2f}")
    print(f"{'    the same, between evaluations':44} {between:8.2f} {between / best:10.2f}")
    names = ["data", "agree", "notice", *COMPUTE, "allreduce wait", "allreduce", "log", "evaluate", "metrics", "checkpoint", "other"]
    print(f"\n{'part (rank 0; other ranks beside)':36} {'s':>8} {'% wall':>7} {'ms/step':>8} {'plain ms/step':>14} {'ranks ms/step':>14}")
    plain_parts = plain[0]["parts"]
    for name in names:
        s = parts.get(name, 0.0)
        others = " ".join(f"{t['parts'].get(name, 0.0) / t['steps'] * 1e3:.2f}" for t in timed[1:])
        base = f"{plain_parts[name] / plain[0]['steps'] * 1e3:.2f}" if name in plain_parts else ""
        print(f"{name:36} {s:8.2f} {100 * s / r0['wall_s']:6.1f}% {s / r0['steps'] * 1e3:8.2f} {base:>14} {others:>14}")
    print(f"{'wall':36} {r0['wall_s']:8.2f} {100.0:6.1f}% {r0['wall_s'] / r0['steps'] * 1e3:8.2f}"
          f" {plain[0]['wall_s'] / plain[0]['steps'] * 1e3:14.2f}")
    print(f"evaluation, metrics, checkpoints and log lines: {100 * bookkeeping / r0['wall_s']:.1f}% of the timed wall")
    if startup:
        print("start-up, seconds from the command's start: " + ", ".join(f"{k} {v:.1f}" for k, v in startup.items()))


def compare_allreduce(data: str, n: int, steps: int, from_step: int, gpu: bool, rounds: int) -> None:
    """N plain loops: alone, joined by DDP with no all-reduce, with the workers only kept in step,
    with gloo's all-reduce, and as the job joins its workers (shared memory on one machine's CPUs),
    alternated; steps/s and ms per step per part."""
    print(f"{'':26} {'steps/s':>8} {'of plain':>8}  ms/step: forward backward allreduce-wait allreduce optimizer")
    for _ in range(rounds):
        base = None
        for how in ("", "none", "lockstep", "gloo", "job"):
            times = ceiling(data, n, steps, from_step, gpu, ddp=how)
            slowest = min(rate(t) for t in times)
            base = base or slowest
            parts = times[0]["parts"]
            ms = " ".join(f"{parts.get(k, 0.0) / times[0]['steps'] * 1e3:6.2f}"
                          for k in ("forward", "backward", "allreduce wait", "allreduce", "optimizer"))
            print(f"{how and 'DDP, ' + how or 'plain, alone':26} {slowest:8.2f} {slowest / base:8.2f}  {ms}", flush=True)


def idle_actors(data: str, n: int, steps: int, from_step: int, gpu: bool, count: int) -> None:
    """N plain loops: alone, beside a local Ray with ``count`` idle actors (each a process whose
    main thread wakes about 100 times a second, as every Ray worker does), and beside the same Ray
    with the actors gone. What a job's helper actors cost the loops that train, with no training
    code of Ray's involved."""
    import ray

    def line(label: str) -> None:
        times = ceiling(data, n, steps, from_step, gpu)
        print(f"{label:34} " + " ".join(f"{rate(t):6.2f}" for t in times) + " steps/s", flush=True)

    line("plain loops alone")
    ray.init(num_cpus=count + n, include_dashboard=False, log_to_driver=False)
    idle = ray.remote(num_cpus=1)(type("Idle", (), {"ping": lambda self: 1}))
    actors = [idle.remote() for _ in range(count)]
    ray.get([a.ping.remote() for a in actors])
    line(f"beside {count} idle Ray actors")
    for actor in actors:
        ray.kill(actor)
    time.sleep(2)
    line("beside Ray, the actors gone")
    ray.shutdown()
    line("plain loops alone")


def in_actors(data: str, n: int, steps: int, from_step: int, gpu: bool, rounds: int) -> None:
    """The N loops joined as the job joins them (DDP, the job's all-reduce): as plain processes, and
    inside N actors of an embedded Ray started as ``lstmgen train`` starts it, each loop in a
    thread of its actor as Ray Train runs the training loop, pinned alike. What running inside
    Ray's worker processes costs, with no Ray Train (its controller and helper actors) involved."""
    import ray

    from lstmgen.runtime import init_ray

    @ray.remote(num_cpus=1)
    class Loop:
        def run(self, rank: int, port: int, cores: list[int], out: str) -> None:
            import threading

            os.sched_setaffinity(0, cores)
            os.environ["LSTMGEN_STEP_TIMES"] = str(from_step)
            sys.stdout = open(f"{out}/{rank}.txt", "w", buffering=1)  # plain_loop leaves through os._exit
            args = (data, steps, from_step, max(1, len(cores)), gpu, f"{rank},{n},{port},job")
            loop = threading.Thread(target=plain_loop, args=args)
            loop.start()
            loop.join()

    cores = sorted(os.sched_getaffinity(0))
    threads = max(1, len(cores) // n)
    print(f"{'':30} {'steps/s':>8} {'of plain':>8}  ms/step: forward backward allreduce-wait allreduce optimizer")
    init_ray(workers=n)
    for r in range(rounds):
        base = min(rate(t) for t in ceiling(data, n, steps, from_step, gpu, ddp="job"))
        with tempfile.TemporaryDirectory() as out:
            loops = [Loop.remote() for _ in range(n)]
            port = 29600 + (os.getpid() + r) % 300
            ray.wait([loop.run.remote(i, port, cores[i * threads:(i + 1) * threads] or cores, out)
                      for i, loop in enumerate(loops)], num_returns=n, timeout=30 * 60)
            times = [_lines(Path(out, f"{i}.txt").read_text(), "step_times")[0] for i in range(n)]
        parts = times[0]["parts"]
        ms = " ".join(f"{parts.get(k, 0.0) / times[0]['steps'] * 1e3:6.2f}"
                      for k in ("forward", "backward", "allreduce wait", "allreduce", "optimizer"))
        print(f"{'DDP as the job, no Ray':30} {base:8.2f} {1.0:8.2f}", flush=True)
        print(f"{'the same in Ray actors':30} {min(rate(t) for t in times):8.2f} {min(rate(t) for t in times) / base:8.2f}  {ms}",
              flush=True)
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--from-step", type=int, default=200)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--data", default="", help="prepared data (default: wiki.test.raw, prepared here)")
    ap.add_argument("--train-args", default="", help="extra flags for lstmgen train")
    ap.add_argument("--allreduce", type=int, default=0, metavar="ROUNDS",
                    help="instead: the plain loops, alone and joined by DDP over gloo and as the job all-reduces, ROUNDS times")
    ap.add_argument("--idle-actors", type=int, default=0, metavar="K",
                    help="instead: the plain loops alone and beside K idle Ray actors")
    ap.add_argument("--in-actors", type=int, default=0, metavar="ROUNDS",
                    help="instead: the loops joined as the job joins them, as processes and inside Ray actors, ROUNDS times")
    ap.add_argument("--plain", default="", help=argparse.SUPPRESS)  # one plain loop, in a subprocess
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--ddp", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain:
        return plain_loop(args.plain, args.steps, args.from_step, args.threads, args.gpu, args.ddp)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not data and not WIKI.exists():
            sys.exit(f"{WIKI} is missing: give prepared data with --data DIR")
        if not data:
            data = f"{tmp}/data"
            subprocess.run(LSTMGEN + ["prepare", "--corpus", str(WIKI), "--out", data], check=True, capture_output=True)
        if args.idle_actors:
            return idle_actors(data, max(args.workers), args.steps, args.from_step, args.gpu, args.idle_actors)
        if args.in_actors:
            return in_actors(data, max(args.workers), args.steps, args.from_step, args.gpu, args.in_actors)
        if args.allreduce:
            return compare_allreduce(data, max(args.workers), args.steps, args.from_step, args.gpu, args.allreduce)
        for n in args.workers:
            plain = ceiling(data, n, args.steps, args.from_step, args.gpu)
            untimed, startup, seconds = job(data, f"{tmp}/run{n}a", n, args.steps, f"{args.from_step},wall", args.gpu,
                                            args.train_args.split())
            timed, _, _ = job(data, f"{tmp}/run{n}b", n, args.steps, str(args.from_step), args.gpu, args.train_args.split())
            report(n, plain, untimed, timed, startup, args.steps, args.from_step)
            print(f"(b) took {seconds:.1f} s from the command's start to its end")


if __name__ == "__main__":
    main()
