"""The training loop: a run in process (Ray Train with two workers on the fast tier's local Ray),
the protocol by which the workers agree on every step, and the loader that feeds them (real
Parquet)."""

import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from lstmgen import checkpoint
from lstmgen import train as train_module
from lstmgen.config import PrepareConfig, TrainConfig, train_config
from lstmgen.corpus import Vocab
from lstmgen.errors import LstmgenError
from lstmgen.prepare import prepare
from lstmgen.report import short_rows
from lstmgen.train import agreed_batches, epoch_batches, train
from lstmgen.windows import SplitReader, pieces_of, read_split, worker_pieces

from .conftest import peak_memory

ROW_KEYS = {"step", "train_bpc", "train_steps", "lr", "chars_per_s", "elapsed_s", "budget_used", "time", "resumed_from", "workers",
            "val_bpc", "holder"}


def test_train_loop_in_process_learns_checkpoints_and_writes_every_row(ray_local, wiki_slice, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    prepare(PrepareConfig(out=str(data), corpus=[str(wiki_slice)]))
    cfg = train_config(data=str(data), run=str(run), workers=2, hidden=32, embed=16, max_steps=44, max_minutes=0.0,
                       eval_every=20, log_every=10, val_chars=4096, warmup_steps=5)
    metrics = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40, 44] and metrics["step"] == 44
    assert all(set(r) == ROW_KEYS | {"sample"} for r in rows)  # a checkpoint with each row, and a sample with each checkpoint
    assert all(r["workers"] == 2 for r in rows) and [r["budget_used"] for r in rows] == [20 / 44, 40 / 44, 1.0]
    assert [r["train_steps"] for r in rows] == [20, 20, 4] and short_rows(rows) == rows[-1:]  # plotted apart
    assert rows[1]["train_bpc"] < rows[0]["train_bpc"] - 0.5 and rows[1]["val_bpc"] < rows[0]["val_bpc"]  # it learns
    assert checkpoint.latest_intact(str(run)).step == 44  # the last steps got their checkpoint
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def _epochs(*lengths: int):
    """``epoch()`` for ``agreed_batches``: epochs of the given numbers of batches, and how far each was read."""
    read: list[int] = []

    def epoch():
        n = lengths[len(read)]
        read.append(0)
        for i in range(n):
            read[-1] += 1
            yield i

    return epoch, read


