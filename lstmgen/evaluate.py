"""Held-out bits per character, with the LSTM state carried through the text.

The split is cut into ``rows`` contiguous rows that are read in parallel, ``segment`` characters
at a time, state carried from segment to segment: each character is scored once, with all the
context before it in its row (only the first character of each row starts cold). Training
validation and ``lstmgen evaluate`` both use this function. Each row is read from Parquet as it is
scored (``SplitReader.rows``), so a split of any size fits in memory; only the count mixture holds
the text at once.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lstmgen import checkpoint, storage
from lstmgen.config import EvaluateConfig
from lstmgen.errors import LstmgenError
from lstmgen.model import CharLSTM, detach
from lstmgen.windows import IGNORE, SplitReader, Stream, split_ids


def rows_of(ids: np.ndarray, rows: int) -> list[np.ndarray]:
    """Cut an id sequence into ``rows`` equal rows overlapping by one id (so every id but the first
    is a target once), plus one short row with what is left over."""
    n_targets = len(ids) - 1
    rows = max(1, min(rows, n_targets))
    per = n_targets // rows
    out = [ids[r * per : (r + 1) * per + 1] for r in range(rows)]
    if rows * per < n_targets:
        out.append(ids[rows * per :])
    return out


Rows = Sequence[Iterable[np.ndarray]]  # each row: its text as consecutive pieces of ids


@torch.no_grad()
def carried_bits(model: CharLSTM, rows: Rows, segment: int = 256, device: str = "cpu",
                 part: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """(total bits, characters scored) over this ``part`` = (index, parts) of the rows, so that
    several training workers can share one validation pass. The rows are read in step,
    ``segment`` characters at a time; a row that runs out leaves the batch (its state with it),
    and the last, shorter segment of a row is padded with targets the loss skips."""
    was_training = model.training
    model.eval()
    total_bits, total = 0.0, 0
    streams = [Stream(row) for row in rows[part[0] :: part[1]]]
    state = None
    while streams:
        pieces = [s.take(segment) for s in streams]
        live = [i for i, piece in enumerate(pieces) if len(piece) >= 2]
        if len(live) < len(streams):  # rows that ended leave the batch
            streams, pieces = [streams[i] for i in live], [pieces[i] for i in live]
            if not streams:
                break
            if state is not None:
                keep = torch.tensor(live, dtype=torch.long, device=device)
                state = [(h[keep], c[keep]) for h, c in state]
        block = np.full((len(pieces), max(len(piece) for piece in pieces)), IGNORE, dtype=np.int64)
        for i, piece in enumerate(pieces):
            block[i, : len(piece)] = piece
        block = torch.from_numpy(block).to(device)
        x, y = block[:, :-1].clamp(min=0), block[:, 1:]
        logits, state = model(x, state)
        state = detach(state)
        nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE, reduction="sum")
        total_bits += nats.item() / math.log(2)
        total += int((y != IGNORE).sum())
    model.train(was_training)
    if total == 0 and part == (0, 1):
        raise LstmgenError("the evaluation split holds fewer than 2 characters")
    return total_bits, total


def carried_bpc(model: CharLSTM, ids: np.ndarray, rows: int = 16, segment: int = 256, device: str = "cpu") -> float:
    """Bits per character of ids held in memory, cut into ``rows`` rows."""
    bits, n = carried_bits(model, [[row] for row in rows_of(ids, rows)], segment, device)
    return bits / n


PRIOR_CHARS = 100_000  # training characters the gradients' mean square is measured on
PRIOR_FLOOR = 0.01  # no parameter's mean square below this share of the mean over all of them


def gradient_mean_square(model: CharLSTM, ids: np.ndarray, segment: int) -> dict[str, torch.Tensor]:
    """Each parameter's mean squared gradient over ``segment``-character steps of ``ids``
    (training text, state carried), which dynamic evaluation divides its steps by: measured
    before the scored text is read, it sizes the first steps as well as the last (a running mean
    that starts at zero makes the first steps ten times too large). A parameter the text never
    moved (the embedding of a character it lacks) would get an unbounded step, so each mean
    square is held at least ``PRIOR_FLOOR`` of the mean over all parameters."""
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    text, state, steps = Stream([ids]), None, 0
    while len(piece := text.take(segment)) >= 2:
        block = torch.from_numpy(piece.astype(np.int64))[None, :]
        model.zero_grad(set_to_none=True)
        logits, state = model(block[:, :-1], state)
        F.cross_entropy(logits.float()[0], block[0, 1:]).backward()
        state = detach(state)
        steps += 1
        for n, p in model.named_parameters():
            if p.grad is not None:
                sums[n].add_(p.grad.square())
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if steps == 0:
        raise LstmgenError("dynamic evaluation needs at least 2 characters of training text")
    mean_sq = {n: v / steps for n, v in sums.items()}
    overall = torch.cat([v.flatten() for v in mean_sq.values()]).mean()
    floor = max(PRIOR_FLOOR * overall.item(), torch.finfo(torch.float32).tiny)
    return {n: v.clamp(min=floor) for n, v in mean_sq.items()}


def dynamic_bpc(model: CharLSTM, ids: np.ndarray | Iterable[np.ndarray], segment: int, lr: float, decay: float = 0.0,
                mean_sq: dict[str, torch.Tensor] | None = None, progress: bool = False, per_char: bool = False):
    """Dynamic evaluation (Krause et al., 2018): score each ``segment`` characters first, then
    take one gradient step on them, as a compressor adapts to the text it has read. Each step is
    divided by the gradient's RMS measured on training text (``mean_sq``, from
    ``gradient_mean_square``; needed when ``lr`` > 0), and ``decay`` pulls the weights back
    toward the trained ones, harder where that RMS is larger (at most all the way). The model is
    restored afterwards. Choose ``lr``/``decay`` on text the model never trained on and never on
    the split being scored: bench/dynamic.py."""
    if lr > 0 and mean_sq is None:
        raise ValueError("dynamic evaluation's steps need the gradients' mean square (gradient_mean_square)")
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    if mean_sq is not None:
        rms = {n: v.sqrt() for n, v in mean_sq.items()}
        mean_rms = torch.cat([v.flatten() for v in rms.values()]).mean()
        pull = {n: (decay * v / mean_rms).clamp(max=1.0) for n, v in rms.items()}
    was_training = model.training
    model.eval()  # no dropout while adapting
    text = Stream([ids] if isinstance(ids, np.ndarray) else ids)
    state, total_bits, total, pieces = None, 0.0, 0, []
    t0 = time.time()
    try:
        while len(piece := text.take(segment)) >= 2:
            block = torch.from_numpy(piece.astype(np.int64))[None, :]
            x, y = block[:, :-1], block[:, 1:]
            model.zero_grad(set_to_none=True)
            logits, state = model(x, state)
            each = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            nats = each.sum()
            total_bits += nats.item() / math.log(2)  # counted before the update
            total += y.numel()
            if per_char:
                pieces.append(each.detach().numpy() / math.log(2))
            state = detach(state)
            if lr > 0:
                (nats / y.numel()).backward()
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if p.grad is None:
                            continue
                        p.sub_(lr * p.grad / rms[n])
                        if decay:
                            p.add_(pull[n] * (trained[n] - p))
            if progress and (total // segment) % 500 == 1:
                print(f"dynamic: {total:,} chars, {total_bits / total:.4f} bpc, {time.time() - t0:.0f} s", flush=True)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(trained[n])
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if total == 0:
        raise LstmgenError("the evaluation split holds fewer than 2 characters")
    if per_char:
        return total_bits / total, np.concatenate(pieces)
    return total_bits / total


MIXTURE_BYTES_PER_CHAR = 800  # the count model's peak, measured at 590-780 bytes per character (order 10)


def require_mixture_memory(chars: int, available: int | None = None) -> int:
    """The count model holds every position of the training and scored text at once: say what
    that needs, and refuse up front (not be killed without a word) when it would not fit in 80 %
    of the memory available now. Returns the bytes needed."""
    import psutil

    need = chars * MIXTURE_BYTES_PER_CHAR
    available = psutil.virtual_memory().available if available is None else available
    if need > 0.8 * available:
        raise LstmgenError(f"--mix-counts on {chars:,} characters needs ~{need / 2**30:.1f} GiB "
                           f"({MIXTURE_BYTES_PER_CHAR} bytes per character of training and scored text), "
                           f"{available / 2**30:.1f} GiB available; leave out --mix-counts or use a machine with more memory")
    return need


def evaluate(cfg: EvaluateConfig) -> dict:
    loaded = checkpoint.load(cfg.checkpoint)
    checkpoint.check_vocab(loaded, cfg.data)
    if cfg.mix_counts:
        splits = json.loads(storage.read_text(storage.join(cfg.data, "manifest.json")))["splits"]
        chars = splits.get("train", {}).get("chars", 0) + splits.get(cfg.split, {}).get("chars", 0)
        need = require_mixture_memory(chars)
        print(f"evaluate: the count model needs ~{need / 2**30:.2f} GiB for {chars:,} characters", file=sys.stderr)
    model = loaded.model()
    reader = SplitReader(cfg.data, cfg.split)  # streamed: memory stays flat however long the split
    t0 = time.time()
    extra: dict = {}
    mean_sq = None
    if cfg.dynamic and cfg.dynamic_lr > 0:  # the steps' scale, from the start of the training text (bounded: PRIOR_CHARS)
        mean_sq = gradient_mean_square(model, split_ids(cfg.data, "train", max_chars=PRIOR_CHARS), cfg.segment)
    if cfg.mix_counts:
        from lstmgen.mixture import Mixture

        ids = split_ids(cfg.data, cfg.split)  # the count model holds the text at once (its stated need)
        lr = cfg.dynamic_lr if cfg.dynamic else 0.0
        bpc, lstm_bits = dynamic_bpc(model, ids, segment=cfg.segment, lr=lr, decay=cfg.dynamic_decay,
                                     mean_sq=mean_sq, per_char=True)
        mixture = Mixture(split_ids(cfg.data, "train"), ids, len(loaded.vocab), cfg.mix_counts)
        extra = {"count_bpc": float(mixture.count_bits(cfg.mix_lr).mean()),
                 "mixture_bpc": float(mixture.mixed_bits(lstm_bits, cfg.mix_lr).mean())}
    elif cfg.dynamic:
        bpc = dynamic_bpc(model, reader.ids(), segment=cfg.segment, lr=cfg.dynamic_lr, decay=cfg.dynamic_decay,
                          mean_sq=mean_sq, progress=True)
    else:
        bits, scored = carried_bits(model, reader.rows(cfg.rows))
        bpc = bits / scored
    return {"checkpoint": loaded.path, "split": cfg.split, "chars": reader.chars, "bpc": bpc, "dynamic": cfg.dynamic,
            "step": loaded.meta.get("step"), "seconds": round(time.time() - t0, 2), **extra}
