"""The character-level LSTM: embedding -> L LSTM layers -> linear head, with locked dropout.

The LSTM is written out gate by gate (``cell="explicit"``, the default) so the maths is on the
page: for every layer the input projection of all timesteps is one matmul hoisted out of the
time loop, and each step adds one hidden matmul and the pointwise gates

    i = sigmoid(.)   f = sigmoid(.)   g = tanh(.)   o = sigmoid(.)
    c' = f * c + i * g                h' = o * tanh(c')

Parameters are those of ``torch.nn.LSTM`` (``weight_ih_l{k}``, ``weight_hh_l{k}``,
``bias_ih_l{k}``, ``bias_hh_l{k}``, gate order i, f, g, o), so ``cell="fused"`` runs the very
same weights through PyTorch's fused kernel (cuDNN on a GPU), and a checkpoint works with both.

Three paths run those weights; ``LSTM.forward`` picks one:

    cell="fused"                   torch.nn.LSTM's own kernel (oneDNN on a CPU, cuDNN on a GPU)
    explicit, autograd off         ``lstm_cell`` per step, exactly the equations above: evaluation
                                   and generation (one character at a time, state carried)
    explicit, autograd on          ``LSTMRecurrence``: the same equations, time-major, with
                                   backpropagation through time written out instead of
                                   autograd's graph of 64 small steps (training speed)

Both explicit paths do each step's hidden matmul through ``StepMatmul``: oneDNN's private linear
ops on a CPU (a weight reordered once), ``torch.addmm`` wherever those are missing or disabled
(``LSTMGEN_ONEDNN=0``). ``tests/test_model.py`` checks all of them against ``torch.nn.LSTM``,
outputs and gradients, with and without the private ops. No Ray here: plain PyTorch.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

State = list[tuple[Tensor, Tensor]]  # (h, c) per layer, each (batch, hidden)


@dataclass
class ModelConfig:
    """The network's shape, saved in every checkpoint. Training fills it from ``TrainConfig``,
    which holds the defaults; there are none here to drift from them."""

    vocab_size: int
    embed: int
    hidden: int
    layers: int
    dropout: float  # locked dropout between layers and before the head
    embed_dropout: float  # locked dropout on the embeddings
    cell: str = "explicit"  # checkpoints from before the fused cell existed hold no "cell"
    weight_drop: float = 0.0  # DropConnect on the hidden-to-hidden weights while training


class StepMatmul:
    """``add + x @ weight.t()`` for a weight that every timestep multiplies by again.

    On a CPU with oneDNN the weight is reordered once into oneDNN's blocked layout (as
    nn.LSTM's own CPU kernel does) and each step runs oneDNN's linear with the add fused in, so
    no step pays to reorder the weight again (``torch.addmm`` does; bench/train_speed.py and
    docs/results.md, "Training speed", say by how much). A bf16 weight takes the same path where
    the CPU has bf16 instructions (AVX-512 BF16, AMX). Elsewhere (GPU, builds without oneDNN), and
    where the caller asks for no reordered copy (``pack=False``), it is ``torch.addmm``.

    The product runs in the weight's dtype (the compute dtype, see "Precision" in LSTM) and the
    result has ``add``'s dtype, so an fp32 state or gradient can be added to a bf16 product.
    """

    def __init__(self, weight: Tensor, pack: bool = True):
        self.weight_t, self.dtype = weight.t(), weight.dtype
        self.packed = None
        if pack and weight.device.type == "cpu" and _onednn_linear(weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
            # the ops, looked up once: torch.ops' lookups cost about as much as a small op, every step
            self.linear_add = torch.ops.mkldnn._linear_pointwise.binary
            self.linear = torch.ops.mkldnn._linear_pointwise.default

    def __call__(self, x: Tensor, add: Tensor) -> Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.packed is not None:
            if add.dtype == self.dtype:
                return self.linear_add(x, add, self.packed, None, "add")
            return add + self.linear(x, self.packed, None, "none", [], "")
        if add.dtype == self.dtype:
            return torch.addmm(add, x, self.weight_t)
        return add + torch.mm(x, self.weight_t).to(add.dtype)


def _onednn_linear(dtype: torch.dtype) -> bool:
    """oneDNN's linear for fp32 weights, and for bf16 ones where the CPU has bf16 instructions."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and os.environ.get("LSTMGEN_ONEDNN", "1") != "0"):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_bf16())


