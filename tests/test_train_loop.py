"""The training loop: a run in process (Ray Train with two workers on the fast tier's local Ray),
the protocol by which the workers agree on every step, and the loader that feeds them (real Ray
Data, real Parquet)."""

import json
import platform
import subprocess
import sys
from collections import Counter

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
from lstmgen.windows import SplitReader, pieces_of, read_split

from .conftest import peak_traced

ROW_KEYS = {"step", "train_bpc", "train_steps", "lr", "chars_per_s", "elapsed_s", "resumed_from", "workers", "val_bpc"}


def test_train_loop_in_process_learns_checkpoints_and_writes_every_row(ray_local, wiki_slice, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    prepare(PrepareConfig(out=str(data), corpus=[str(wiki_slice)]))
    cfg = train_config(data=str(data), run=str(run), workers=2, hidden=32, embed=16, max_steps=44, max_minutes=0.0,
                       eval_every=20, log_every=10, val_chars=4096, warmup_steps=5)
    metrics = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40, 44] and metrics["step"] == 44
    assert all(set(r) == ROW_KEYS for r in rows) and all(r["workers"] == 2 for r in rows)
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


def test_agreed_batches_go_on_across_epochs_and_stop_where_the_budget_ends():
    cfg = TrainConfig(data="d", run="r")
    epoch, read = _epochs(3, 3, 3)
    taken: list[int] = []
    for batch, used, reclaim in agreed_batches(epoch, lambda: len(taken) / 7, lambda: None, cfg, 1, torch.device("cpu")):
        assert used == len(taken) / 7 and reclaim is None
        taken.append(batch)
    assert taken == [0, 1, 2, 0, 1, 2, 0] and read == [3, 3, 2]  # one batch read ahead


def test_agreed_batches_refuse_an_epoch_without_a_batch():
    epoch, read = _epochs(2, 0)
    with pytest.raises(LstmgenError, match="no batch of 8"):
        list(agreed_batches(epoch, lambda: 0.0, lambda: None, TrainConfig(data="d", run="r", batch_size=8), 1, torch.device("cpu")))
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
    for step in agreed_batches(epoch, lambda: len(steps) / 10, notice, TrainConfig(data="d", run="r"), 1, torch.device("cpu")):
        steps.append(step)
    assert len(asked) == 10  # asked on schedule, notice or not
    assert [reclaim for _, _, reclaim in steps] == [None, None, "reclaim", None, None, "again", None, None, None, None]


def _shard(data: str, size: int, shuffle: bool = False):
    """A real Ray Data iterator over the pieces of a split's windows, as ``train`` builds it."""
    ds = ray.data.from_items(pieces_of(SplitReader(data, "train").windows, size))
    return (ds.random_shuffle(seed=0) if shuffle else ds).iterator()


def test_carried_state_streams_are_the_text_in_order(corpora):
    data, text = corpora["small"]
    vocab = Vocab.from_json(open(f"{data}/vocab.json").read())
    cfg = TrainConfig(data=data, run="", batch_size=4, carry_state=True)
    offset = int(np.random.default_rng(3).integers(0, 16))
    batches = list(epoch_batches(_shard(data, 100), SplitReader(data, "train"), cfg, 16, np.random.default_rng(3)))
    pieces = [(16 * p["start"], 16 * p["stop"]) for p in pieces_of(SplitReader(data, "train").windows, 100)]  # in characters
    assert len(batches) > 100 and all(x.shape == (4, 16) for x, _ in batches)
    for row in range(4):
        xs = np.concatenate([x[row].numpy() for x, _ in batches])
        ys = np.concatenate([y[row].numpy() for _, y in batches])
        assert np.array_equal(xs[1:], ys[:-1])  # targets are the next characters
        # stream r took pieces r, r + 4, ...: first piece r's text from the offset on
        (a, b), (c, d) = pieces[row], pieces[row + 4]
        assert vocab.decode(xs[: b - a - offset]) == text[a + offset : b]
        # then piece r + 4 in order (after the last character of piece r, which it also holds)
        after = b - a - offset + 1
        assert vocab.decode(xs[after : after + d - c]) == text[c:d]


def test_carried_state_streams_jump_only_between_pieces(corpora):
    data, text = corpora["small"]
    vocab = Vocab.from_json(open(f"{data}/vocab.json").read())
    cfg = TrainConfig(data=data, run="", batch_size=4, carry_state=True)
    batches = list(epoch_batches(_shard(data, 100, shuffle=True), SplitReader(data, "train"), cfg, 16, np.random.default_rng(1)))
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
    seen = [tuple(x[i].tolist()) + (int(y[i, -1]),) for x, y in epoch_batches(_shard(data, 1000, shuffle=True),
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
        steps = sum(1 for _ in epoch_batches(_shard(data, 256), text, cfg, 16, np.random.default_rng(0)))
        assert steps >= text.windows // 8 * 0.9  # the whole epoch was read
        return steps

    peaks = {name: peak_traced(lambda n=name: one_epoch(n)) for name in ("small", "large")}
    assert peaks["large"] <= 1.5 * peaks["small"], peaks


