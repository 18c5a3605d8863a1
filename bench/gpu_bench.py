"""GPU figures for the model (no Ray needed): training chars/s of the explicit cell against
cuDNN (cell="fused") with bf16 autocast, and generation chars/s of carried-state sampling at
several batch sizes. Explicit and fused are interleaved in rounds in one process.

    python bench/gpu_bench.py            # on a GPU machine (bench/gpu.sh runs it)
    python bench/gpu_bench.py --quick    # tiny sizes, to check the script on a CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstmgen.config import SampleConfig  # noqa: E402
from lstmgen.model import CharLSTM, ModelConfig, bits_per_char  # noqa: E402
from lstmgen.sample import sample_next  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_rate(model: CharLSTM, opt, batch: int, seq: int, steps: int, device: str, amp: bool) -> float:
    v = model.cfg.vocab_size
    x = torch.randint(0, v, (batch, seq), device=device)
    y = torch.randint(0, v, (batch, seq), device=device)
    ctx = torch.autocast(device, dtype=torch.bfloat16) if amp else torch.autocast(device, enabled=False)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        with ctx:
            logits, _ = model(x)
            loss = bits_per_char(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return batch * seq * steps / (time.perf_counter() - t0)


def generate_rate(model: CharLSTM, batch: int, length: int, device: str, amp: bool) -> float:
    ids = torch.zeros(batch, dtype=torch.long, device=device)
    seeds = np.arange(batch, dtype=np.uint64)
    cfg = SampleConfig(temperature=0.8)
    ctx = torch.autocast(device, dtype=torch.bfloat16) if amp else torch.autocast(device, enabled=False)
    state = None
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), ctx:
        for t in range(length):
            logits, state = model.step(ids, state)
            ids = sample_next(logits.float(), cfg, seeds, t)
    sync(device)
    return batch * length / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    amp = device == "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, bf16 autocast {amp}")
    shapes = [(256, 64, 64, 3)] if args.quick else [(512, 64, 128, 20), (512, 256, 128, 20), (1024, 256, 128, 10)]
    print(f"\n{'hidden':>6} {'batch':>5} {'seq':>4} | {'explicit chars/s':>16} {'fused chars/s':>14} {'ratio':>6}")
    for hidden, batch, seq, steps in shapes:
        rates = {"explicit": [], "fused": []}
        torch.manual_seed(0)
        model = CharLSTM(ModelConfig(vocab_size=260, embed=128, hidden=hidden, layers=2, dropout=0.1, embed_dropout=0.1)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for cell in ("explicit", "fused"):  # warm-up (cuDNN plans, allocator)
            model.rnn.cell = cell
            train_rate(model, opt, batch, seq, 2, device, amp)
        for _ in range(3):  # interleaved rounds
            for cell in ("explicit", "fused"):
                model.rnn.cell = cell
                rates[cell].append(train_rate(model, opt, batch, seq, steps, device, amp))
        e, f = np.median(rates["explicit"]), np.median(rates["fused"])
        print(f"{hidden:6d} {batch:5d} {seq:4d} | {e:16,.0f} {f:14,.0f} {e / f:6.2f}", flush=True)

    print(f"\n{'hidden':>6} {'batch':>5} | {'generate chars/s (fused step)':>30} {'explicit step':>14}")
    model = CharLSTM(ModelConfig(vocab_size=260, embed=128, hidden=512, layers=2, dropout=0.0, embed_dropout=0.0)).to(device).eval()
    for batch in ([1, 16] if args.quick else [1, 64, 256, 1024, 4096]):
        row = {}
        for cell in ("fused", "explicit"):
            model.rnn.cell = cell
            generate_rate(model, batch, 20, device, amp)
            row[cell] = generate_rate(model, batch, 50 if args.quick else 300, device, amp)
        print(f"{512:6d} {batch:5d} | {row['fused']:30,.0f} {row['explicit']:14,.0f}", flush=True)


if __name__ == "__main__":
    main()
