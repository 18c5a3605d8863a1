"""Training throughput on this CPU: the explicit cell against torch.nn.LSTM (cell="fused"), each in
fp32 and under bf16 autocast (`--precision bf16`), on the same weights, in one
process, interleaved rounds (the machine is noisy: compare ratios, not absolute figures). Prints
a table and the ratios per size. bf16 pays where the CPU has bf16 matrix instructions (AMX,
AVX-512 BF16: `grep -o 'amx_bf16\|avx512_bf16' /proc/cpuinfo`); on a CPU without them the
fused cell runs fp32 even under bf16 autocast (oneDNN has no bf16 LSTM there). The process keeps
freed memory for reuse as `lstmgen train`'s workers do (`keep_freed_memory`); `--malloc-defaults`
leaves glibc's defaults, under which a step's large buffers may be faulted in again every step.

    python bench/train_speed.py [--threads 2] [--rounds 5] [--batch 32] [--sizes 256x1,512x1,512x2]
    python bench/train_speed.py --batch 8 --sizes 384x1 --threads 1   # the defaults, one worker's share
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
from lstmgen.train import keep_freed_memory  # noqa: E402


def chars_per_s(model, opt, x, y, steps: int, bf16: bool) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model(x)
        loss = bits_per_char(logits.float(), y)
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
    ap.add_argument("--sizes", default="256x1,512x1,512x2", help="HIDDENxLAYERS,...")
    ap.add_argument("--malloc-defaults", action="store_true", help="leave glibc's malloc as it is")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kept = not args.malloc_defaults and keep_freed_memory()
    variants = {"explicit fp32": ("explicit", False), "explicit bf16": ("explicit", True), "fused fp32": ("fused", False),
                "fused bf16": ("fused", True)}
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x {args.seq} chars, vocab 260, "
          + ("freed memory kept for reuse" if kept else "malloc's defaults"))
    print(f"{'hidden':>6} {'layers':>6} | " + " ".join(f"{name + ' chars/s':>20}" for name in variants)
          + " | explicit/fused fp32  bf16  | explicit bf16/fp32")
    for size in args.sizes.split(","):
        hidden, layers = (int(v) for v in size.split("x"))
        steps = max(2, 3 * 256 * 32 // (hidden * layers * args.batch))
        torch.manual_seed(0)
        model = CharLSTM(ModelConfig(vocab_size=260, embed=64, hidden=hidden, layers=layers, dropout=0.1, embed_dropout=0.1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 260, (args.batch, args.seq))
        y = torch.randint(0, 260, (args.batch, args.seq))
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.rounds + 1):
            for name in list(variants) if r % 2 == 0 else list(variants)[::-1]:
                model.rnn.cell, bf16 = variants[name]
                rate = chars_per_s(model, opt, x, y, steps, bf16)
                if r:  # round 0 warms up
                    rates[name].append(rate)
        median = {name: float(np.median(v)) for name, v in rates.items()}
        print(f"{hidden:6d} {layers:6d} | " + " ".join(f"{median[name]:20,.0f}" for name in variants)
              + f" | {median['explicit fp32'] / median['fused fp32']:19.2f} {median['explicit bf16'] / median['fused bf16']:5.2f}"
              f" | {median['explicit bf16'] / median['explicit fp32']:18.2f}",
              flush=True)


if __name__ == "__main__":
    main()
