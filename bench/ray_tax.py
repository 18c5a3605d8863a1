"""The Ray tax: `lstmgen train --workers 1` against the same training step in a plain process
(same model, optimizer, collate, threads), interleaved. Reports per-step time of each, their
ratio, and how long `lstmgen train` takes from its start to its first training step.

    python bench/ray_tax.py [--steps 150] [--rounds 2]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstmgen.config import TrainConfig  # noqa: E402
from lstmgen.corpus import Vocab  # noqa: E402
from lstmgen.model import CharLSTM, ModelConfig, bits_per_char  # noqa: E402
from lstmgen.windows import collate, read_split  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def plain_step_seconds(data: str, steps: int) -> float:
    cfg = TrainConfig(data=data, run="")
    torch.set_num_threads(2)  # what one Ray worker gets on this 2-core machine
    vocab = Vocab.from_json(Path(data, "vocab.json").read_text())
    model = CharLSTM(ModelConfig(vocab_size=len(vocab), embed=cfg.embed, hidden=cfg.hidden, layers=cfg.layers,
                                 dropout=cfg.dropout, embed_dropout=cfg.embed_dropout, cell=cfg.cell))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    table = read_split(data, "train")
    order = np.random.default_rng(0).permutation(table.num_rows)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        rows = order[(i * cfg.batch_size) % (len(order) - cfg.batch_size):][: cfg.batch_size]
        x, y = collate(table.take(rows))
        logits, _ = model(x)
        loss = bits_per_char(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[10:])


def ray_step_seconds(data: str, run: str, steps: int) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "lstmgen.cli", "train", "--data", data, "--run", run, "--workers", "1",
           "--max-steps", str(steps), "--log-every", "10", "--eval-every", str(steps)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, rates = None, []
    for line in proc.stdout:
        m = re.search(r"step\s+(\d+) \|.*\| ([\d.]+)k chars/s", line)
        if m:
            first = first or time.perf_counter() - t0 - 10 * 0  # time of the first progress line
            if int(m.group(1)) > 20:
                rates.append(float(m.group(2)) * 1e3)
    proc.wait()
    cfg = TrainConfig(data=data, run=run)
    chars_per_step = cfg.batch_size * 64
    return chars_per_step / statistics.median(rates), first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data"
        subprocess.run([sys.executable, "-m", "lstmgen.cli", "prepare", "--corpus", str(WIKI), "--out", data],
                       check=True, capture_output=True)
        plain, ray_steps, firsts = [], [], []
        for r in range(args.rounds):
            plain.append(plain_step_seconds(data, args.steps))
            s, first = ray_step_seconds(data, f"{tmp}/run{r}", args.steps)
            ray_steps.append(s)
            firsts.append(first)
            print(f"round {r}: plain {plain[-1] * 1e3:.1f} ms/step, Ray Train {s * 1e3:.1f} ms/step, "
                  f"first progress line (step 10) {first:.1f} s after start", flush=True)
        p, q = statistics.median(plain), statistics.median(ray_steps)
        print(f"\n{'':24} {'ms/step':>8}")
        print(f"{'plain process':24} {p * 1e3:8.1f}\n{'Ray Train, 1 worker':24} {q * 1e3:8.1f}")
        print(f"ratio Ray/plain per step: {q / p:.3f} (target <= 1.10); first 10 steps done "
              f"{min(firsts):.1f} s after `lstmgen train` started (target: first step < 15 s)")


if __name__ == "__main__":
    main()