@functools.cache  # the CPU does not change; the fused cell asks on every forward under autocast
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX, e.g. Xeon
    Sapphire Rapids and later, AMD Zen 4 and later). Elsewhere bf16 is emulated and slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes (cpuinfo)
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def default_precision(device: torch.device) -> str:
    """``--precision`` when not given: bf16 mixed precision on a GPU and on a CPU with bf16
    instructions (more steps per minute: docs/results.md, "bf16 and the learning rate"), else fp32."""
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else "fp32"


def lstm_cell(xw: Tensor, h: Tensor, c: Tensor, w_hh: StepMatmul) -> tuple[Tensor, Tensor]:
    """One timestep. ``xw`` is this step's input projection with both biases already added;
    ``w_hh(h, xw)`` is ``xw + h @ weight_hh.t()``."""
    gates = w_hh(h, xw)
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


class LSTMRecurrence(torch.autograd.Function):
    """One layer's time loop for training, with backpropagation through time written out.

    Works time-major, ``(time, batch, 4H)``, so every step reads and writes contiguous rows, in
    nn.LSTM's gate order i, f, g, o. On a CPU tanh costs about three sigmoids, so the loop computes
    the candidate gate's tanh(z) as 2 sigmoid(2z) - 1: the caller passes the g rows of ``xw``
    doubled, this function doubles those of ``w_hh`` (``gate_scale``), one sigmoid covers all four
    gates, and the backward's g factor carries the 1/2.

    Forward runs without an autograd graph, keeping the gate activations, cell states and tanh of
    the cell states. Backward computes, for all steps at once and in place in one buffer, every
    factor that does not depend on the gradient flowing back in time, so each step is five small
    ops: one matmul for the gradient into the previous hidden state, two for the cell-state
    gradient, two for the gate gradients. The hidden weights' gradient is one large matmul over
    all steps, not one outer product per step as autograd would do. Large temporaries are few on
    purpose: each is memory traffic, and page faults where freed memory goes back to the kernel
    (``train.keep_freed_memory``). ``tests/test_model.py`` checks it against ``torch.nn.LSTM``.
    """

    @staticmethod
    def forward(ctx, xw: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor):  # type: ignore[override]
        ctx.device_type = xw.device.type
        with torch.autocast(xw.device.type, enabled=False):  # the dtypes here are chosen explicitly
            return LSTMRecurrence._forward(ctx, xw, h0, c0, w_hh)

    @staticmethod
    def _forward(ctx, xw: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor):
        steps, batch, four_h = xw.shape
        hidden = four_h // 4
        compute = xw.dtype  # of each step's matmul, and of what only feeds matmuls
        weight_dtype, w_hh = w_hh.dtype, w_hh.to(compute, copy=True)
        w_hh[2 * hidden : 3 * hidden] *= 2  # the g rows (gate_scale), exact in any dtype
        hidden_matmul = StepMatmul(w_hh)
        # cell states: the weights' dtype, at least fp32 (never bf16), because c sums over every step
        state = dict(dtype=torch.promote_types(weight_dtype, torch.float32), device=xw.device)
        acts = torch.empty(xw.shape, **state)  # sigmoid(i), sigmoid(f), s = sigmoid(2 z_g), sigmoid(o)
        cs = torch.empty(steps, batch, hidden, **state)
        tanh_cs = torch.empty_like(cs)
        hs = torch.empty(steps, batch, hidden, dtype=compute, device=xw.device)  # next step's matmul input
        h, c = h0.to(compute), c0.to(state["dtype"])
        # per-step views made once (unbind), not by indexing inside the loop
        gates = (gate.unbind(0) for gate in acts.chunk(4, dim=2))
        per_step = zip(xw.unbind(0), acts.unbind(0), *gates, cs.unbind(0), tanh_cs.unbind(0), hs.unbind(0))
        for xw_t, a, i, f, s, o, c_t, tanh_c_t, h_t in per_step:
            torch.sigmoid(hidden_matmul(h, xw_t), out=a)
            c = torch.mul(f, c, out=c_t).sub_(i).addcmul_(i, s, value=2)  # f c + i (2s - 1) = f c + i tanh(z_g)
            h = torch.mul(o, torch.tanh(c, out=tanh_c_t), out=h_t)
        ctx.save_for_backward(acts, cs, tanh_cs, hs, h0, c0, w_hh)
        ctx.weight_dtype = weight_dtype
        h_last = acts[-1, :, 3 * hidden :] * tanh_cs[-1]  # the carried state in the state dtype, unrounded
        return hs.to(state["dtype"]), h_last, c.clone()

    @staticmethod
    def backward(ctx, d_hs: Tensor, d_h: Tensor, d_c: Tensor):  # type: ignore[override]
        with torch.autocast(ctx.device_type, enabled=False):
            return LSTMRecurrence._backward(ctx, d_hs, d_h, d_c)

    @staticmethod
    def _backward(ctx, d_hs: Tensor, d_h: Tensor, d_c: Tensor):
        acts, cs, tanh_cs, hs, h0, c0, w_hh = ctx.saved_tensors  # w_hh: scaled, compute dtype
        compute, state = hs.dtype, cs.dtype
        steps, batch, four_h = acts.shape
        hidden = four_h // 4
        # Per step, dc += dh * from_dh, d(i, f, g) = dc * ifg_per_dc, d(o) = dh * o_per_dh: these
        # factors do not depend on the gradient flowing back, so they are made for all steps at once.
        factors = torch.empty(steps, batch, 5, hidden, dtype=state, device=acts.device)
        i_per_dc, f_per_dc, g_per_dc, o_per_dh, from_dh = factors.unbind(2)
        i, f, s, o = acts.view(steps, batch, 4, hidden).unbind(2)
        g = torch.mul(s, 2, out=g_per_dc).sub_(1)  # tanh(z_g) = 2s - 1, for now in g's slot
        torch.addcmul(i, i, i, value=-1, out=i_per_dc).mul_(g)  # g i (1 - i)
        torch.addcmul(f, f, f, value=-1, out=f_per_dc)  # f (1 - f) c_prev
        f_per_dc[0].mul_(c0)
        f_per_dc[1:].mul_(cs[:-1])
        torch.addcmul(i, i, g.mul_(g), value=-1, out=g_per_dc).mul_(0.5)  # i (1 - g^2) / 2
        torch.addcmul(o, o, o, value=-1, out=o_per_dh).mul_(tanh_cs)  # o (1 - o) tanh(c)
        torch.mul(tanh_cs, tanh_cs, out=from_dh).mul_(o)
        torch.sub(o, from_dh, out=from_dh)  # o (1 - tanh(c)^2)

        d_gates = torch.empty(acts.shape, dtype=compute, device=acts.device)  # each step's feeds a matmul
        d_hs = d_hs if d_hs is not None else acts.new_zeros(steps, batch, hidden, dtype=state)
        dh = d_hs[-1] + d_h if d_h is not None else d_hs[-1]
        dc = d_c if d_c is not None else acts.new_zeros(batch, hidden, dtype=state)
        # d_gates @ w_hh. In fp32, addmm on w_hh as it lies beats oneDNN on a transposed, reordered
        # copy, and makes no copy (bench/train_speed.py); in bf16 the reordered copy wins.
        back_matmul = StepMatmul(w_hh.t(), pack=compute != torch.float32)
        d_hs_t, f_t, d_gates_t = d_hs.unbind(0), f.unbind(0), d_gates.unbind(0)
        d_ifg_t = d_gates[:, :, : 3 * hidden].view(steps, batch, 3, hidden).unbind(0)
        d_o_t = d_gates[:, :, 3 * hidden :].unbind(0)
        per_step = (x.unbind(0)[::-1] for x in (factors[:, :, :3], o_per_dh, from_dh))
        for t, ifg_per_dc_t, o_per_dh_t, from_dh_t in zip(range(steps - 1, -1, -1), *per_step):
            if t < steps - 1:
                dh = back_matmul(d_gates_t[t + 1], d_hs_t[t])
                dc = dc * f_t[t + 1]
            dc = torch.addcmul(dc, dh, from_dh_t)
            torch.mul(dc[:, None], ifg_per_dc_t, out=d_ifg_t[t])
            torch.mul(dh, o_per_dh_t, out=d_o_t[t])
        dh = d_gates[0] @ w_hh
        dc = dc * f[0]
        h_prev = torch.cat([h0[None].to(compute), hs[:-1]])
        d_w_hh = (d_gates.reshape(-1, four_h).t() @ h_prev.reshape(-1, hidden)).to(ctx.weight_dtype)
        d_w_hh[2 * hidden : 3 * hidden] *= 2  # the forward's g rows were doubled
        return d_gates, dh.to(h0.dtype), dc.to(c0.dtype), d_w_hh


