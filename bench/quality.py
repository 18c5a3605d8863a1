"""Held-out quality on WikiText-2 raw (test split; first 90% train, last 10% held out), side by
side with general-purpose compressors on the same split, computed in the same run.

Trains with a preset under its time budget (`lstmgen train --preset P`, the real CLI), prints the
bits-per-character curve, the static held-out bpc (state carried), and the dynamic-evaluation
bpc with `lstmgen evaluate`'s step size and decay (or `--dynamic LR,DECAY`; bench/dynamic.py
chooses them on held-out text, not on the training text the model has partly memorised).
Compressors: gzip, bzip2, xz on the held-out text alone and given the training text first
((size(train + heldout) - size(train)) x 8 / chars), and 7z PPMd when `7z` is installed.

    python bench/quality.py --preset cpu-10min [--run DIR --skip-train] [--dynamic-chars 0]
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstmgen import checkpoint  # noqa: E402
from lstmgen.config import EvaluateConfig  # noqa: E402
from lstmgen.evaluate import PRIOR_CHARS, carried_bpc, dynamic_bpc, gradient_mean_square  # noqa: E402
from lstmgen.windows import split_ids  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def compressors(train: bytes, held: bytes, chars: int) -> list[tuple[str, float, float]]:
    rows = []
    for name, fn in (("gzip -9", lambda b: gzip.compress(b, 9)), ("bzip2 -9", lambda b: bz2.compress(b, 9)),
                     ("xz -9e", lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))):
        alone = len(fn(held)) * 8 / chars
        given = (len(fn(train + held)) - len(fn(train))) * 8 / chars
        rows.append((name, alone, given))
    if shutil.which("7z"):
        def ppmd(b: bytes) -> int:
            with tempfile.TemporaryDirectory() as t:
                Path(t, "x").write_bytes(b)
                subprocess.run(["7z", "a", "-m0=PPMd:o=8", "-mx=9", f"{t}/x.7z", f"{t}/x"], check=True, capture_output=True)
                return Path(t, "x.7z").stat().st_size
        rows.append(("7z PPMd order 8", ppmd(held) * 8 / chars, (ppmd(train + held) - ppmd(train)) * 8 / chars))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-10min")
    ap.add_argument("--workdir", default="bench/out/quality")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--dynamic-chars", type=int, default=-1, help="held-out chars for dynamic eval (-1: all, 0: skip)")
    ap.add_argument("--train-args", default="", help="extra flags for lstmgen train")
    ap.add_argument("--dynamic", default="", help="LR,DECAY instead of evaluate's defaults, e.g. 3e-4,0")
    args = ap.parse_args()
    work = Path(args.workdir)
    data, run = work / "data", work / f"run-{args.preset}"
    cli = [sys.executable, "-m", "lstmgen.cli"]
    if not (data / "manifest.json").exists():
        subprocess.run([*cli, "prepare", "--corpus", str(WIKI), "--out", str(data)], check=True, capture_output=True)
    if not args.skip_train:
        if run.exists():
            shutil.rmtree(run)
        t0 = time.time()
        r = subprocess.run([*cli, "train", "--data", str(data), "--run", str(run), "--preset", args.preset,
                            *args.train_args.split()], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        print(f"trained preset {args.preset} in {(time.time() - t0) / 60:.1f} min (wall, incl. start-up)")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"\n{'step':>7} {'minutes':>7} {'train bpc':>9} {'valid bpc':>9}")
    for r in rows:
        print(f"{r['step']:7d} {r['elapsed_s'] / 60:7.1f} {r['train_bpc']:9.3f} {r['val_bpc']:9.3f}")

    loaded = checkpoint.load(str(run))
    model = loaded.model()
    held = split_ids(str(data), "valid")
    train_ids = split_ids(str(data), "train")
    static = carried_bpc(model, held, rows=16)
    print(f"\nstatic held-out bpc ({len(held):,} chars, state carried): {static:.4f}  [{loaded.path}]")

    if args.dynamic_chars:
        # evaluate's defaults (chosen by bench/dynamic.py on held-out text of other runs) unless given
        lr, decay = ((float(v) for v in args.dynamic.split(",")) if args.dynamic
                     else (EvaluateConfig.dynamic_lr, EvaluateConfig.dynamic_decay))
        segment = EvaluateConfig.segment
        tune = train_ids[-20000:]
        mean_sq = gradient_mean_square(model, train_ids[:PRIOR_CHARS], segment)  # as evaluate --dynamic
        _, tail_bits = dynamic_bpc(model, tune, segment=segment, lr=lr, decay=decay, mean_sq=mean_sq, per_char=True)
        target = held if args.dynamic_chars < 0 else held[: args.dynamic_chars]
        t0 = time.time()
        dyn, lstm_bits = dynamic_bpc(model, target, segment=segment, lr=lr, decay=decay, mean_sq=mean_sq, per_char=True)
        print(f"dynamic held-out bpc (lr {lr:.0e}, decay {decay:.0e}, {len(target):,} chars, {time.time() - t0:.0f} s): {dyn:.4f}")

        # Mixture with the adaptive count model (orders 0-10); the gate's online step size is chosen
        # on the training tail, with the LSTM's dynamic bits there (never on the held-out part).
        from lstmgen.mixture import Mixture

        on_tail = Mixture(train_ids[:-20000], tune, len(loaded.vocab), order=10)
        tail = {mix_lr: on_tail.mixed_bits(tail_bits, mix_lr).mean() for mix_lr in (0.05, 0.1, 0.2, 0.4)}
        mix_lr = min(tail, key=tail.get)
        print("  mixture gate step on training tail: " + ", ".join(f"{k}: {v:.3f}" for k, v in tail.items()))
        mixture = Mixture(train_ids, target, len(loaded.vocab), order=10)
        print(f"count model alone (orders 0-10, training text first): {mixture.count_bits(mix_lr).mean():.4f}")
        print(f"dynamic LSTM + count-model mixture held-out bpc (gate step {mix_lr}): {mixture.mixed_bits(lstm_bits, mix_lr).mean():.4f}")

    text = WIKI.read_bytes().decode("utf-8")
    cut = len(text) - int(len(text) * 0.1)
    train_text, held_text = text[:cut].encode(), text[cut:].encode()
    print(f"\n{'compressor':18} {'held-out alone':>14} {'given train':>11}")
    for name, alone, given in compressors(train_text, held_text, len(text) - cut):
        print(f"{name:18} {alone:14.3f} {given:11.3f}")
    print(f"\nratio static bpc / bzip2-alone: {static / compressors(train_text, held_text, len(text) - cut)[1][1]:.3f}; "
          f"targets: cpu-10min static <= 2.30, best static <= 2.10, dynamic <= 1.95, stretch < 1.83 (PPMd given train)")


if __name__ == "__main__":
    main()
