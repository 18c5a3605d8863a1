"""Train job: Ray Train data-parallel workers over the explicit LSTM.

Reads top to bottom. ``train`` (the driver) checks the data, the run directory and the cluster's
capacity, then hands the work to Ray Train. ``train_loop`` runs on
every worker: restore the newest checkpoint if there is one, then one ``for`` loop over
``agreed_batches`` (the batches every worker agrees to train on, and where all of them stop): set
the LR (warmup, then cosine over the step or time budget), forward with the LSTM state carried
from the previous batch of the same text streams (truncated BPTT, as char-rnn trains;
``--shuffle-windows`` starts each window from zero instead), backward, clip, AdamW step, log;
every ``eval_every`` steps ``Reporter`` has the workers score the validation text together, and
rank 0 writes ``metrics.jsonl`` and ``loss.png`` into the run directory; every
``checkpoint_every`` steps (by default with each evaluation), at the end, and on a reclaim notice
it also reports a checkpoint to Ray Train, which keeps the best ``keep`` by validation bpc plus the
latest. Before each row and checkpoint the workers check that the driver still holds the run's
lease (``_fence``).

On restart (``--resume``, or Ray Train's after a failure) the workers load the newest intact
checkpoint in the run directory; the step counter, optimizer state and LR schedule continue from
it; the data position does not: a restarted worker begins a new epoch of its shard at a new random offset.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist

from lstmgen import allreduce, capacity, checkpoint, lease, steptime, storage, tracking
from lstmgen.config import TrainConfig
from lstmgen.corpus import Vocab
from lstmgen.errors import LstmgenError
from lstmgen.evaluate import carried_bits
from lstmgen.model import CharLSTM, ModelConfig, bits_per_char, default_precision, detach
from lstmgen.windows import SplitReader, Stream, check_prepared, collate, window_ids, worker_pieces

PIECE_WINDOWS = 4096  # the most windows in a piece a worker reads at a time (256 K characters at seq_len 64)
NOTICE_EVERY_S = 1.0  # how often the workers ask Ray Train for a reclaim notice (a spot node's drain)
RECLAIM_GRACE_S = 30.0  # after a notice's deadline, how long to wait for the reclaim before training on
RESUMABLE = ("max_steps", "max_minutes", "workers", "workers_max", "gpu", "precision", "max_failures", "eval_every", "log_every", "keep",
             "wait_timeout", "shared_fs", "mlflow", "mlflow_experiment")
SAMPLE_CHARS = 300  # the sample text each checkpoint's row carries (TensorBoard shows it)


def train(cfg: TrainConfig, callbacks: tuple = ()) -> dict:
    """The driver: check the data, the run directory and the cluster's capacity, take the run's
    lease, then hand the work to Ray Train. ``callbacks`` go to Ray Train's RunConfig (a Tune
    trial passes Tune's report callback)."""
    manifest, vocab = check_prepared(cfg.data, ("train", "valid"))  # damage no worker restart could fix ends the run here
    storage.require_prefix(cfg.run)
    storage.check_bucket(cfg.run)
    cfg = _reconcile_run(cfg, vocab)
    _check_windows_per_worker(cfg, manifest)
    capacity.require_shared_storage({"--data": cfg.data, "--run": cfg.run}, cfg.shared_fs)
    bundle, use_gpu = capacity.bundle_for(cfg.gpu)
    capacity.require("train", bundle, cfg.workers, cfg.wait_timeout)
    steptime.mark("checks")
    run_lease = lease.acquire(cfg.run)  # one writer per run; losing it interrupts this thread
    try:
        return _run_trainer(cfg, vocab, manifest, bundle, use_gpu, run_lease.holder["id"], callbacks)
    except KeyboardInterrupt:
        if run_lease.lost:
            raise LstmgenError(run_lease.lost) from None
        raise
    finally:
        run_lease.release()


