"""The character-level LSTM: embedding -> L LSTM layers -> dropout -> linear head.

The LSTM is written out gate by gate (``cell="explicit"``, the default) so the maths is on the
page: for every layer the input projection of all timesteps is one matmul hoisted out of the
time loop, and each step adds one hidden matmul and the pointwise gates

    i = sigmoid(.)   f = sigmoid(.)   g = tanh(.)   o = sigmoid(.)
    c' = f * c + i * g                h' = o * tanh(c')

Parameters are those of ``torch.nn.LSTM`` (``weight_ih_l{k}``, ``weight_hh_l{k}``,
``bias_ih_l{k}``, ``bias_hh_l{k}``, gate order i, f, g, o), so ``cell="fused"`` runs the very
same weights through PyTorch's fused kernel (cuDNN on a GPU), and a checkpoint works with both.
No Ray here: this module is plain PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

State = list[tuple[Tensor, Tensor]]  # (h, c) per layer, each (batch, hidden)


@dataclass
class ModelConfig:
    vocab_size: int
    embed: int = 64
    hidden: int = 512
    layers: int = 1
    dropout: float = 0.1
    cell: str = "explicit"


def lstm_cell(xw: Tensor, h: Tensor, c: Tensor, w_hh_t: Tensor) -> tuple[Tensor, Tensor]:
    """One timestep. ``xw`` is this step's input projection with both biases already added."""
    gates = torch.addmm(xw, h, w_hh_t)
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


class LSTMRecurrence(torch.autograd.Function):
    """One layer's time loop for training, with backpropagation through time written out.

    Forward runs ``lstm_cell``'s equations without building an autograd graph per step, keeping
    the gate activations and cell states. Backward walks the steps in reverse with one small
    matmul per step (the gradient into the previous hidden state) and computes the hidden
    weights' gradient once for all steps as one large matmul, instead of one outer product per
    step as autograd would. ``tests/test_model.py`` checks it against ``torch.nn.LSTM``.
    """

    @staticmethod
    def forward(ctx, xw: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor):  # type: ignore[override]
        batch, steps, four_h = xw.shape
        hidden = four_h // 4
        w_hh_t = w_hh.t()
        acts = xw.new_empty(batch, steps, four_h)  # i, f, g, o after their nonlinearities
        cs = xw.new_empty(batch, steps, hidden)
        hs = xw.new_empty(batch, steps, hidden)
        h, c = h0, c0
        gates = xw.new_empty(batch, four_h)
        for t in range(steps):
            a = acts[:, t]
            torch.addmm(xw[:, t], h, w_hh_t, out=gates)
            torch.sigmoid(gates, out=a)
            torch.tanh(gates[:, 2 * hidden : 3 * hidden], out=a[:, 2 * hidden : 3 * hidden])  # candidate: tanh
            i, f, g, o = a.chunk(4, dim=1)
            c = torch.addcmul(f * c, i, g)
            h = o * torch.tanh(c)
            cs[:, t] = c
            hs[:, t] = h
        ctx.save_for_backward(acts, cs, hs, h0, c0, w_hh)
        return hs, h, c

    @staticmethod
    def backward(ctx, d_hs: Tensor, d_h: Tensor, d_c: Tensor):  # type: ignore[override]
        acts, cs, hs, h0, c0, w_hh = ctx.saved_tensors
        batch, steps, four_h = acts.shape
        hidden = four_h // 4
        d_gates = acts.new_empty(batch, steps, four_h)
        dh = d_h.clone() if d_h is not None else acts.new_zeros(batch, hidden)
        dc = d_c.clone() if d_c is not None else acts.new_zeros(batch, hidden)
        for t in range(steps - 1, -1, -1):
            if d_hs is not None:
                dh = dh + d_hs[:, t]
            i, f, g, o = acts[:, t].chunk(4, dim=1)
            tanh_c = torch.tanh(cs[:, t])
            dc = dc + dh * o * (1 - tanh_c * tanh_c)
            c_prev = cs[:, t - 1] if t > 0 else c0
            di, df, dg, do = d_gates[:, t].chunk(4, dim=1)
            torch.mul(dc * g, i * (1 - i), out=di)
            torch.mul(dc * c_prev, f * (1 - f), out=df)
            torch.mul(dc * i, 1 - g * g, out=dg)
            torch.mul(dh * tanh_c, o * (1 - o), out=do)
            dh = d_gates[:, t] @ w_hh
            dc = dc * f
        h_prev = torch.cat([h0[:, None], hs[:, :-1]], dim=1)
        d_w_hh = d_gates.reshape(-1, four_h).t() @ h_prev.reshape(-1, hidden)
        return d_gates, dh, dc, d_w_hh


class LSTM(nn.LSTM):
    """``nn.LSTM`` parameters and initialisation, with the recurrence written out in Python."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, dropout: float, cell: str):
        super().__init__(input_size, hidden_size, num_layers, batch_first=True,
                         dropout=dropout if num_layers > 1 else 0.0)
        self.cell = cell
        with torch.no_grad():  # forget-gate bias 1 (split as 1 + 0 over the two bias vectors)
            for k in range(num_layers):
                getattr(self, f"bias_ih_l{k}")[hidden_size : 2 * hidden_size].fill_(1.0)
                getattr(self, f"bias_hh_l{k}")[hidden_size : 2 * hidden_size].fill_(0.0)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:  # type: ignore[override]
        """x: (batch, time, input) -> outputs (batch, time, hidden), final state per layer."""
        batch = x.shape[0]
        if state is None:
            zero = x.new_zeros(batch, self.hidden_size)
            state = [(zero, zero)] * self.num_layers
        if self.cell == "fused":
            h0 = torch.stack([h for h, _ in state])
            c0 = torch.stack([c for _, c in state])
            out, (hn, cn) = super().forward(x, (h0, c0))
            return out, list(zip(hn.unbind(0), cn.unbind(0)))
        new_state: State = []
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = (getattr(self, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            xw = F.linear(x, w_ih, b_ih + b_hh)  # all timesteps at once: (batch, time, 4H)
            h, c = state[k]
            if torch.is_grad_enabled():
                x, h, c = LSTMRecurrence.apply(xw, h, c, w_hh)
            else:  # inference (evaluation, generation): the cell as written above
                w_hh_t = w_hh.t()
                outputs = []
                for xw_t in xw.unbind(1):  # unbind, not xw[:, t]: indexing costs a buffer per step
                    h, c = lstm_cell(xw_t, h, c, w_hh_t)
                    outputs.append(h)
                x = torch.stack(outputs, dim=1)
            new_state.append((h, c))
            if self.dropout and self.training and k < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, new_state


class CharLSTM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed)
        self.rnn = LSTM(cfg.embed, cfg.hidden, cfg.layers, cfg.dropout, cfg.cell)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size)
        nn.init.normal_(self.embed.weight, std=0.1)

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids: (batch, time) int64 -> logits (batch, time, vocab), final state."""
        x = self.drop(self.embed(ids))
        out, state = self.rnn(x, state)
        return self.head(self.drop(out)), state

    @torch.no_grad()
    def step(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Advance one character per row: ids (batch,) -> logits (batch, vocab), new state.
        Generation calls this in a loop, so each new character costs O(1), never the prefix."""
        logits, state = self.forward(ids[:, None], state)
        return logits[:, 0], state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def bits_per_char(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy in bits over the non-ignored targets."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
    return loss / math.log(2)


def detach(state: State) -> State:
    return [(h.detach(), c.detach()) for h, c in state]
