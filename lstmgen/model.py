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
            w_hh_t = w_hh.t()
            outputs = []
            for xw_t in xw.unbind(1):  # unbind, not xw[:, t]: indexing costs a gradient buffer per step
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