def gate_scale(hidden: int) -> Tensor:
    """Per-row factor in nn.LSTM's gate order i, f, g, o: 2 on the g rows (see LSTMRecurrence)."""
    return torch.cat([torch.ones(2 * hidden), torch.full((hidden,), 2.0), torch.ones(hidden)])[:, None]


class LSTM(nn.LSTM):
    """``nn.LSTM`` parameters and initialisation, with the recurrence written out in Python.

    Precision. ``--precision bf16`` (the default on a GPU) runs the model under
    ``torch.autocast(dtype=torch.bfloat16)``; on a CPU the same dtype logic runs. Where each
    tensor's dtype is decided:

    - weights and optimizer state: fp32 always (autocast never changes parameters), so every
      checkpoint is fp32 and loads for either cell and either precision;
    - the input projection ``xw`` (one linear over all timesteps): autocast's choice, bf16. Its
      dtype is the recurrence's compute dtype: the hidden weight is cast to it once per call for
      the per-step matmul (``StepMatmul``), and what only feeds that matmul is kept in it: each
      step's ``h`` as the next step's input, each step's gate gradients in the backward;
    - gate activations, cell states, the layer's outputs and the state carried between batches:
      fp32 (the weights' dtype if wider), with autocast off inside ``LSTMRecurrence``, because
      the cell state sums over every timestep;
    - gradients: the backward's matmuls run in the compute dtype, the gradients that reach the
      weights and the states are fp32;
    - logits: autocast's (bf16); the loss is taken in fp32 (``train.py``).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, dropout: float, cell: str,
                 weight_drop: float = 0.0):
        super().__init__(input_size, hidden_size, num_layers, batch_first=True,
                         dropout=dropout if num_layers > 1 else 0.0)
        self.cell, self.weight_drop = cell, weight_drop
        self._matmul_cache: dict[int, tuple[tuple[int, int], StepMatmul]] = {}
        with torch.no_grad():  # forget-gate bias 1 (split as 1 + 0 over the two bias vectors)
            for k in range(num_layers):
                getattr(self, f"bias_ih_l{k}")[hidden_size : 2 * hidden_size].fill_(1.0)
                getattr(self, f"bias_hh_l{k}")[hidden_size : 2 * hidden_size].fill_(0.0)

    def _inference_matmul(self, k: int, w_hh: Tensor) -> StepMatmul:
        """Generation calls forward once per character: keep layer k's reordered weight until the
        weight changes (a new version after an optimizer step, as in dynamic evaluation)."""
        key = (w_hh.data_ptr(), w_hh._version)
        cached = self._matmul_cache.get(k)
        if cached is None or cached[0] != key:
            cached = self._matmul_cache[k] = (key, StepMatmul(w_hh))
        return cached[1]

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:  # type: ignore[override]
        """x: (batch, time, input) -> outputs (batch, time, hidden), final state per layer."""
        batch = x.shape[0]
        if state is None:
            zero = x.new_zeros(batch, self.hidden_size)
            state = [(zero, zero)] * self.num_layers
        if self.cell == "fused":
            h0 = torch.stack([h for h, _ in state])
            c0 = torch.stack([c for _, c in state])
            if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not cpu_has_bf16():
                # oneDNN has no bf16 LSTM kernel for CPUs without bf16 instructions ("could not
                # create a primitive descriptor"): there the fused cell runs in fp32.
                with torch.autocast("cpu", enabled=False):
                    out, (hn, cn) = super().forward(x.float(), (h0.float(), c0.float()))
            else:
                out, (hn, cn) = super().forward(x, (h0, c0))
            return out, list(zip(hn.unbind(0), cn.unbind(0)))
        new_state: State = []
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = (getattr(self, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            h, c = state[k]
            if torch.is_grad_enabled():  # training: time-major, BPTT by hand
                scale = gate_scale(self.hidden_size).to(x)
                xw = F.linear(x.transpose(0, 1), w_ih * scale, (b_ih + b_hh) * scale[:, 0])  # (time, batch, 4H)
                if self.training and self.weight_drop:  # DropConnect: one mask over the batch, every step
                    w_hh = F.dropout(w_hh, self.weight_drop)
                x, h, c = LSTMRecurrence.apply(xw, h, c, w_hh)
                x = x.transpose(0, 1)
            else:
                # inference (evaluation, generation): the cell as written above
                xw = F.linear(x, w_ih, b_ih + b_hh)  # all timesteps at once: (batch, time, 4H)
                hidden_matmul = self._inference_matmul(k, w_hh.to(xw.dtype))
                outputs = []
                for xw_t in xw.unbind(1):  # unbind, not xw[:, t]: indexing costs a buffer per step
                    h, c = lstm_cell(xw_t, h, c, hidden_matmul)
                    outputs.append(h)
                x = torch.stack(outputs, dim=1)
            new_state.append((h, c))
            if k < self.num_layers - 1:
                x = locked_dropout(x, self.dropout, self.training)
        return x, new_state


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout with one mask per sequence, the same at every timestep (AWD-LSTM's locked, or
    variational, dropout): the recurrence sees the same units missing all along a window instead
    of fresh noise at each step, which regularises an LSTM language model better on small
    corpora. x: (batch, time, features). (``cell="fused"`` keeps nn.LSTM's own dropout between
    its layers.)"""
    if not training or p == 0:
        return x
    mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - p).div_(1 - p)
    return x * mask


