"""Held-out scoring: state carried through the text, and dynamic evaluation that adapts."""

import math

import numpy as np
import pytest
import torch

from lstmgen.errors import LstmgenError
from lstmgen.evaluate import carried_bpc, dynamic_bpc, gradient_mean_square, rows_of
from lstmgen.model import CharLSTM, ModelConfig


def _model() -> CharLSTM:
    torch.manual_seed(0)
    return CharLSTM(ModelConfig(vocab_size=20, embed=8, hidden=32, layers=1, dropout=0.0, embed_dropout=0.0))


def test_rows_score_every_target_once():
    ids = np.arange(103)
    rows = rows_of(ids, 4)
    assert sum(len(r) - 1 for r in rows) == len(ids) - 1
    assert np.array_equal(np.concatenate([rows[0]] + [r[1:] for r in rows[1:]]), ids)


def test_carried_bpc_matches_a_direct_computation():
    model = _model().eval()
    ids = np.random.default_rng(0).integers(0, 20, 400)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(ids[:-1])[None])
        direct = torch.nn.functional.cross_entropy(logits[0], torch.from_numpy(ids[1:])).item() / math.log(2)
    assert abs(carried_bpc(model, ids, rows=1, segment=37) - direct) < 1e-5


def _mean_sq(model: CharLSTM, vocab: int = 20) -> dict[str, torch.Tensor]:
    return gradient_mean_square(model, np.random.default_rng(5).integers(0, vocab, 2000), segment=50)


def test_dynamic_evaluation_adapts_and_restores_the_weights():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pattern = np.random.default_rng(1).integers(0, 20, 60)
    ids = np.tile(pattern, 40)  # text that repeats: a model that adapts must gain
    static = carried_bpc(model, ids, rows=1)
    assert abs(dynamic_bpc(model, ids, segment=50, lr=0.0) - static) < 1e-4
    dynamic = dynamic_bpc(model, ids, segment=50, lr=1e-2, mean_sq=_mean_sq(model))
    assert dynamic < static - 0.5, (dynamic, static)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
        assert p.grad is None


def test_dynamic_decay_pulls_the_weights_back_to_the_trained_ones():
    """A decay large enough that every weight is pulled all the way undoes every step (the static
    score); a small decay keeps part of the gain."""
    model = _model()
    ids = np.tile(np.random.default_rng(1).integers(0, 20, 60), 40)
    mean_sq = _mean_sq(model)
    static = carried_bpc(model, ids, rows=1)
    assert abs(dynamic_bpc(model, ids, segment=50, lr=1e-2, decay=1e6, mean_sq=mean_sq) - static) < 1e-4
    free = dynamic_bpc(model, ids, segment=50, lr=1e-2, mean_sq=mean_sq)
    pulled = dynamic_bpc(model, ids, segment=50, lr=1e-2, decay=0.01, mean_sq=mean_sq)
    assert free < pulled < static - 0.1, (free, pulled, static)


def test_dynamic_steps_stay_bounded_for_characters_the_training_text_lacks():
    """The embedding rows of characters absent from the training text get no gradient there; the
    floor on the mean square keeps their steps as bounded as any other's."""
    model = _model()
    mean_sq = gradient_mean_square(model, np.random.default_rng(5).integers(0, 10, 2000), segment=50)
    assert mean_sq["embed.weight"][10:].min() > 0
    ids = np.tile(np.random.default_rng(1).integers(10, 20, 60), 40)  # only the other ten characters
    static = carried_bpc(model, ids, rows=1)
    dynamic = dynamic_bpc(model, ids, segment=50, lr=1e-2, mean_sq=mean_sq)
    assert math.isfinite(dynamic) and dynamic < static - 0.5, (dynamic, static)


def test_dynamic_steps_need_the_gradients_mean_square():
    with pytest.raises(ValueError, match="mean square"):
        dynamic_bpc(_model(), np.arange(100) % 20, segment=50, lr=1e-3)


def test_context_counts_match_a_direct_count():
    from lstmgen.mixture import context_counts

    ids = np.random.default_rng(4).integers(0, 5, 400)
    for k in (0, 1, 3):
        c, n, d = context_counts(ids, k, vocab_size=5)
        for t in (0, 1, 2, 57, 200, 399):
            ctx = tuple(ids[max(0, t - k) : t])
            earlier = [u for u in range(t) if tuple(ids[max(0, u - k) : u]) == ctx]
            assert n[t] == len(earlier)
            assert c[t] == sum(ids[u] == ids[t] for u in earlier)
            assert d[t] == len({int(ids[u]) for u in earlier})


def test_count_experts_are_distributions():
    from lstmgen.mixture import count_experts

    prefix = np.random.default_rng(3).integers(0, 20, 500)
    totals = np.zeros(5)
    for x in range(20):
        experts, _ = count_experts(np.append(prefix, x), vocab_size=20, order=3)
        totals += experts[-1]
    assert np.allclose(totals, 1, atol=1e-9), totals


def test_count_model_learns_repeats_and_the_mixture_tracks_the_better_predictor():
    from lstmgen.mixture import Mixture

    rng = np.random.default_rng(2)
    train = rng.integers(0, 20, 3000)
    text = np.tile(rng.integers(0, 20, 200), 10)  # unseen in training, then repeated
    mixture = Mixture(train, text, vocab_size=20, order=4)
    counts = mixture.count_bits()
    assert counts[:199].mean() > 3.5 and counts[-500:].mean() < 0.3  # uniform-ish first, near-certain once repeated
    flat = np.full(len(counts), np.log2(20))  # a predictor that learns nothing
    mixed = mixture.mixed_bits(flat)
    assert mixed.sum() < flat.sum() - 1000
    assert mixed[-500:].mean() < counts[-500:].mean() + 0.05  # the gate has learnt to trust the counts
    sharp = np.where(np.arange(len(counts)) < 200, 0.5, 4.0)  # an expert right first, then useless
    assert mixture.mixed_bits(sharp)[:199].mean() < counts[:199].mean() - 1
    # the LSTM starts with half the weight, the count model (as its own gate mixes it) the other half
    first = -np.log2(0.5 * 2**-0.5 + 0.5 * 2 ** -counts[0])
    assert abs(mixture.mixed_bits(sharp)[0] - first) < 1e-9, (mixture.mixed_bits(sharp)[0], first)


def test_the_count_mixture_states_its_memory_need_and_refuses_what_cannot_fit():
    import psutil

    from lstmgen.evaluate import MIXTURE_BYTES_PER_CHAR, require_mixture_memory

    assert require_mixture_memory(1_000_000) == 1_000_000 * MIXTURE_BYTES_PER_CHAR  # WikiText-2 size: fits
    too_many = int(psutil.virtual_memory().total / MIXTURE_BYTES_PER_CHAR) + 1  # more than this machine holds
    with pytest.raises(LstmgenError, match="--mix-counts on .* GiB available"):
        require_mixture_memory(too_many)
