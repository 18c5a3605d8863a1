"""Training and evaluation read a prepared split as a stream: the text comes out whole and in
order, and memory does not grow with the corpus (real Parquet). The training loader's tests sit
beside the training loop, in test_train_loop.py."""

import numpy as np
import torch

from lstmgen.corpus import Vocab
from lstmgen.evaluate import carried_bits, carried_bpc
from lstmgen.model import CharLSTM, ModelConfig
from lstmgen.windows import SplitReader, read_split, split_ids

from .conftest import peak_memory


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


def test_evaluation_memory_does_not_grow_with_the_split(corpora):
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=len(Vocab.from_json(open(f"{corpora['large'][0]}/vocab.json").read())),
                                 embed=8, hidden=16, layers=1, cell="fused", dropout=0.0, embed_dropout=0.0))
    scored = {}

    def score(name: str) -> None:
        reader = SplitReader(corpora[name][0], "train", batch=128)  # memory: 16 rows x a batch of 128 windows
        scored[name] = carried_bits(model, reader.rows(16), segment=512)

    peaks = {name: peak_memory(lambda n=name: score(n)) for name in ("small", "large")}
    assert peaks["large"] <= 1.5 * peaks["small"], peaks
    for name in ("small", "large"):
        assert scored[name][1] == len(corpora[name][1]) - 1  # every character but the first scored once
    # and streamed scoring equals scoring the text held in memory, cut the same way
    bits, n = scored["small"]
    in_memory = carried_bpc(model, split_ids(corpora["small"][0], "train"), rows=1, segment=512)
    one_row = carried_bits(model, SplitReader(corpora["small"][0], "train").rows(1), segment=512)
    assert abs(one_row[0] / one_row[1] - in_memory) < 1e-4
    assert abs(bits / n - in_memory) < 0.05  # 16 rows start cold 16 times instead of once
