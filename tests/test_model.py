"""The explicit LSTM: same numbers as torch.nn.LSTM on the same weights, and step() == forward."""

import pytest
import torch

from lstmgen.model import CharLSTM, ModelConfig, bits_per_char


def _pair(layers: int, dtype=torch.float64):
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=40, embed=12, hidden=24, layers=layers, dropout=0.0, embed_dropout=0.0)).to(dtype)
    return model


@pytest.mark.parametrize("onednn", ["1", "0"])
def test_explicit_and_fused_agree_on_outputs_and_gradients(monkeypatch, onednn):
    monkeypatch.setenv("LSTMGEN_ONEDNN", onednn)  # oneDNN's reordered-weight matmul, or plain addmm
    for layers in (1, 2):
        model = _pair(layers, torch.float32)
        ids = torch.randint(0, 40, (5, 17))
        targets = torch.randint(0, 40, (5, 17))
        results = {}
        for cell in ("explicit", "fused"):
            model.rnn.cell = cell
            model.zero_grad()
            logits, state = model(ids)
            bits_per_char(logits, targets).backward()
            results[cell] = (logits.detach().clone(), [p.grad.clone() for p in model.parameters()], state)
        (la, ga, sa), (lb, gb, sb) = results["explicit"], results["fused"]
        assert torch.allclose(la, lb, atol=1e-5), (la - lb).abs().max()
        for a, b in zip(ga, gb):
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
        for (ha, ca), (hb, cb) in zip(sa, sb):
            assert torch.allclose(ha, hb, atol=1e-5) and torch.allclose(ca, cb, atol=1e-5)


def test_parameters_are_named_like_nn_lstm_and_forget_bias_is_one():
    model = _pair(2)
    names = {n for n, _ in model.rnn.named_parameters()}
    assert names == {f"{k}_l{i}" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") for i in (0, 1)}
    reference = torch.nn.LSTM(12, 24, 2, batch_first=True)
    for n, p in reference.named_parameters():
        assert getattr(model.rnn, n).shape == p.shape
    h = 24
    forget = model.rnn.bias_ih_l0[h : 2 * h] + model.rnn.bias_hh_l0[h : 2 * h]
    assert torch.allclose(forget, torch.ones(h, dtype=forget.dtype))


def test_step_with_carried_state_equals_full_forward():
    model = _pair(2).eval()
    ids = torch.randint(0, 40, (3, 25))
    full, _ = model(ids)
    state, steps = None, []
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        steps.append(logits)
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-10)


def test_state_carried_across_chunks_equals_one_pass():
    model = _pair(1).eval()
    ids = torch.randint(0, 40, (2, 30))
    full, _ = model(ids)
    a, state = model(ids[:, :11])
    b, _ = model(ids[:, 11:], state)
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-10)


def test_inference_sees_weights_changed_in_place():
    """Generation keeps a reordered copy of the hidden weights; an optimizer step (dynamic
    evaluation) changes them in place and the next forward must use the new values."""
    model = _pair(2, torch.float32).eval()
    ids = torch.randint(0, 40, (3, 9))
    with torch.no_grad():
        before, _ = model(ids)
        model.rnn.weight_hh_l1.add_(0.05)
        after, _ = model(ids)
        model.rnn.cell = "fused"
        reference, _ = model(ids)
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(after, reference, atol=1e-5), (after - reference).abs().max()


def _run_bf16(model, ids, targets, cell: str):
    model.rnn.cell = cell
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the dtype logic of --precision bf16 (and --gpu)
        logits, state = model(ids)
        loss = bits_per_char(logits.float(), targets)
    loss.backward()
    return logits.detach().float(), [p.grad.clone() for p in model.parameters()], state


@pytest.mark.parametrize("onednn", ["1", "0"])
def test_explicit_trains_under_bf16_autocast_like_fused(monkeypatch, onednn):
    """Under bf16 autocast every matmul rounds its inputs to 8 significant bits (relative error
    2^-9 each); over 17 recurrent steps such errors add up to a few per cent of the values, in
    either cell. So both are held to 5 % of the fp32 result's scale (outputs: max error over the
    largest logit; gradients: error norm over the fp32 gradient's norm), and the explicit cell's
    recurrent state, which it keeps in fp32, must come out fp32. The per-step matmul is oneDNN's
    on a bf16 weight where the CPU has bf16 instructions, else addmm; both are held to this. (On a
    CPU without bf16 instructions oneDNN has no bf16 LSTM, and the fused cell runs in fp32.)"""
    monkeypatch.setenv("LSTMGEN_ONEDNN", onednn)
    torch.manual_seed(1)
    model = CharLSTM(ModelConfig(vocab_size=40, embed=16, hidden=32, layers=2, dropout=0.0, embed_dropout=0.0))
    ids, targets = torch.randint(0, 40, (6, 17)), torch.randint(0, 40, (6, 17))
    model.rnn.cell = "fused"
    model.zero_grad()
    reference, _ = model(ids)
    bits_per_char(reference, targets).backward()
    reference_grads = [p.grad.clone() for p in model.parameters()]
    states = {}
    for cell in ("explicit", "fused"):
        logits, grads, states[cell] = _run_bf16(model, ids, targets, cell)
        assert (logits - reference.detach()).abs().max() < 0.05 * reference.abs().max(), cell
        for g, ref in zip(grads, reference_grads):
            assert (g - ref).norm() < 0.05 * ref.norm() + 1e-6, cell
    assert all(h.dtype == torch.float32 and c.dtype == torch.float32 for h, c in states["explicit"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inference path (generation, evaluation)
        model.rnn.cell = "explicit"
        model.eval()
        step_logits, _ = model.step(ids[:, 0])
    assert (step_logits.float() - reference[:, 0].detach()).abs().max() < 0.05 * reference.abs().max()


def test_weight_drop_masks_the_hidden_weights_in_training_only():
    torch.manual_seed(0)
    cfg = dict(vocab_size=40, embed=12, hidden=24, layers=1, dropout=0.0, embed_dropout=0.0)
    dropped = CharLSTM(ModelConfig(**cfg, weight_drop=0.5))
    plain = CharLSTM(ModelConfig(**cfg))
    plain.load_state_dict(dropped.state_dict())
    ids, targets = torch.randint(0, 40, (4, 9)), torch.randint(0, 40, (4, 9))
    bits_per_char(dropped(ids)[0], targets).backward()
    grad = dropped.rnn.weight_hh_l0.grad
    zeros = (grad == 0).float().mean().item()
    assert 0.4 < zeros < 0.6, zeros  # the dropped half gets no gradient: one mask for every step and row
    assert not torch.allclose(dropped(ids)[0], plain(ids)[0])  # training: another network each batch
    dropped.eval(), plain.eval()
    assert torch.allclose(dropped(ids)[0], plain(ids)[0])  # evaluation and generation: all the weights
