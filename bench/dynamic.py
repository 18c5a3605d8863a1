"""Dynamic evaluation's step size and decay, chosen on text the model never trained on.

Dynamic evaluation (`lstmgen evaluate --dynamic`) takes a gradient step after scoring each
segment, so the model adapts to the text it reads. How large a step pays is best learnt on text
the model never trained on: a model trained for an hour has partly memorised its training text
(its held-out bpc is 0.13-0.2 above its training bpc), so there is less left to adapt to, and
without the decay smaller steps win there. This script
scores a grid of settings on the last 20,000 training characters and on the first half of the
held-out split side by side, chooses on the held-out half, then scores the second half, which the
choice never saw: static, the training tail's choice, `lstmgen evaluate`'s defaults and the held-out choice; last, the
whole split as `lstmgen evaluate --dynamic --mix-counts 10` reports it, with the chosen setting.

    python bench/dynamic.py --run bench/out/peer60/run-lstm --data bench/out/peer60/data
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstmgen import checkpoint  # noqa: E402
from lstmgen.config import EvaluateConfig  # noqa: E402
from lstmgen.evaluate import PRIOR_CHARS, dynamic_bpc, evaluate, gradient_mean_square  # noqa: E402
from lstmgen.windows import split_ids  # noqa: E402

TAIL = 20_000  # training characters, as bench/quality.py chose on them before


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a training run (its best checkpoint) or one checkpoint")
    ap.add_argument("--data", required=True)
    ap.add_argument("--lrs", type=floats, default=floats("5e-4,7e-4,1e-3,1.4e-3,2e-3"))
    ap.add_argument("--decays", type=floats, default=floats("3e-4,1e-3,3e-3"))
    ap.add_argument("--mix-counts", type=int, default=10)
    args = ap.parse_args()

    loaded = checkpoint.load(args.run)
    model = loaded.model()
    held = split_ids(args.data, "valid")
    first, second = held[: len(held) // 2], held[len(held) // 2 :]
    train = split_ids(args.data, "train")
    tail = train[-TAIL:]
    default = EvaluateConfig(checkpoint=args.run, data=args.data)
    mean_sq = gradient_mean_square(model, train[:PRIOR_CHARS], default.segment)  # as evaluate --dynamic
    print(f"{loaded.path}: held-out {len(held):,} chars; choose on the first {len(first):,}, "
          f"score the last {len(second):,}")

    print(f"\n{'lr':>7} {'decay':>7} {'training tail bpc':>17} {'held-out first half bpc':>23} {'seconds':>7}")
    grid, tail_grid = {}, {}
    for lr in args.lrs:
        for decay in args.decays:
            t0 = time.time()
            tail_grid[lr, decay] = dynamic_bpc(model, tail, default.segment, lr, decay, mean_sq)
            grid[lr, decay] = dynamic_bpc(model, first, default.segment, lr, decay, mean_sq)
            print(f"{lr:7.2g} {decay:7.2g} {tail_grid[lr, decay]:17.4f} {grid[lr, decay]:23.4f} {time.time() - t0:7.0f}", flush=True)
    lr, decay = min(grid, key=grid.get)
    tail_lr, tail_decay = min(tail_grid, key=tail_grid.get)

    print("\nsecond half (never seen by the choice):")
    settings = {"static (no steps)": (0.0, 0.0),
                f"chosen on the training tail (lr {tail_lr:.2g}, decay {tail_decay:.2g})": (tail_lr, tail_decay),
                f"evaluate's defaults (lr {default.dynamic_lr:.2g}, decay {default.dynamic_decay:.2g})":
                    (default.dynamic_lr, default.dynamic_decay),
                f"chosen on the first half (lr {lr:.2g}, decay {decay:.2g})": (lr, decay)}
    for name, (step, pull) in settings.items():
        print(f"  {name:58} {dynamic_bpc(model, second, default.segment, step, pull, mean_sq):.4f}", flush=True)

    whole = evaluate(EvaluateConfig(checkpoint=args.run, data=args.data, dynamic=True, dynamic_lr=lr,
                                    dynamic_decay=decay, mix_counts=args.mix_counts))
    counts = (f", count model alone {whole['count_bpc']:.4f}, dynamic LSTM + count model {whole['mixture_bpc']:.4f}"
              if args.mix_counts else "")
    print(f"\nwhole split, lr {lr:.2g}, decay {decay:.2g}: dynamic {whole['bpc']:.4f}{counts}")


if __name__ == "__main__":
    main()