def _run_trainer(cfg: TrainConfig, vocab: Vocab, manifest: dict, bundle: dict, use_gpu: bool, holder: str,
                 callbacks: tuple = ()) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    _save_run(cfg, vocab)
    mlflow_run = tracking.start_mlflow(cfg.mlflow, cfg.mlflow_experiment, cfg.run, asdict(cfg)) if cfg.mlflow else ""

    fs, run_path = storage.resolve(cfg.run)
    storage_path, name = run_path.rsplit("/", 1)
    # Each worker computes its own share of the windows (``worker_pieces``) and reads it from
    # Parquet as it trains (``epoch_batches``): nothing is read before the first step, and memory
    # is a few pieces per worker whatever the corpus size. No Ray Data here: its split coordinator
    # and stats actors would each wake 100 times a second on the cores that train.
    windows = manifest["splits"]["train"]["windows"]
    most = max(cfg.workers, cfg.workers_max)
    streams = most * (cfg.batch_size if cfg.carry_state else 1)  # every stream gets a piece
    piece_windows = min(PIECE_WINDOWS, windows // streams)

    # Embedded Ray: split this machine's cores between the workers. On a cluster each worker
    # keeps the threads Ray gives its actor (OMP_NUM_THREADS from its CPU share).
    from lstmgen.runtime import embedded

    threads = max(1, (os.cpu_count() or 1) // cfg.workers) if embedded() else 0
    steptime.mark("trainer")
    loop_config = {"train": asdict(cfg), "vocab": vocab.tokens, "seq_len": manifest["seq_len"],
                   "has_valid": manifest["splits"].get("valid", {}).get("windows", 0) > 0,
                   "threads": threads, "cluster": not embedded(), "milestones": steptime.milestones(), "holder": holder,
                   "mlflow_run": mlflow_run, "windows": windows, "piece_windows": piece_windows}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=(cfg.workers, cfg.workers_max) if cfg.elastic else cfg.workers,
                                               use_gpu=use_gpu, resources_per_worker=bundle),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep, checkpoint_score_attribute="val_bpc", checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures,
                                                   max_preemption_failures=-1),  # reclaims with or without notice: no limit
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
        ),
    )
    workers = f"{cfg.workers}-{cfg.workers_max} (elastic)" if cfg.elastic else str(cfg.workers)
    print(f"train: {workers} worker(s) x batch {cfg.batch_size} x {manifest['seq_len']} chars -> {cfg.run}")
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    if mlflow_run:  # the final checkpoint as the MLflow run's artifact
        final = storage.join(cfg.run, checkpoint.checkpoint_name(metrics["step"])) if "step" in metrics else None
        tracking.finish_mlflow(cfg.mlflow, mlflow_run, None if result.error else final, ok=not result.error)
    if result.error:
        raise result.error
    return metrics


def _check_windows_per_worker(cfg: TrainConfig, manifest: dict) -> None:
    """Refuse at once, on the driver, data too small to give every worker one batch: with carried
    state a worker needs ``batch_size`` streams of two windows (one, and its random start)."""
    windows = manifest["splits"]["train"]["windows"]
    most = max(cfg.workers, cfg.workers_max)
    need = 2 * cfg.batch_size if cfg.carry_state else cfg.batch_size
    if windows // most < need:
        raise LstmgenError(f"{cfg.data}: {windows} training windows cannot give each of {most} worker(s) a batch of "
                           f"{cfg.batch_size} (needs {need} per worker); lower --batch-size or --workers, or add text")


