"""Training throughput on this CPU: the explicit cell against torch.nn.LSTM (cell="fused") on the
same weights, in one process, interleaved rounds (the machine is noisy: compare ratios, not
absolute figures). Prints a table and a final ratio line per hidden size.

    python bench/train_speed.py [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstmgen.model import CharLSTM, ModelConfig, bits_per_char  # noqa: E402


def chars_per_s(model, opt, x, y, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, _ = model(x)
        loss = bits_per_char(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return x.numel() * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x {args.seq} chars, vocab 260")
    print(f"{'hidden':>6} {'layers':>6} | {'explicit chars/s':>16} {'fused chars/s':>14} {'explicit/fused':>14}")
    summary = []
    for hidden, layers, steps in ((256, 1, 12), (512, 1, 6), (512, 2, 4)):
        torch.manual_seed(0)
        model = CharLSTM(ModelConfig(vocab_size=260, embed=64, hidden=hidden, layers=layers, dropout=0.1, embed_dropout=0.1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 260, (args.batch, args.seq))
        y = torch.randint(0, 260, (args.batch, args.seq))
        rates: dict[str, list[float]] = {"explicit": [], "fused": []}
        for r in range(args.rounds + 1):
            for cell in ("explicit", "fused") if r % 2 == 0 else ("fused", "explicit"):
                model.rnn.cell = cell
                rate = chars_per_s(model, opt, x, y, steps)
                if r:  # round 0 warms up
                    rates[cell].append(rate)
        e, f = float(np.median(rates["explicit"])), float(np.median(rates["fused"]))
        summary.append((hidden, layers, e / f))
        print(f"{hidden:6d} {layers:6d} | {e:16,.0f} {f:14,.0f} {e / f:14.2f}", flush=True)
    for hidden, layers, ratio in summary:
        print(f"ratio explicit/fused hidden {hidden} x {layers}: {ratio:.2f} (target >= 0.90)")


if __name__ == "__main__":
    main()
