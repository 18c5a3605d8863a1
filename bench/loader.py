"""Data loading against training: how many batches per second the Arrow->torch collate delivers
(alone, and through Ray Data's iter_batches as the workers use it), Ray Data's default tensor
conversion for comparison, and how many batches per second training consumes (default model).

    python bench/loader.py [--corpus ../shared/data/wikitext-2-raw/wiki.test.raw]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstmgen.config import PrepareConfig, TrainConfig  # noqa: E402
from lstmgen.model import CharLSTM, ModelConfig, bits_per_char  # noqa: E402
from lstmgen.runtime import init_ray  # noqa: E402
from lstmgen.windows import collate, read_split  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def rate(batches, seconds_budget: float = 5.0) -> float:
    n, t0 = 0, time.perf_counter()
    for _ in batches:
        n += 1
        if time.perf_counter() - t0 > seconds_budget:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(WIKI))
    args = ap.parse_args()
    import ray

    from lstmgen.prepare import prepare

    cfg = TrainConfig(data="", run="")
    init_ray(workers=1)
    with tempfile.TemporaryDirectory() as tmp:
        prepare(PrepareConfig(out=f"{tmp}/d", corpus=[args.corpus]))
        table = read_split(f"{tmp}/d", "train")
        b = cfg.batch_size

        def plain():
            while True:
                for i in range(0, table.num_rows - b, b):
                    yield collate(table.slice(i, b))

        ds = ray.data.read_parquet(f"{tmp}/d/train", columns=["ids", "length"]).materialize()

        def through_ray():
            while True:
                for batch in ds.iter_batches(batch_size=b, batch_format="pyarrow", drop_last=True):
                    yield collate(batch)

        def ray_default():
            while True:
                yield from ds.iter_torch_batches(batch_size=b, drop_last=True)

        r_plain, r_ray, r_default = rate(plain()), rate(through_ray()), rate(ray_default())

    torch.set_num_threads(1)  # one training worker's share of this machine
    model = CharLSTM(ModelConfig(vocab_size=260, embed=cfg.embed, hidden=cfg.hidden, layers=cfg.layers, dropout=cfg.dropout,
                                 embed_dropout=cfg.embed_dropout))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x, y = next(plain())
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 10:
        logits, _ = model(x)
        loss = bits_per_char(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    r_train = steps / (time.perf_counter() - t0)
    print(f"batch {b} windows x {x.shape[1]} chars, hidden {cfg.hidden}")
    print(f"{'path':44} {'batches/s':>10} {'x training':>11}")
    for name, r in (("collate on pyarrow slices", r_plain), ("Ray Data iter_batches(pyarrow) + collate", r_ray),
                    ("Ray Data iter_torch_batches (default)", r_default), ("training consumes (1 thread)", r_train)):
        print(f"{name:44} {r:10.1f} {r / r_train:11.1f}")
    print(f"ratio collate via Ray Data / training: {r_ray / r_train:.1f}x (target >= 20x); "
          f"collate vs Ray's default conversion: {r_ray / r_default:.1f}x")


if __name__ == "__main__":
    main()