def _reconcile_run(cfg: TrainConfig, vocab: Vocab) -> TrainConfig:
    """A new run must not overwrite an old one; ``--resume`` continues it with its saved config
    (only the limits in ``RESUMABLE`` may change, and only those given as flags now) and only on
    data of the same vocabulary."""
    saved_path = storage.join(cfg.run, "train_config.json")
    vocab_path = storage.join(cfg.run, "vocab.json")
    has_run = storage.exists(saved_path)
    if cfg.resume:
        if not has_run:
            raise LstmgenError(f"{cfg.run}: nothing to resume (no train_config.json)")
        if storage.exists(vocab_path) and Vocab.from_json(storage.read_text(vocab_path)) != vocab:
            raise LstmgenError(f"{cfg.run}: this run was trained on data of another vocabulary than {cfg.data}")
        saved = json.loads(storage.read_text(saved_path))
        now = asdict(cfg)
        saved.update({key: now[key] for key in RESUMABLE if key in cfg.given})
        saved.update(resume=True, data=cfg.data, run=cfg.run, given=cfg.given)
        cfg = TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})
    elif has_run:
        raise LstmgenError(f"{cfg.run}: a run already exists here; pass --resume to continue it or choose another --run")
    return cfg


def _save_run(cfg: TrainConfig, vocab: Vocab) -> None:
    storage.write_text(storage.join(cfg.run, "train_config.json"), json.dumps(asdict(cfg), indent=1))
    storage.write_text(storage.join(cfg.run, "vocab.json"), vocab.to_json())


# ---------------------------------------------------------------------------------------------
# On every worker