FAULTS = """
import ctypes, resource, sys, torch
from lstmgen.train import keep_freed_memory
# Both start from glibc's first threshold, held there: every freed buffer goes back to the kernel
# (glibc's own default moves the threshold with the process's history, so it is not a fixed baseline).
ctypes.CDLL(None).mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def steps(n):  # like a training step: several large buffers alive at once, then all freed
    for _ in range(n):
        buffers = [torch.ones(1 << 20) for _ in range(6)]  # 4 MiB each, written
        del buffers
steps(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(10)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    """Each worker calls keep_freed_memory: a step's large buffers, freed and allocated again, are
    not faulted in again from the kernel. Each case in its own process (the setting is process-wide)."""
    faults = {case: int(subprocess.run([sys.executable, "-c", FAULTS, case], capture_output=True, text=True,
                                       check=True).stdout) for case in ("returned", "keep")}
    assert faults["returned"] > 30_000, faults  # 10 steps x 6 buffers x 1,024 pages, faulted in again
    assert faults["keep"] * 10 < faults["returned"], faults


def _agreed(epoch, cfg: TrainConfig, taken: list, time_used=lambda: 0.0, notice=lambda: None):
    """``agreed_batches`` on one worker, the step counter being the batches taken."""
    return agreed_batches(epoch, lambda: len(taken), time_used, notice, cfg, 1, torch.device("cpu"))


def test_agreed_batches_go_on_across_epochs_and_stop_where_the_budget_ends():
    cfg = TrainConfig(data="d", run="r", max_steps=7, log_every=2)
    epoch, read = _epochs(3, 3, 3)
    taken: list[int] = []
    for batch, used, reclaim in _agreed(epoch, cfg, taken):
        assert used == len(taken) / 7 and reclaim is None
        taken.append(batch)
    assert taken == [0, 1, 2, 0, 1, 2, 0] and read == [3, 3, 2]  # read ahead to the end of each round


def test_agreed_batches_stop_on_the_time_budget_at_a_round_boundary():
    """The time budget is agreed once a round (log_every steps): the run stops at the first round
    boundary where it is used up, and never in the middle of a round."""
    cfg = TrainConfig(data="d", run="r", log_every=5)
    epoch, _ = _epochs(100)
    taken: list[int] = []
    asked: list[int] = []

    def time_used():
        asked.append(len(taken))
        return 1.0 if len(taken) >= 12 else 0.0

    for batch, _, _ in _agreed(epoch, cfg, taken, time_used):
        taken.append(batch)
    assert asked == [0, 5, 10, 15] and len(taken) == 15


def test_agreed_batches_refuse_an_epoch_without_a_batch():
    epoch, read = _epochs(2, 0)
    with pytest.raises(LstmgenError, match="no batch of 8"):
        list(_agreed(epoch, TrainConfig(data="d", run="r", batch_size=8), []))
    assert read == [2, 0]


def test_a_reclaim_notice_is_yielded_when_it_comes_and_again_only_after_it_was_withdrawn(monkeypatch):
    monkeypatch.setattr(train_module, "NOTICE_EVERY_S", 0.0)  # ask before every step
    answers = [None, None, "reclaim", "reclaim", None, "again", "again", None, None, None]
    asked: list[int] = []

    def notice():
        asked.append(len(asked))
        return answers[len(asked) - 1]

    epoch, _ = _epochs(10)
    steps: list = []
    for step in _agreed(epoch, TrainConfig(data="d", run="r", max_steps=10, log_every=1), steps, notice=notice):
        steps.append(step)
    assert len(asked) == 10  # asked on schedule (once a round, here every step), notice or not
    assert [reclaim for _, _, reclaim in steps] == [None, None, "reclaim", None, None, "again", None, None, None, None]


def _pieces(data: str, size: int, shuffle: bool = False) -> list[dict]:
    """One worker's pieces of a split's windows, as ``train_loop`` takes them (the text's order, or shuffled)."""
    return worker_pieces(SplitReader(data, "train").windows, size, 0, 1, seed=0 if shuffle else None)


def test_workers_share_each_epoch_without_overlap_in_a_new_order():
    windows, size = 10_007, 100
    everything = pieces_of(windows, size)
    for world in (1, 2, 3):
        shares = [worker_pieces(windows, size, rank, world, seed=(1, 0)) for rank in range(world)]
        starts = [p["start"] for share in shares for p in share]
        assert len({len(share) for share in shares}) == 1  # as many pieces each
        assert len(starts) == len(set(starts)) > len(everything) - world  # no piece twice, at most world-1 left out
        assert all(p in everything for share in shares for p in share)
    first, second = worker_pieces(windows, size, 0, 2, seed=(1, 0)), worker_pieces(windows, size, 0, 2, seed=(1, 500))
    assert first != second and first == worker_pieces(windows, size, 0, 2, seed=(1, 0))  # a new epoch, a new share; the same seed, the same
    assert worker_pieces(windows, size, 0, 1) == everything  # no seed: the text's order


def test_carried_state_streams_are_the_text_in_order(corpora):
    data, text = corpora["small"]
    vocab = Vocab.from_json(open(f"{data}/vocab.json").read())
    cfg = TrainConfig(data=data, run="", batch_size=4, carry_state=True)
    rng = np.random.default_rng(3)
    offset = int(rng.integers(0, 16))
    listed = pieces_of(SplitReader(data, "train").windows, 100)
    order = rng.permutation(len(listed))  # the epoch's order of the pieces
    batches = list(epoch_batches(_pieces(data, 100), SplitReader(data, "train"), cfg, 16, np.random.default_rng(3)))
    pieces = [(16 * listed[i]["start"], 16 * listed[i]["stop"]) for i in order]  # in characters, in the epoch's order
    assert len(batches) > 100 and all(x.shape == (4, 16) for x, _ in batches)
    second = []
    for row in range(4):
        xs = np.concatenate([x[row].numpy() for x, _ in batches])
        ys = np.concatenate([y[row].numpy() for _, y in batches])
        assert np.array_equal(xs[1:], ys[:-1])  # targets are the next characters
        # stream r took the epoch's piece r first: its text from the offset on
        a, b = pieces[row]
        assert vocab.decode(xs[: b - a - offset]) == text[a + offset : b]
        # then, whole and in order (after the last character of piece r, which it also holds), one of
        # the epoch's next four pieces: whichever was next when this stream ran out
        after = b - a - offset + 1
        second += [k for k in range(4, 8) if vocab.decode(xs[after : after + pieces[k][1] - pieces[k][0]]) == text[slice(*pieces[k])]]
    assert sorted(second) == [4, 5, 6, 7]


def test_carried_state_streams_jump_only_between_pieces(corpora):
    data, text = corpora["small"]
    vocab = Vocab.from_json(open(f"{data}/vocab.json").read())
    cfg = TrainConfig(data=data, run="", batch_size=4, carry_state=True)
    batches = list(epoch_batches(_pieces(data, 100, shuffle=True), SplitReader(data, "train"), cfg, 16, np.random.default_rng(1)))
    assert len(batches) > 100
    for row in range(4):
        stream = vocab.decode(np.concatenate([x[row].numpy() for x, _ in batches]))
        stretches = []  # the stream cut greedily into the longest stretches that lie in the text whole
        while stream:
            lo, hi = 1, len(stream)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if stream[:mid] in text else (lo, mid - 1)
            stretches.append(lo)
            stream = stream[lo:]
        assert len(stretches) > 1 and min(stretches[:-1]) >= 1500, stretches  # jumps only after a piece (~1590 characters)


def test_shuffled_windows_cover_the_epoch_once(corpora):
    data, _ = corpora["small"]
    cfg = TrainConfig(data=data, run="", batch_size=8, carry_state=False)
    windows = read_split(data, "train")
    rows = Counter(tuple(r) for r in windows.column("ids").to_pylist())
    seen = [tuple(x[i].tolist()) + (int(y[i, -1]),) for x, y in epoch_batches(_pieces(data, 1000, shuffle=True),
                                                                              SplitReader(data, "train"), cfg, 16,
                                                                              np.random.default_rng(0)) for i in range(8)]
    full = Counter(s for s in seen if s[-1] != -100)  # short windows end in padding
    assert len(seen) >= 0.98 * windows.num_rows
    assert all(rows[w] >= n for w, n in full.items())  # real windows, each at most as often as in the text
    where = {tuple(r): i for i, r in enumerate(windows.column("ids").to_pylist())}
    first = [where[w] for w in seen[:20] if w in where]
    assert first != sorted(first)  # out of text order


def test_training_loader_memory_does_not_grow_with_the_corpus(corpora):
    cfg = TrainConfig(data="", run="", batch_size=8, carry_state=True)

    def one_epoch(name: str) -> int:
        data = corpora[name][0]
        text = SplitReader(data, "train")
        steps = sum(1 for _ in epoch_batches(_pieces(data, 256), text, cfg, 16, np.random.default_rng(0)))
        assert steps >= text.windows // 8 * 0.9  # the whole epoch was read
        return steps

    peaks = {name: peak_memory(lambda n=name: one_epoch(n)) for name in ("small", "large")}
    # Ten times the text: the windows read stay a few pieces per stream; what grows is the epoch's
    # list of pieces (10x as many, a few numbers each) and what the cycle collector has not yet
    # freed, about 0.5-1 MB here depending on the process's history. Proportional growth would be 10x.
    assert peaks["large"] <= 2 * peaks["small"], peaks




def _two_workers_agree(rank: int, port: int, out: str) -> None:
    """One of two real processes joined by gloo: worker 0's epochs hold 7, 9, 5 batches, worker
    1's 12, 4, 5; each runs ``agreed_batches`` with rounds of 3 steps and a budget of 11 steps."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    epoch, read = _epochs(*((7, 9, 5) if rank == 0 else (12, 4, 5)))
    taken: list = []
    cfg = TrainConfig(data="d", run="r", max_steps=11, log_every=3)
    for batch, _, _ in agreed_batches(epoch, lambda: len(taken), lambda: 0.0, lambda: None, cfg, 2, torch.device("cpu")):
        taken.append(batch)
    Path(out, f"{rank}.json").write_text(json.dumps({"taken": taken, "read": read}))
    dist.destroy_process_group()


def test_two_workers_end_each_epoch_together_where_the_shorter_shard_ends(tmp_path):
    """Two real processes and a real all-reduce: the workers read a round's batches ahead and
    agree on the fewest, so each epoch ends for both where the shorter one runs out (7, then 4),
    and both take the same steps. Fails if a worker trains a batch its peer does not have."""
    port = 29400 + os.getpid() % 500
    torch.multiprocessing.spawn(_two_workers_agree, args=(port, str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert got[0]["taken"] == got[1]["taken"] == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    # each reads no further into an epoch than the rounds it took part in, and one batch of the last
    assert got[0]["read"] == [7, 5, 1] and got[1]["read"] == [9, 4, 1]


def _counting_loop(config: dict) -> None:
    """``train_loop`` with every read of a tensor's value back into Python counted, by the step it
    falls in (the step ``lr_at`` was last asked about), written to RUN/reads-RANK.json."""
    import ray.train

    from lstmgen import train as train_mod

    reads: list = []
    current = [None]
    lr_at = train_mod.lr_at

    def counting_lr_at(cfg, step, used):
        current[0] = step
        return lr_at(cfg, step, used)

    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__", "__bool__")}

    def counted(original):
        def read(self, *args, **kwargs):
            reads.append(current[0])
            return original(self, *args, **kwargs)
        return read

    train_mod.lr_at = counting_lr_at
    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        train_mod.train_loop(config)
    finally:
        train_mod.lr_at = lr_at
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    rank = ray.train.get_context().get_world_rank()
    Path(config["train"]["run"], f"reads-{rank}.json").write_text(json.dumps(reads))


def test_ordinary_steps_read_nothing_back_from_the_device(ray_local, wiki_slice, tmp_path, monkeypatch):
    """On a GPU every read of a tensor's value into Python (``.item()``, ``float()``, ...) waits
    for the queued kernels. Counted in the real loop on two Ray Train workers: the 147 steps that
    are not log steps read nothing (the loss is summed where it lies and read at log steps, and the
    workers agree once a round, at log steps); the log steps do read, which shows the count works.
    Fails on a loop that reads the loss (``loss.item()``) or agrees every step."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(train_module, "train_loop", _counting_loop)
    data, run = tmp_path / "data", tmp_path / "run"
    prepare(PrepareConfig(out=str(data), corpus=[str(wiki_slice)]))
    # batch 2: an epoch is longer than the run, so no epoch boundary (where the workers agree again) falls in it
    train(train_config(data=str(data), run=str(run), workers=2, hidden=32, embed=16, batch_size=2, max_steps=150,
                       max_minutes=0.0, log_every=50, eval_every=1000, val_chars=4096))
    for rank in (0, 1):
        reads = Counter(json.loads((run / f"reads-{rank}.json").read_text()))
        ordinary = {step: n for step, n in reads.items() if step is not None and (step + 1) % 50}
        assert ordinary == {}, (rank, reads)
        assert reads[49] > 0 and reads[99] > 0, (rank, reads)  # each round's agreement (and rank 0's log line)


def _one_worker_sees_the_notice_first(config: dict) -> None:
    """On two Ray Train workers: rank 1 alone has a reclaim notice from the start, rank 0 gets
    one only at its step 30 (as when the controller's notice reaches the workers at different
    moments). Each writes the steps at which ``agreed_batches`` handed it a reclaim."""
    import ray.train
    from ray.train import PreemptionInfo
    from ray.train.v2._internal.execution.context import get_train_context  # Ray's own per-worker notice slot

    train_module.NOTICE_EVERY_S = 0.0  # ask at every round
    rank = ray.train.get_context().get_world_rank()
    slot = get_train_context().preemption_context
    notice = PreemptionInfo(deadline_ms=int(time.time() * 1000) + 60_000, preempted_node_to_ranks={"n": [1]})
    slot.preemption_info = notice if rank == 1 else None
    cfg = TrainConfig(data="d", run="r", max_steps=60, log_every=10)
    step, reclaims = [0], []
    for _, _, reclaim in agreed_batches(lambda: (i for i in range(1000)), lambda: step[0], lambda: 0.0,
                                        ray.train.get_preemption_info, cfg, 2, torch.device("cpu")):
        if reclaim is not None:
            reclaims.append(step[0])
        step[0] += 1
        if rank == 0 and step[0] == 30:
            slot.preemption_info = notice
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(reclaims))


@pytest.mark.slow
def test_a_reclaim_notice_seen_by_one_worker_first_is_acted_on_by_all_at_the_same_step(ray_local, tmp_path):
    """Both workers must take the notice's checkpoint at the same step, or neither (else one waits
    in the checkpoint's collectives while the other runs its backward into the gradient
    all-reduce). The workers ask at the same agreed step, and Ray Train's
    ``get_preemption_info`` hands every worker rank 0's answer: this pins both, through real Ray
    Train workers and its real synchronisation actor."""
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(_one_worker_sees_the_notice_first, train_loop_config={"out": str(tmp_path)},
                           scaling_config=ray.train.ScalingConfig(num_workers=2),
                           run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="notice"))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        trainer.fit()
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1] == [30], seen  # not at rank 1's early notice; together at the first round after rank 0's
