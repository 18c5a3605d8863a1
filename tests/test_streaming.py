"""Training and evaluation read a prepared split as a stream: the text comes out whole and in
order, and memory does not grow with the corpus (real Ray Data, real Parquet)."""

import tracemalloc
from collections import Counter

import numpy as np
import pytest
import ray
import torch

from lstmgen.config import PrepareConfig, TrainConfig
from lstmgen.corpus import Vocab
from lstmgen.evaluate import carried_bits, carried_bpc
from lstmgen.model import CharLSTM, ModelConfig
from lstmgen.prepare import prepare
from lstmgen.train import epoch_batches
from lstmgen.windows import SplitReader, pieces_of, read_split, split_ids

from .conftest import wiki_text


@pytest.fixture(scope="module")
def corpora(ray_local, tmp_path_factory):
    """The WikiText-2 test split whole (1.29 M characters) and its first tenth, prepared with
    seq_len 16 and small chunks (many files and row groups), and no validation split."""
    text = wiki_text(2_000_000)
    out = {}
    for name, chars in (("small", len(text) // 10), ("large", len(text))):
        root = tmp_path_factory.mktemp(name)
        (root / "corpus.txt").write_text(text[:chars], encoding="utf-8")
        prepare(PrepareConfig(out=str(root / "data"), corpus=[str(root / "corpus.txt")], seq_len=16, chunk_mb=0.03,
                              valid_fraction=0.0))
        out[name] = (str(root / "data"), text[:chars])
    return out


def _shard(data: str, size: int, shuffle: bool = False):
    """A real Ray Data iterator over the pieces of a split's windows, as ``train`` builds it."""
    ds = ray.data.from_items(pieces_of(SplitReader(data, "train").windows, size))
    return (ds.random_shuffle(seed=0) if shuffle else ds).iterator()


def test_split_reader_reads_the_text_in_order_from_any_window(corpora):
    data, text = corpora["small"]
    vocab = Vocab.from_json(open(f"{data}/vocab.json").read())
    reader = SplitReader(data, "train")
    assert len(reader.row_groups) > 1 and reader.windows == read_split(data, "train").num_rows
    assert vocab.decode(np.concatenate(list(reader.ids()))) == text
    start, stop = 1234, 5678  # windows start every 16 characters
    assert vocab.decode(np.concatenate(list(reader.ids(start, stop)))) == text[16 * start : 16 * stop + 1]
    rows = [np.concatenate(list(row)) for row in reader.rows(9)]
    assert len(rows) == 10  # 9 equal rows and one with the windows left over
    assert vocab.decode(np.concatenate([rows[0]] + [r[1:] for r in rows[1:]])) == text


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


def _peak_traced(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_training_loader_memory_does_not_grow_with_the_corpus(corpora):
    cfg = TrainConfig(data="", run="", batch_size=8, carry_state=True)

    def one_epoch(name: str) -> int:
        data = corpora[name][0]
        text = SplitReader(data, "train")
        steps = sum(1 for _ in epoch_batches(_shard(data, 256), text, cfg, 16, np.random.default_rng(0)))
        assert steps >= text.windows // 8 * 0.9  # the whole epoch was read
        return steps

    peaks = {name: _peak_traced(lambda n=name: one_epoch(n)) for name in ("small", "large")}
    assert peaks["large"] <= 1.5 * peaks["small"], peaks


def test_evaluation_memory_does_not_grow_with_the_split(corpora):
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=len(Vocab.from_json(open(f"{corpora['large'][0]}/vocab.json").read())),
                                 embed=8, hidden=16, layers=1, cell="fused", dropout=0.0, embed_dropout=0.0))
    scored = {}

    def score(name: str) -> None:
        reader = SplitReader(corpora[name][0], "train", batch=128)  # memory: 16 rows x a batch of 128 windows
        scored[name] = carried_bits(model, reader.rows(16), segment=512)

    peaks = {name: _peak_traced(lambda n=name: score(n)) for name in ("small", "large")}
    assert peaks["large"] <= 1.5 * peaks["small"], peaks
    for name in ("small", "large"):
        assert scored[name][1] == len(corpora[name][1]) - 1  # every character but the first scored once
    # and streamed scoring equals scoring the text held in memory, cut the same way
    bits, n = scored["small"]
    in_memory = carried_bpc(model, split_ids(corpora["small"][0], "train"), rows=1, segment=512)
    one_row = carried_bits(model, SplitReader(corpora["small"][0], "train").rows(1), segment=512)
    assert abs(one_row[0] / one_row[1] - in_memory) < 1e-4
    assert abs(bits / n - in_memory) < 0.05  # 16 rows start cold 16 times instead of once