class CharLSTM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed)
        self.rnn = LSTM(cfg.embed, cfg.hidden, cfg.layers, cfg.dropout, cfg.cell, cfg.weight_drop)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size)
        nn.init.normal_(self.embed.weight, std=0.1)

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids: (batch, time) int64 -> logits (batch, time, vocab), final state."""
        x = locked_dropout(self.embed(ids), self.cfg.embed_dropout, self.training)
        out, state = self.rnn(x, state)
        return self.head(locked_dropout(out, self.cfg.dropout, self.training)), state

    @torch.no_grad()
    def step(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Advance one character per row: ids (batch,) -> logits (batch, vocab), new state.
        Generation calls this in a loop, so each new character costs O(1), never the prefix."""
        logits, state = self.forward(ids[:, None], state)
        return logits[:, 0], state

    def optimizer(self, lr: float, weight_decay: float) -> torch.optim.AdamW:
        """AdamW that decays the weight matrices of the LSTM and the head, not the embeddings,
        biases or norms (nanoGPT's grouping). Fused (one kernel for every parameter, on the CPU as
        on a GPU) where the parameters' device has the kernel: the same update as the per-tensor
        loop, a third of its time on a CPU, and its step counters stay on the device, so a step
        never reads one back (docs/results.md, "Where the step time goes")."""
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and "embed" not in n]
        rest = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
        fused = next(self.parameters()).device.type in ("cpu", "cuda")
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=fused)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def bits_per_char(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy in bits over the non-ignored targets."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
    return loss / math.log(2)


def detach(state: State) -> State:
    return [(h.detach(), c.detach()) for h, c in state]
