"""Held-out scoring: state carried through the text, and dynamic evaluation that adapts."""

import math

import numpy as np
import torch

from lstmgen.evaluate import dynamic_bpc, rows_of, stream_bpc
from lstmgen.model import CharLSTM, ModelConfig


def _model() -> CharLSTM:
    torch.manual_seed(0)
    return CharLSTM(ModelConfig(vocab_size=20, embed=8, hidden=32, layers=1, dropout=0.0))


def test_rows_score_every_target_once():
    ids = np.arange(103)
    rows = rows_of(ids, 4)
    assert sum(len(r) - 1 for r in rows) == len(ids) - 1
    assert np.array_equal(np.concatenate([rows[0]] + [r[1:] for r in rows[1:]]), ids)


def test_stream_bpc_matches_a_direct_computation():
    model = _model().eval()
    ids = np.random.default_rng(0).integers(0, 20, 400)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(ids[:-1])[None])
        direct = torch.nn.functional.cross_entropy(logits[0], torch.from_numpy(ids[1:])).item() / math.log(2)
    assert abs(stream_bpc(model, ids, streams=1, chunk=37) - direct) < 1e-5


def test_dynamic_evaluation_adapts_and_restores_the_weights():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pattern = np.random.default_rng(1).integers(0, 20, 60)
    ids = np.tile(pattern, 40)  # text that repeats: a model that adapts must gain
    static = stream_bpc(model, ids, streams=1)
    dynamic = dynamic_bpc(model, ids, segment=50, lr=3e-3)
    assert dynamic < static - 0.5, (dynamic, static)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_count_model_learns_repeats_and_the_mixture_tracks_the_better_predictor():
    from lstmgen.mixture import CountModel, mix_bits

    rng = np.random.default_rng(2)
    text = np.tile(rng.integers(0, 20, 200), 10)
    counts = CountModel(vocab_size=20, order=4).bits(text)
    assert counts[:199].mean() > 3.5 and counts[-500:].mean() < 0.2  # uniform-ish first, near-certain once repeated
    flat = np.full(len(counts), np.log2(20))
    mixed = mix_bits(counts, flat)
    # A Bayesian mixture never costs more than the better predictor plus its switching overhead.
    assert mixed.sum() <= min(counts.sum(), flat.sum()) + 1 + len(counts) * -np.log2(1 - 0.02 / 2)
    assert mixed.sum() < flat.sum() - 1000


def test_count_model_probabilities_sum_to_one():
    from lstmgen.mixture import CountModel

    model = CountModel(vocab_size=20, order=3).fit(np.random.default_rng(3).integers(0, 20, 500))
    for context in ([1, 2, 3], [7], []):
        total = sum(model.prob(np.array([*context, x], dtype=np.uint16), len(context)) for x in range(20))
        assert abs(total - 1) < 1e-9