def lr_at(cfg: TrainConfig, step: int, budget_used: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` down to ``lr * lr_floor`` as
    ``budget_used`` (the larger of the step and time fractions) goes to 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr_floor
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, budget_used))))


@dataclass
class Progress:
    """Where a run stands: what a checkpoint restores and every metrics row reports."""

    step: int = 0
    elapsed: float = 0.0  # training seconds before this (re)start
    resumed_from: int = 0  # the step this attempt started from (0: a fresh run)
    history: list[dict] = field(default_factory=list)  # one metrics row per evaluation
    started: float | None = None  # when this attempt's training started (not saved)

    def seconds(self) -> float:
        """Training seconds so far, over every attempt."""
        return self.elapsed + (time.time() - self.started if self.started is not None else 0.0)


@dataclass
class LossMeter:
    """Training loss and throughput since the last metrics row. The loss is summed as a tensor on
    the training device and read back only when a log line or a metrics row asks (``bpc``): on a
    GPU, reading it every step would wait for the step's kernels to finish before the next step
    could be queued."""

    bits: torch.Tensor | float = 0.0
    steps: int = 0
    chars: int = 0
    start: float = field(default_factory=time.time)

    def add(self, bpc: torch.Tensor, chars: int) -> None:
        self.bits, self.steps, self.chars = self.bits + bpc, self.steps + 1, self.chars + chars

    def bpc(self) -> float:
        return float(self.bits) / max(1, self.steps)

    def chars_per_s(self) -> float:
        return self.chars / max(1e-9, time.time() - self.start)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    A training step allocates and frees the same large buffers (activations, the recurrence's
    saved states and backward factors, gradients) every step. By default glibc may map a buffer
    over its mmap threshold fresh and unmap it when freed, or trim the heap under it; whether it
    does depends on the process's allocation history, and where it does, every step page-faults
    those buffers in again (a first write into a fresh 3.9 MB buffer: 0.68 ms, against 0.10 ms
    into reused memory; docs/results.md, "Training speed of the explicit cell"). With the
    threshold at glibc's maximum (32 MiB) and trimming only above 1 GiB, freed buffers are always
    reused. Process-wide; returns False, changing nothing, where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker. Lines marked ``# Ray`` are Ray Train's; the rest is plain
    PyTorch data-parallel training."""
    import ray
    import ray.train
    import ray.train.torch

    steptime.adopt(config["milestones"])
    steptime.mark("worker process", steptime.process_started())  # then Ray and torch imported, the process group set up
    steptime.mark("worker")
    cfg = TrainConfig(**config["train"])
    vocab, seq_len = config["vocab"], config["seq_len"]
    ctx = ray.train.get_context()  # Ray
    rank, world = ctx.get_world_rank(), ctx.get_world_size()  # Ray
    device = ray.train.torch.get_device()  # Ray
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    keep_freed_memory()
    torch.manual_seed(cfg.seed + rank)
    if config["cluster"]:
        _print_worker_nodes(ray.get_runtime_context().get_node_id(), rank, world)

    # model and optimizer, restored from the newest checkpoint when there is one
    model_cfg = ModelConfig(vocab_size=len(vocab), embed=cfg.embed, hidden=cfg.hidden, layers=cfg.layers,
                            dropout=cfg.dropout, embed_dropout=cfg.embed_dropout, cell=cfg.cell, weight_drop=cfg.weight_drop)
    model = CharLSTM(model_cfg)
    _fence(cfg.run, config["holder"], rank, world, device)  # a restart of a train that lost its run ends here
    state, progress = _restore(cfg.run, rank, world)
    steptime.mark("restore")
    if state is not None:
        model.load_state_dict(state["model"])
        if rank == 0:
            print(f"train: resumed from step {progress.step}", flush=True)
    model = ray.train.torch.prepare_model(  # Ray: DistributedDataParallel on the right device
        model, parallel_strategy_kwargs={"gradient_as_bucket_view": True})  # the gradients live in DDP's buckets: no copies
    raw_model = model.module if hasattr(model, "module") else model
    clock = steptime.StepClock(device, rank)
    # workers on one machine's CPUs all-reduce the gradients through shared memory, not gloo's TCP
    allreduce.register(model, allreduce.gradient_allreduce(raw_model, device, rank, world), world, clock)
    opt = raw_model.optimizer(cfg.lr, cfg.weight_decay)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    precision = cfg.precision or default_precision(device)  # decided here: each node's own hardware
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")  # see model.py, "Precision"
    if rank == 0:
        print(f"train: {precision} on {device.type}" + ("" if cfg.precision else " (--precision: the default here)"))

    # data: this worker's pieces of the windows, read from Parquet as the streams need them
    train_split = SplitReader(cfg.data, "train")
    valid = SplitReader(cfg.data, "valid") if config["has_valid"] else None  # read at each evaluation
    rng = np.random.default_rng(cfg.seed + progress.step)  # the same on every worker
    reporter = Reporter(cfg, rank, world, device, amp, raw_model, opt, model_cfg, vocab, seq_len, valid, config["holder"],
                        config.get("mlflow_run", ""))

    def epoch():  # every worker starts an epoch at the same step, so their shares never overlap
        listed = worker_pieces(config["windows"], config["piece_windows"], rank, world, seed=(cfg.seed, progress.step))
        return epoch_batches(listed, train_split, cfg, seq_len, rng)

    def time_used() -> float:  # the time fraction of the budget
        if progress.started is None:
            progress.started = time.time()  # the clock starts with the first batch: set-up is not training
        return progress.seconds() / (cfg.max_minutes * 60) if cfg.max_minutes else 0.0

    steptime.mark("model")
    losses, carried, lr, saved_step = LossMeter(), None, cfg.lr, progress.step
    notice = ray.train.get_preemption_info  # Ray: a node of this run is about to be reclaimed (spot)
    batches = agreed_batches(epoch, lambda: progress.step, time_used, notice, cfg, world, device, clock)
    for (x, y), used, reclaim in batches:
        if progress.step == progress.resumed_from:
            steptime.mark("first batch")
        # a reclaim notice: checkpoint now, then take no step the reclaim would throw away
        if reclaim is not None:
            if progress.step > saved_step:
                reporter.evaluate_and_report(progress, losses, lr, True, clock)
                losses, saved_step = LossMeter(), progress.step
            _hold_until_reclaimed(reclaim, progress.step, rank)
        # lr: warmup, then cosine over the step or time budget
        lr = lr_at(cfg, progress.step, used)
        for group in opt.param_groups:
            group["lr"] = lr
        # forward, from the LSTM state the previous batch of the same streams left
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        model.train()
        with amp:
            logits, carried = model(x, carried if cfg.carry_state else None)
            loss = bits_per_char(logits.float(), y)
        carried = detach(carried)  # the state goes on to the next batch; its gradient stops here (truncated BPTT)
        clock.lap("forward")
        # backward (DDP all-reduces the gradients), clip, step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clock.lap("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        progress.step += 1
        losses.add(loss.detach(), x.numel() * world)  # summed where it lies: no wait for the device here
        clock.lap("optimizer")
        _maybe_inject_failure(progress.step)
        # log (the only place an ordinary step reads a value back from the device)
        if rank == 0 and progress.step % cfg.log_every == 0:
            _log(progress.step, used, losses, lr)
            clock.lap("log")
        # evaluate, write the metrics row, checkpoint
        save = progress.step % cfg.checkpoint_interval == 0
        if save or progress.step % cfg.eval_every == 0:
            reporter.evaluate_and_report(progress, losses, lr, save, clock)
            losses, saved_step = LossMeter(), progress.step if save else saved_step
        if progress.step == progress.resumed_from + 1:
            steptime.mark("first step")
            if rank == 0:
                steptime.print_startup()
        clock.step_done(progress.step)

    # the budget is used up: the steps since the last checkpoint get theirs
    if progress.step > saved_step:
        if rank == 0 and progress.step % cfg.log_every:
            _log(progress.step, 1.0, losses, lr)
        reporter.evaluate_and_report(progress, losses, lr, True, clock)
    clock.report()


def _log(step: int, used: float, losses: LossMeter, lr: float) -> None:
    print(f"step {step:6d} | {100 * min(1.0, used):5.1f}% | train {losses.bpc():.3f} bpc"
          f" | lr {lr:.2e} | {losses.chars_per_s() / 1e3:.1f}k chars/s", flush=True)


def agreed_batches(epoch, step, time_used, notice, cfg: TrainConfig, world: int, device: torch.device,
                   clock: steptime.StepClock | None = None):
    """The batches every worker trains on, for as long as all of them go on; yields
    ``(batch, budget_used, reclaim)``.

    The workers agree once a round: the steps up to the next multiple of ``log_every``, so an
    ordinary step waits on no collective of its own (the log step reads values back anyway). Each
    worker first reads the round's batches ahead, then one all-reduce lets every worker learn
    three things: the largest time fraction of the budget used on any worker (the budget used is
    the larger of it and the step fraction, which every worker knows alike), so that all stop at
    the same step; how many of the round's batches every worker has, so that an epoch ends for all
    when the shortest shard runs out and no worker waits in the gradient all-reduce while another
    waits at the start of the next epoch; and whether ``NOTICE_EVERY_S`` has passed on any worker since
    the workers last asked ``notice()`` (Ray Train's reclaim notice, which every worker must ask at
    the same step). ``reclaim`` is a notice that was not there when last asked, with the first
    batch after it; otherwise None (a notice that stays is acted on once; one that is withdrawn and
    comes again, again). When an epoch ends, each worker drops the rest of its batches unread
    and ``epoch()`` starts the
    next one.
    """
    clock = clock or steptime.StepClock(device, 0)
    asked, standing = time.time(), None  # when the notice was last asked for, and what it was
    while True:
        batches, steps = epoch(), 0
        while True:
            round_steps = cfg.log_every - step() % cfg.log_every
            ahead = list(itertools.islice(batches, round_steps))
            clock.lap("data")
            time_frac, have, ask = _agree(time_used(), len(ahead), time.time() - asked >= NOTICE_EVERY_S, world, device)
            clock.lap("agree")
            if max(step() / cfg.max_steps, time_frac) >= 1.0:
                return
            reclaim = None
            if ask:
                latest, asked = notice(), time.time()
                reclaim, standing = (latest if standing is None else None), latest
                clock.lap("notice")
            for batch in ahead[:have]:
                used = max(step() / cfg.max_steps, time_frac)
                if used >= 1.0:
                    return
                yield batch, used, reclaim
                reclaim = None
                steps += 1
            if have < round_steps:
                break
        batches.close()  # the rest of this worker's epoch is not read (its shard already is)
        clock.lap("data")
        if steps == 0:  # every worker counts the same agreed steps, so all stop here together
            raise LstmgenError(f"{cfg.data}: an epoch gave some worker no batch of {cfg.batch_size}; "
                               "lower --batch-size or --workers")


def _agree(time_frac: float, have: int, ask: bool, world: int, device: torch.device) -> tuple[float, int, bool]:
    """The once-a-round all-reduce (MAX): the largest time fraction used, the fewest batches any
    worker has for the round (as the largest negative count), and whether any worker wants the
    reclaim notice asked for."""
    if world == 1:
        return time_frac, have, ask
    t = torch.tensor([time_frac, -float(have), float(ask)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    time_frac, neg_have, ask_any = t.tolist()
    return time_frac, int(-neg_have), ask_any > 0


def _hold_until_reclaimed(reclaim, step: int, rank: int) -> None:
    """After a reclaim notice's checkpoint, take no more steps: whatever is trained now would go
    with the node. Ray Train ends the workers at the notice's deadline and restarts the run on the
    nodes that remain, from that checkpoint (``_restore``). If the node is still here
    ``RECLAIM_GRACE_S`` after the deadline (the reclaim did not come), training goes on."""
    deadline = reclaim.deadline_ms / 1000 if reclaim.deadline_ms else time.time()
    if rank == 0:
        print(f"train: reclaim notice for worker(s) {reclaim.preempted_ranks}; checkpoint at step {step}, "
              f"waiting {max(0.0, deadline - time.time()):.0f} s for the node to go", flush=True)
    while time.time() < deadline + RECLAIM_GRACE_S:
        time.sleep(0.2)
    if rank == 0:
        print("train: the reclaim did not come; training goes on", flush=True)


def _fence(run: str, holder: str, rank: int, world: int, device: torch.device) -> None:
    """Every worker raises together unless the driver that started them still holds the run's
    lease (rank 0 reads it; one flag is all-reduced), so no worker writes for a train that lost
    its run. The workers of a train whose driver is paused or cut off keep training; this is what
    stops them. Checked at the start and before every metrics row and checkpoint."""
    lost = ""
    if rank == 0:
        try:
            lease.check_holder(run, holder)
        except LstmgenError as exc:
            lost = str(exc)
    if world > 1:
        flag = torch.tensor([float(bool(lost))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        lost = lost or (f"{run}: rank 0 found the run's lease not this train's, or unreadable" if flag.item() else "")
    if lost:
        raise LstmgenError(lost)


def _restore(run: str, rank: int, world: int) -> tuple[dict | None, Progress]:
    """The state to start from: the newest intact checkpoint in the run directory (its model.pt
    matches its meta.json), whoever restarts the run: ``--resume``, or Ray Train after a worker
    group restart. Ray Train's own record (``ray.train.get_checkpoint()``) can lag: its controller
    registers a reported checkpoint only when it next polls the workers, so one reported just
    before a node is lost is whole in the run directory and unknown to Ray. Rank 0 chooses, so
    every worker loads the same one."""
    chosen = [None]
    if rank == 0:
        newest = checkpoint.latest_intact(run)
        chosen = [newest.path if newest else None]
    if world > 1:
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        return None, Progress()
    loaded = checkpoint.load(chosen[0])
    state = loaded.state
    return state, Progress(step=state["step"], elapsed=state["elapsed"], resumed_from=state["step"],
                           history=loaded.meta.get("history", []))


def _print_worker_nodes(node: str, rank: int, world: int) -> None:
    """Where each worker landed, for the job's log. Rank 0 prints them all: Ray's log
    deduplication would hide the other workers' lines, which differ only in numbers."""
    nodes = [node] * world
    if world > 1:
        dist.all_gather_object(nodes, node)
    for r, n in enumerate(nodes if rank == 0 else []):
        print(f"train: worker {r} of {world} on node {n}", flush=True)


def epoch_batches(listed: list[dict], train_split: SplitReader, cfg: TrainConfig, seq_len: int,
                  rng: np.random.Generator):
    """One epoch of (inputs, targets) from this worker's pieces of consecutive windows (``listed``,
    from ``worker_pieces``), each read from Parquet only when it is needed.

    ``carry_state``: ``batch_size`` streams of contiguous text read ``seq_len`` characters at a
    time, so the LSTM state is carried from one batch to the next (truncated backpropagation
    through time, as char-rnn trains). A stream takes the shard's next piece when it runs out, so
    memory is a piece or two per stream whatever the corpus size. Where a stream moves on to its
    next piece, and where the next epoch starts, it jumps to another place in the text, and its
    state is carried across the jump as across an article boundary: the first characters after it
    are predicted from unrelated context, which costs a little loss and asks nothing the model does
    not already meet at every article start. Each epoch starts the streams at a random offset, so
    batch boundaries move from epoch to epoch; the epoch ends when a stream finds no piece left.

    Otherwise: each piece's windows shuffled, in batches that each start from zero state (the
    pieces come in a new order every epoch).

    A worker whose epoch the others end early stops reading at once: nothing more is decoded.
    """
    tables = (train_split.read(piece["start"], piece["stop"]) for piece in listed)  # each read when it is needed
    if not cfg.carry_state:
        for table in tables:
            table = table.take(rng.permutation(table.num_rows))
            for i in range(0, table.num_rows - cfg.batch_size + 1, cfg.batch_size):
                yield collate(table.slice(i, cfg.batch_size))
        return
    offset = int(rng.integers(0, seq_len))
    order = rng.permutation(len(listed))  # a new order every epoch: the pieces left half read at its end differ
    pieces = (window_ids(train_split.read(listed[i]["start"], listed[i]["stop"])) for i in order)
    streams = [Stream(pieces, skip=offset) for _ in range(cfg.batch_size)]
    while True:
        rows = [stream.take(seq_len) for stream in streams]
        if any(len(row) < seq_len + 1 for row in rows):
            return
        ids = torch.from_numpy(np.stack(rows).astype(np.int64))
        yield ids[:, :-1], ids[:, 1:]


@dataclass
class Reporter:
    """Evaluation and reporting on every worker: each scores its share of the validation rows,
    then rank 0 writes the metrics row and, when asked, the checkpoint."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    amp: torch.autocast  # the training precision, which validation uses too
    raw_model: CharLSTM
    opt: torch.optim.Optimizer
    model_cfg: ModelConfig
    vocab: list[str]
    seq_len: int
    valid: SplitReader | None
    holder: str  # the id of the run's lease this train holds: every row and checkpoint carries it
    mlflow_run: str = ""  # rank 0 logs every row to this MLflow run (--mlflow)

    def evaluate_and_report(self, progress: Progress, losses: LossMeter, lr: float, save: bool,
                            clock: steptime.StepClock) -> None:
        """Validation bpc (the rows split between the workers), the metrics row, and a checkpoint
        when ``save``."""
        import ray.train

        _fence(self.cfg.run, self.holder, self.rank, self.world, self.device)
        if progress.history and progress.history[-1]["step"] == progress.step:
            row = progress.history[-1]  # this step was scored a moment ago (its row is written): only the checkpoint is new
        else:
            train_bpc = losses.bpc() if losses.steps else progress.history[-1]["train_bpc"]
            seconds, cfg = progress.seconds(), self.cfg
            used = max(progress.step / cfg.max_steps, seconds / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0)
            row = {"step": progress.step, "train_bpc": train_bpc, "train_steps": losses.steps, "lr": lr,
                   "chars_per_s": losses.chars_per_s(), "elapsed_s": seconds, "budget_used": min(1.0, used), "time": time.time(),
                   "resumed_from": progress.resumed_from, "workers": self.world, "holder": self.holder}
            row["val_bpc"] = self._validation_bpc() if self.valid is not None else train_bpc  # no valid split: rank by training loss
            progress.history.append(row)
        clock.lap("evaluate")
        if self.rank != 0:
            ray.train.report(row)  # Ray: every worker reports; rank 0's checkpoint is the one kept
        else:
            self._publish(progress, row, save, clock)
        clock.lap("checkpoint" if save else "metrics")

    def _validation_bpc(self) -> float:
        """Scored forward only, so through the fused kernel (nn.LSTM: oneDNN, cuDNN) on the same
        weights, in the training precision: the same function as the explicit cell computes, about
        7x faster on a CPU (docs/results.md, "Where the step time goes")."""
        rnn = self.raw_model.rnn
        cell, rnn.cell = rnn.cell, "fused"
        try:
            with self.amp:
                part = carried_bits(self.raw_model, self.valid.rows(16, self.cfg.val_chars), device=str(self.device),
                                    part=(self.rank, self.world))
        finally:
            rnn.cell = cell
        total = torch.tensor(part, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1])

    def _sample(self) -> str:
        """A few hundred characters from the model as it stands, for the checkpoint's row."""
        from lstmgen.config import SampleConfig
        from lstmgen.generate import generate_batch

        prime = "\n" if "\n" in self.vocab else self.vocab[-1]
        self.raw_model.eval()
        try:
            with torch.no_grad(), self.amp:
                out = generate_batch(self.raw_model, Vocab(self.vocab), [prime], [self.cfg.seed],
                                     SampleConfig(length=SAMPLE_CHARS), device=str(self.device))
        finally:
            self.raw_model.train()
        return out[0]["text"]

    def _publish(self, progress: Progress, row: dict, save: bool, clock: steptime.StepClock) -> None:
        """Rank 0: metrics.jsonl and loss.png into the run directory, and the row (with a checkpoint
        when ``save``) to Ray Train, which persists the checkpoint and keeps the best ``--keep``."""
        import ray.train

        cfg = self.cfg
        print(f"step {progress.step:6d} | valid {row['val_bpc']:.3f} bpc", flush=True)
        if save and "sample" not in row:
            row["sample"] = self._sample()
        storage.write_text(storage.join(cfg.run, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in progress.history))
        try:
            from lstmgen.report import plot

            plot(progress.history, cfg.run)
            tracking.write_events(progress.history, cfg.run)
        except Exception as exc:  # a plot must never stop training
            print(f"train: could not plot ({exc})")
        if self.mlflow_run:
            tracking.log_row(cfg.mlflow, self.mlflow_run, row)
        clock.lap("metrics")
        if not save:
            ray.train.report(row)  # Ray
            return
        with tempfile.TemporaryDirectory() as d:
            state = {"model": self.raw_model.state_dict(), "optimizer": self.opt.state_dict(), "step": progress.step,
                     "elapsed": row["elapsed_s"]}
            meta = {"step": progress.step, "metrics": row, "history": progress.history, "train": asdict(cfg),
                    "model": asdict(self.model_cfg), "vocab": self.vocab, "seq_len": self.seq_len, "holder": self.holder}
            checkpoint.save(d, state, meta)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d),  # Ray: persisted to the run directory
                             checkpoint_dir_name=checkpoint.checkpoint_name(progress.step))


def _maybe_inject_failure(step: int) -> None:
    """For the fault tests only: ``LSTMGEN_FAIL_AT_STEP=N`` with ``LSTMGEN_FAIL_MARKER=FILE`` fails
    a worker once at step N (the marker file, outside the run directory, says it has happened)."""
    at, marker = os.environ.get("LSTMGEN_FAIL_AT_STEP"), os.environ.get("LSTMGEN_FAIL_MARKER")
    if not at or not marker or step != int(at):
        return
    try:
        with open(marker, "x") as f:  # only the first worker to get here, in the first attempt
            f.write(str(step))
    except FileExistsError:
        return
    raise RuntimeError(f"injected failure at step {step} (LSTMGEN_FAIL_AT_STEP)")
