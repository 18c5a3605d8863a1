"""Train job: Ray Train data-parallel workers over the explicit LSTM.

Reads top to bottom: the driver checks the data and the run directory, hands Ray Train a Ray
Data dataset of windows, and ``train_loop`` runs on every worker: build the model (restoring the
latest checkpoint if Ray Train hands one back after a failure or ``--resume``), then loop over
shuffled batches with AdamW, warmup + cosine LR and gradient clipping; every ``eval_every`` steps
rank 0 measures validation bits per character, writes ``metrics.jsonl`` and ``loss.png`` into the
run directory, and a checkpoint is reported to Ray Train, which keeps the best ``keep`` by
validation bpc plus the latest.

On restart the step counter, optimizer state and LR schedule continue from the checkpoint; the
data order does not replay: each (re)started epoch is a fresh shuffle, so a resumed run samples
windows as if the epoch had been reshuffled at the failure point.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lstmgen import capacity, checkpoint, storage
from lstmgen.config import TrainConfig
from lstmgen.corpus import Vocab
from lstmgen.errors import LstmgenError
from lstmgen.evaluate import stream_bits
from lstmgen.model import CharLSTM, ModelConfig, bits_per_char, detach
from lstmgen.windows import collate, split_stream, table_stream

MATERIALIZE_BYTES = 512 << 20  # prepared splits below this are held in the object store, shuffled per epoch
RESUMABLE = ("max_steps", "max_minutes", "workers", "workers_max", "gpu", "precision", "max_failures", "eval_every", "log_every", "keep",
             "wait_timeout", "shared_fs")


def train(cfg: TrainConfig) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    manifest = _read_manifest(cfg.data)
    for split in ("train", "valid"):
        if split in manifest["splits"] and not storage.is_dir(storage.join(cfg.data, split)):
            raise LstmgenError(f"{cfg.data}: the {split}/ directory named in manifest.json is missing")
    vocab = Vocab.from_json(storage.read_text(storage.join(cfg.data, "vocab.json")))
    storage.require_prefix(cfg.run)
    storage.check_bucket(cfg.run)
    cfg = _reconcile_run(cfg, vocab)
    _check_windows_per_worker(cfg, manifest)
    capacity.require_shared_storage({"--data": cfg.data, "--run": cfg.run}, cfg.shared_fs)
    bundle, use_gpu = capacity.bundle_for(cfg.gpu)
    capacity.require("train", bundle, cfg.workers, cfg.wait_timeout)
    _save_run(cfg, vocab)
    newest = checkpoint.latest_intact(cfg.run) if cfg.resume else None

    fs, run_path = storage.resolve(cfg.run)
    storage_path, name = run_path.rsplit("/", 1)
    data_fs, train_path = storage.resolve(storage.join(cfg.data, "train"))
    ray.data.DataContext.get_current().enable_progress_bars = False  # the workers print their own progress
    ds = ray.data.read_parquet(train_path, filesystem=data_fs, columns=["ids", "length", "index"])
    small = sum(s["bytes"] for s in manifest["sources"]) < MATERIALIZE_BYTES
    if small:
        ds = ds.materialize()
    if not cfg.carry_state:  # shuffled windows; with carried state each worker restores text order itself
        ds = ds.random_shuffle(seed=None) if small else ds.randomize_block_order()

    # Embedded Ray: split this machine's cores between the workers. On a cluster each worker
    # keeps the threads Ray gives its actor (OMP_NUM_THREADS from its CPU share).
    from lstmgen.runtime import embedded

    threads = max(1, (os.cpu_count() or 1) // cfg.workers) if embedded() else 0
    loop_config = {"train": asdict(cfg), "vocab": vocab.tokens, "seq_len": manifest["seq_len"],
                   "has_valid": manifest["splits"].get("valid", {}).get("windows", 0) > 0,
                   "threads": threads, "cluster": not embedded(),
                   "resume_from": {"path": newest.path, "step": newest.step} if newest else None}
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
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": ds},
    )
    workers = f"{cfg.workers}-{cfg.workers_max} (elastic)" if cfg.elastic else str(cfg.workers)
    print(f"train: {workers} worker(s) x batch {cfg.batch_size} x {manifest['seq_len']} chars -> {cfg.run}")
    result = trainer.fit()
    if result.error:
        raise result.error
    return dict(result.metrics or {})


def _check_windows_per_worker(cfg: TrainConfig, manifest: dict) -> None:
    """Refuse at once, on the driver, data too small to give every worker one batch: with carried
    state a worker needs ``batch_size`` streams of at least one window plus its random start."""
    windows = manifest["splits"]["train"]["windows"]
    most = max(cfg.workers, cfg.workers_max)
    need = cfg.batch_size + 2 if cfg.carry_state else cfg.batch_size
    if windows // most < need:
        raise LstmgenError(f"{cfg.data}: {windows} training windows cannot give each of {most} worker(s) a batch of "
                           f"{cfg.batch_size} (needs {need} per worker); lower --batch-size or --workers, or add text")


def _read_manifest(data: str) -> dict:
    path = storage.join(data, "manifest.json")
    if not storage.exists(path):
        raise LstmgenError(f"{data}: no manifest.json; run lstmgen prepare --out {data} first")
    return json.loads(storage.read_text(path))


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


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` down to ``lr / 10`` as
    ``progress`` (the larger of step and time fractions) goes to 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**config["train"])
    vocab_tokens, seq_len = config["vocab"], config["seq_len"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)

    model_cfg = ModelConfig(vocab_size=len(vocab_tokens), embed=cfg.embed, hidden=cfg.hidden,
                            layers=cfg.layers, dropout=cfg.dropout, embed_dropout=cfg.embed_dropout, cell=cfg.cell)
    model = CharLSTM(model_cfg)
    step, elapsed, history, state, resumed_from = 0, 0.0, [], None, 0
    restored = ray.train.get_checkpoint()  # Ray Train's latest: after a restart, or its record of the run
    if restored:
        with restored.as_directory() as d:
            state = torch.load(Path(d) / "model.pt", map_location="cpu", weights_only=True)
            history = json.loads((Path(d) / "meta.json").read_text()).get("history", [])
    newest = config["resume_from"]  # --resume: the newest intact checkpoint in the run directory
    if newest and (state is None or newest["step"] > state["step"]):  # Ray's record can lag a killed driver
        loaded = checkpoint.load(newest["path"])
        state, history = loaded.state, loaded.meta.get("history", [])
    if state is not None:
        model.load_state_dict(state["model"])
        step, elapsed = state["step"], state["elapsed"]
        resumed_from = step
        if rank == 0:
            print(f"train: resumed from step {step}")
    if config["cluster"]:  # where each worker landed, for the job's log (rank 0 prints them all:
        node = ray.get_runtime_context().get_node_id()  # Ray's log dedup would hide the others' lines)
        nodes = [node] * world
        if world > 1:
            dist.all_gather_object(nodes, node)
        for r, n in enumerate(nodes if rank == 0 else []):
            print(f"train: worker {r} of {world} on node {n}", flush=True)
    model = ray.train.torch.prepare_model(model)
    raw = model.module if hasattr(model, "module") else model
    decay = [p for n, p in raw.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in raw.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    if state is not None:
        opt.load_state_dict(state["optimizer"])

    valid = split_stream(cfg.data, "valid", cfg.val_chars) if config["has_valid"] else None
    shard = ray.train.get_dataset_shard("train")
    budget = cfg.max_minutes * 60
    precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")  # see model.py, "Precision"
    fail_at = int(os.environ.get("LSTMGEN_FAIL_AT_STEP", "0"))  # fault-injection hook for tests

    def agree(have_batch: bool) -> tuple[float, bool]:
        """One all-reduce per step: every worker learns the furthest progress (so all stop
        together) and whether every worker has a next batch (so an epoch ends for all when
        the shortest shard runs out; none waits in the gradient all-reduce while another
        waits at Ray Data's epoch barrier)."""
        p = max(step / cfg.max_steps, (elapsed + time.time() - t_start) / budget if budget else 0.0)
        if world == 1:
            return p, have_batch
        t = torch.tensor([p, 0.0 if have_batch else 1.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t[0].item(), t[1].item() == 0.0

    t_start = time.time()
    window_bits, window_steps, window_chars, t_window = 0.0, 0, 0, time.time()
    saved_step = step  # the step of the newest checkpoint (the restored one, or none at 0)

    def evaluate_and_report(lr: float, save: bool) -> None:
        """Validation bpc (every worker scores its share of the rows), the metrics row, and on
        rank 0 the metrics file, the plot and (``save``) a checkpoint."""
        nonlocal window_bits, window_steps, window_chars, t_window, saved_step
        now = time.time()
        train_bpc = window_bits / window_steps if window_steps else history[-1]["train_bpc"]  # none since the last row
        row = {"step": step, "train_bpc": train_bpc, "lr": lr,
               "chars_per_s": window_chars / max(1e-9, now - t_window),
               "elapsed_s": elapsed + now - t_start, "resumed_from": resumed_from, "workers": world}
        if valid is not None:
            part = torch.tensor(stream_bits(raw, valid, device=str(device), part=(rank, world)),
                                dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(part)
            row["val_bpc"] = float(part[0] / part[1])
        row.setdefault("val_bpc", row["train_bpc"])  # no valid split: rank by training loss
        history.append(row)
        _report(cfg, raw, opt, step, elapsed + now - t_start, row, history, vocab_tokens, model_cfg,
                rank, seq_len, save=save)
        window_bits, window_steps, window_chars, t_window = 0.0, 0, 0, time.time()
        saved_step = step if save else saved_step

    rng = np.random.default_rng(cfg.seed + step)  # the same on every worker
    progress, done, lr = 0.0, False, cfg.lr
    while not done:
        batches, carried, epoch_steps = epoch_batches(shard, cfg, seq_len, rng), None, 0
        batch = next(batches, None)
        progress, go = agree(batch is not None)
        done = progress >= 1.0
        while go and not done:
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            lr = lr_at(cfg, step, progress)
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            with amp:
                logits, carried = model(x, carried if cfg.carry_state else None)
                loss = bits_per_char(logits.float(), y)
            carried = detach(carried)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            step += 1
            epoch_steps += 1
            window_bits += loss.item()
            window_steps += 1
            window_chars += x.numel() * world
            if fail_at and step == fail_at and _first_failure(cfg.run):
                raise RuntimeError(f"injected failure at step {step} (LSTMGEN_FAIL_AT_STEP)")
            batch = next(batches, None)
            progress, go = agree(batch is not None)
            done = progress >= 1.0
            if rank == 0 and (step % cfg.log_every == 0 or done):
                rate = window_chars / max(1e-9, time.time() - t_window)
                print(f"step {step:6d} | {100 * progress:5.1f}% | train {window_bits / window_steps:.3f} bpc"
                      f" | lr {lr:.2e} | {rate / 1e3:.1f}k chars/s", flush=True)
            if step % cfg.eval_every == 0 or step % cfg.every_checkpoint == 0 or done:
                evaluate_and_report(lr, save=step % cfg.every_checkpoint == 0 or done)
        if done:
            break
        for _ in batches:  # read the rest of this epoch: Ray Data starts the next when every worker has
            pass
        if epoch_steps == 0:  # every worker sees the same agreed count, so all stop here together
            raise LstmgenError(f"{cfg.data}: an epoch gave some worker no batch of {cfg.batch_size}; "
                               "lower --batch-size or --workers")
    if step > saved_step:  # the budget ran out between epochs: the last steps still get their checkpoint
        evaluate_and_report(lr, save=True)


def epoch_batches(shard, cfg: TrainConfig, seq_len: int, rng: np.random.Generator):
    """One epoch of (inputs, targets) from this worker's shard.

    ``carry_state``: the shard's windows are put back in text order and cut into ``batch_size``
    contiguous streams read ``seq_len`` characters at a time, so the LSTM state is carried from
    one batch to the next (truncated backpropagation through time, as char-rnn trains; each
    epoch starts at a random offset). Otherwise: shuffled windows, each starting from zero state.
    """
    if not cfg.carry_state:
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow", drop_last=True,
                                        local_shuffle_buffer_size=cfg.batch_size * 8):
            yield collate(batch)
        return
    import pyarrow as pa

    tables = list(shard.iter_batches(batch_size=4096, batch_format="pyarrow"))
    if not tables:
        return
    ids = table_stream(pa.concat_tables(tables).sort_by("index"))
    ids = torch.from_numpy(ids[int(rng.integers(0, seq_len)) :])
    per_stream = (len(ids) - 1) // cfg.batch_size
    if per_stream < seq_len:
        return
    streams = ids[: cfg.batch_size * per_stream + 1]
    x_all = streams[:-1].view(cfg.batch_size, per_stream)
    y_all = streams[1:].view(cfg.batch_size, per_stream)
    for t in range(0, per_stream - seq_len + 1, seq_len):
        yield x_all[:, t : t + seq_len], y_all[:, t : t + seq_len]


def _report(cfg, raw, opt, step, elapsed, row, history, vocab_tokens, model_cfg, rank, seq_len, save) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(row)
        return
    print(f"step {step:6d} | valid {row['val_bpc']:.3f} bpc", flush=True)
    storage.write_text(storage.join(cfg.run, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in history))
    try:
        from lstmgen.report import plot

        plot(history, cfg.run)
    except Exception as exc:  # a plot must never stop training
        print(f"train: could not plot ({exc})")
    if not save:
        ray.train.report(row)
        return
    with tempfile.TemporaryDirectory() as d:
        state = {"model": raw.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed}
        meta = {"step": step, "metrics": row, "history": history, "train": asdict(cfg),
                "model": asdict(model_cfg), "vocab": vocab_tokens, "seq_len": seq_len}
        checkpoint.save(d, state, meta)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=checkpoint.checkpoint_name(step))


def _first_failure(run: str) -> bool:
    marker = storage.join(run, ".injected_failure")
    if storage.exists(marker):
        return False
    storage.write_text(marker, "1")
    return True
