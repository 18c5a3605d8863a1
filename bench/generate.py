"""Generation throughput on this CPU. For batch sizes 1, 16, 64, 256 at hidden 512: chars/s of
carried-state generation (model.step + sampling) and, in the same run, the FLOP/s this machine's
GEMM reaches on the same shapes, with the ratio achieved/GEMM. Then a 10,000-sample batch job
(100 primes x 100 samples x 500 chars) through `lstmgen generate` on Ray Data: wall time and
peak RSS of the whole process tree.

    python bench/generate.py [--checkpoint RUN] [--skip-job]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstmgen import checkpoint  # noqa: E402
from lstmgen.config import SampleConfig  # noqa: E402
from lstmgen.corpus import Vocab  # noqa: E402
from lstmgen.generate import generate_batch  # noqa: E402
from lstmgen.model import CharLSTM, ModelConfig  # noqa: E402

HIDDEN, EMBED, VOCAB = 512, 64, 260


def step_flops(batch: int) -> float:
    """Multiply-adds x 2 of one step: input GEMM, hidden GEMM, output head."""
    return 2 * batch * (EMBED * 4 * HIDDEN + HIDDEN * 4 * HIDDEN + HIDDEN * VOCAB)


def gemm_flops_per_s(batch: int, seconds: float = 1.5) -> float:
    a = torch.randn(batch, HIDDEN)
    w1, w2, w3 = torch.randn(EMBED, 4 * HIDDEN), torch.randn(HIDDEN, 4 * HIDDEN), torch.randn(HIDDEN, VOCAB)
    e = torch.randn(batch, EMBED)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        e @ w1
        a @ w2
        a @ w3
        n += 1
    return n * step_flops(batch) / (time.perf_counter() - t0)


def peak_rss_of_tree(proc: subprocess.Popen, peak: list) -> None:
    """Peak memory of a process and all its descendants (Ray's raylet, workers, object store):
    proportional set size (PSS) where the OS gives it, so pages shared between processes (the
    object store, libraries) are counted once in total rather than once per process."""
    import psutil

    def size(p) -> int:
        try:
            return p.memory_full_info().pss
        except (psutil.AccessDenied, AttributeError):
            return p.memory_info().rss

    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += size(p)
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
            time.sleep(0.5)
    except psutil.Error:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="a trained run; default: a random 1 x 512 model")
    ap.add_argument("--skip-job", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            loaded = checkpoint.load(args.checkpoint)
            model, vocab, ckpt = loaded.model(), loaded.vocab, loaded.path
        else:
            vocab = Vocab.from_codepoints(range(32, 32 + VOCAB - 1))
            cfg = ModelConfig(vocab_size=len(vocab), embed=EMBED, hidden=HIDDEN, layers=1, dropout=0.0, embed_dropout=0.0)
            model = CharLSTM(cfg).eval()
            ckpt = f"{tmp}/checkpoint_0000000"
            checkpoint.save(ckpt, {"model": model.state_dict(), "optimizer": {}, "step": 0, "elapsed": 0.0},
                            {"step": 0, "metrics": {}, "model": asdict(model.cfg), "vocab": vocab.tokens, "train": {}})
        print(f"hidden {HIDDEN}, 1 layer, vocab {len(vocab)}, 2 threads, {torch.__version__}")
        print(f"{'batch':>5} | {'chars/s':>10} {'achieved GFLOP/s':>16} {'GEMM GFLOP/s':>13} {'ratio':>6}")
        length = 200
        for batch in (1, 16, 64, 256):
            cfg = SampleConfig(length=length, temperature=0.8)
            generate_batch(model, vocab, ["The "] * batch, list(range(batch)), SampleConfig(length=10))
            t0 = time.perf_counter()
            generate_batch(model, vocab, ["The "] * batch, list(range(batch)), cfg)
            rate = batch * length / (time.perf_counter() - t0)
            achieved = rate * step_flops(1)
            gemm = gemm_flops_per_s(batch)
            print(f"{batch:5d} | {rate:10,.0f} {achieved / 1e9:16.1f} {gemm / 1e9:13.1f} {achieved / gemm:6.2f}", flush=True)
        if args.skip_job:
            return
        primes = Path(tmp, "primes.txt")
        primes.write_text("".join(f"The {i} \n" for i in range(100)))
        out = Path(tmp, "gen.jsonl")
        cmd = [sys.executable, "-m", "lstmgen.cli", "generate", "--checkpoint", ckpt, "--primes-file", str(primes),
               "--num-samples", "100", "--length", "500", "--batch-size", "128", "--concurrency", "2", "--out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        peak = [0]
        watcher = threading.Thread(target=peak_rss_of_tree, args=(proc, peak), daemon=True)
        watcher.start()
        stdout, _ = proc.communicate()
        wall = time.perf_counter() - t0
        rows = sum(1 for _ in out.open()) if out.exists() else 0
        chars = sum(json.loads(line)["chars"] for line in out.open()) if rows else 0
        print(f"\n10,000-sample job: {rows:,} rows, {chars:,} chars in {wall:.0f} s ({chars / wall:,.0f} chars/s "
              f"end to end), peak memory (PSS) of the process tree {peak[0] / 2**30:.2f} GiB, exit {proc.returncode}")
        print(stdout.strip().splitlines()[-1] if stdout.strip() else "")


if __name__ == "__main__":
    main()
