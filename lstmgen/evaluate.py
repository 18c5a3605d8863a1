"""Held-out bits per character, with the LSTM state carried through the text.

The split is rebuilt as one id stream and cut into ``streams`` contiguous rows that are read in
parallel, ``chunk`` characters at a time, state carried from chunk to chunk: each character is
scored once, with all the context before it in its row (only the first character of each row
starts cold). Training validation and ``lstmgen evaluate`` both use this function.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from lstmgen import checkpoint
from lstmgen.config import EvaluateConfig
from lstmgen.errors import LstmgenError
from lstmgen.model import CharLSTM, detach
from lstmgen.windows import split_stream


def rows_of(ids: np.ndarray, streams: int) -> list[np.ndarray]:
    """Cut a stream into ``streams`` equal rows overlapping by one id (so every id but the first
    is a target once), plus one short row with what is left over."""
    n_targets = len(ids) - 1
    rows = max(1, min(streams, n_targets))
    per = n_targets // rows
    out = [ids[r * per : (r + 1) * per + 1] for r in range(rows)]
    if rows * per < n_targets:
        out.append(ids[rows * per :])
    return out


@torch.no_grad()
def stream_bpc(model: CharLSTM, ids: np.ndarray, streams: int = 16, chunk: int = 256, device: str = "cpu") -> float:
    if len(ids) < 2:
        raise LstmgenError("the evaluation split holds fewer than 2 characters")
    was_training = model.training
    model.eval()
    total_bits, total = 0.0, 0
    rows = rows_of(ids, streams)
    groups = [rows[:-1], rows[-1:]] if len(rows) > 1 and len(rows[-1]) != len(rows[0]) else [rows]
    for group in groups:
        block = torch.from_numpy(np.stack(group)).to(device)
        state = None
        for t in range(0, block.shape[1] - 1, chunk):
            x = block[:, t : t + chunk]
            y = block[:, t + 1 : t + chunk + 1]
            x = x[:, : y.shape[1]]
            logits, state = model(x, state)
            state = detach(state)
            nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
            total_bits += nats.item() / math.log(2)
            total += y.numel()
    model.train(was_training)
    return total_bits / total


def evaluate(cfg: EvaluateConfig) -> dict:
    loaded = checkpoint.load(cfg.checkpoint)
    checkpoint.check_vocab(loaded, cfg.data)
    model = loaded.model()
    ids = split_stream(cfg.data, cfg.split)
    t0 = time.time()
    bpc = stream_bpc(model, ids, streams=cfg.streams)
    return {"checkpoint": loaded.path, "split": cfg.split, "chars": int(len(ids)), "bpc": bpc,
            "step": loaded.meta.get("step"), "seconds": round(time.time() - t0, 2)}
