"""The explicit LSTM against a small transformer, same data, same wall-clock budget, one run.

A user choosing a character model would also try a small GPT. This trains one (written here:
token + position embeddings, pre-LayerNorm blocks of causal self-attention and a 4x MLP, head tied
to the embedding) with the recipe of nanoGPT's README for a CPU (block 64, batch 12, 4 layers x
4 heads x 128, dropout 0, AdamW 1e-3 with betas (0.9, 0.99), weight decay 0.1 on matrices, 100
warmup steps, cosine to 1e-4 over the budget, clip 1.0) on the same prepared Parquet data as
`lstmgen train` (the defaults, run through the real CLI), for the same minutes, one after the
other on the same cores. Both are scored on the same held-out text with the same definition:
every held-out character after the first predicted once (the LSTM with its state carried through
the text; the transformer with 33-64 characters of context, windows of 64 at stride 32), plus
each model mixed with the adaptive count model (`evaluate --mix-counts 10`, gate step 0.4).

Prints each model's curve (held-out bpc against training minutes), the table side by side with
the ratio, and for each model 10 samples of 500 characters at temperature 0.8 from fixed primes
with the share of generated words found in the training text. Both curves go to curves.png and
every figure to results.json in the workdir.

    python bench/peer.py [--minutes 10] [--corpus FILE] [--skip-lstm] [--train-args "..."]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lstmgen import checkpoint  # noqa: E402
from lstmgen.config import EvaluateConfig, SampleConfig  # noqa: E402
from lstmgen.corpus import Vocab  # noqa: E402
from lstmgen.evaluate import dynamic_bpc  # noqa: E402
from lstmgen.generate import generate_batch  # noqa: E402
from lstmgen.mixture import Mixture  # noqa: E402
from lstmgen.sample import derive_seed, sample_next  # noqa: E402
from lstmgen.windows import split_ids  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
PRIMES = ["The ", "In 1990 ", " = History = \n", "He was ", "The album ", "During the war ",
          "I plan to make the world a better place", "The city ", "After the ", "She "]


# ---------------------------------------------------------------------------------------------
# The transformer


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int = 64, layers: int = 4, heads: int = 4, width: int = 128):
        super().__init__()
        self.block = block
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def gpt_bits(model: GPT, ids: np.ndarray, stride: int = 32) -> np.ndarray:
    """Bits for every character after the first, each predicted once: windows of ``block`` at
    ``stride``, each scoring the targets the previous windows did not (context 33-64)."""
    block, n = model.block, len(ids)
    bits = np.full(n - 1, np.nan)
    starts = list(range(0, max(1, n - 1 - block), stride)) + [max(0, n - 1 - block)]
    model.eval()
    with torch.no_grad():
        for i in range(0, len(starts), 256):
            group = starts[i : i + 256]
            x = torch.from_numpy(np.stack([ids[s : s + block] for s in group]).astype(np.int64))
            y = torch.from_numpy(np.stack([ids[s + 1 : s + block + 1] for s in group]).astype(np.int64))
            nll = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none") / math.log(2)
            for row, s in zip(nll.numpy(), group):
                todo = np.isnan(bits[s : s + block])  # targets s+1.. s+block are bits[s .. s+block-1]
                bits[s : s + block][todo] = row[todo]
    model.train()
    return bits


def train_gpt(train_ids: np.ndarray, held: np.ndarray, vocab: int, minutes: float, seed: int = 0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = GPT(vocab)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    data = torch.from_numpy(train_ids.astype(np.int64))
    budget, trained, step, curve = minutes * 60, 0.0, 0, []
    every = 60.0 * max(1, round(minutes / 12))  # about a dozen points: each scores all the held-out text
    next_eval = every
    while trained < budget:
        t0 = time.time()
        frac = trained / budget
        lr = 1e-3 * (step + 1) / 100 if step < 100 else 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, len(data) - 65, 12)
        x = torch.stack([data[s : s + 64] for s in starts])
        y = torch.stack([data[s + 1 : s + 65] for s in starts])
        loss = F.cross_entropy(model(x).transpose(1, 2), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        trained += time.time() - t0
        if trained >= next_eval or trained >= budget:  # evaluation time is not counted in the budget
            curve.append((trained / 60, step, float(np.mean(gpt_bits(model, held)))))
            print(f"  gpt   {curve[-1][0]:5.1f} min  step {step:6d}  held-out {curve[-1][2]:.3f} bpc", flush=True)
            next_eval += every
    return model, curve, step


def gpt_samples(model: GPT, vocab: Vocab, cfg: SampleConfig) -> list[str]:
    texts = []
    model.eval()
    with torch.no_grad():
        for i, prime in enumerate(PRIMES):
            ids, seeds = vocab.encode(prime), np.array([derive_seed(cfg.seed, i)], dtype=np.uint64)
            out = []
            for t in range(cfg.length):
                logits = model(torch.tensor([ids[-model.block :]]))[:, -1]
                nxt = int(sample_next(logits, cfg, seeds, t)[0])
                ids.append(nxt)
                out.append(nxt)
            texts.append(vocab.decode(out))
    return texts


# ---------------------------------------------------------------------------------------------
# Side by side


def word_share(texts: list[str], known: set[str]) -> float:
    words = [w for t in texts for w in (re.sub(r"[^\w]", "", w) for w in t.split()) if w]
    return sum(w in known for w in words) / max(1, len(words))


def plot_curves(results: dict[str, dict], path: Path) -> None:
    """Held-out bpc against training minutes, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        minutes, _, bpc = zip(*r["curve"])
        ax.plot(minutes, bpc, marker=".", label=f"{name} ({r['bpc']:.3f} at the end)")
    lowest = min(b for r in results.values() for _, _, b in r["curve"])
    ax.set_ylim(lowest - 0.05, lowest + 0.8)  # the first minutes' high values would flatten the rest
    ax.set_xlabel("training minutes")
    ax.set_ylabel("held-out bits per character")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--corpus", default=str(WIKI))
    ap.add_argument("--workdir", default="bench/out/peer")
    ap.add_argument("--threads", type=int, default=2, help="the transformer's threads (lstmgen: 2 workers x 1)")
    ap.add_argument("--skip-lstm", action="store_true")
    ap.add_argument("--skip-gpt", action="store_true")
    ap.add_argument("--train-args", default="", help="extra flags for lstmgen train")
    args = ap.parse_args()
    work = Path(args.workdir)
    data, run = work / "data", work / "run-lstm"
    cli = [sys.executable, "-m", "lstmgen.cli"]
    if not (data / "manifest.json").exists():
        subprocess.run([*cli, "prepare", "--corpus", args.corpus, "--out", str(data)], check=True, capture_output=True)
    vocab = Vocab.from_json((data / "vocab.json").read_text())
    train_ids, held = split_ids(str(data), "train"), split_ids(str(data), "valid")
    known = {re.sub(r"[^\w]", "", w) for w in vocab.decode(train_ids.tolist()).split()}
    sampling = SampleConfig(length=500, temperature=0.8, seed=0)
    print(f"data: {len(train_ids):,} training chars, {len(held):,} held out, vocabulary {len(vocab)}; "
          f"{args.minutes:g} minutes each, {torch.get_num_threads()} cores here")
    results: dict[str, dict] = {}

    if not args.skip_gpt:
        torch.set_num_threads(args.threads)
        print(f"\ntransformer (nanoGPT's CPU recipe, {args.threads} threads):")
        gpt, curve, steps = train_gpt(train_ids, held, len(vocab), args.minutes)
        bits = gpt_bits(gpt, held)
        texts = gpt_samples(gpt, vocab, sampling)
        mixed = Mixture(train_ids, held, len(vocab), order=10).mixed_bits(bits, 0.4).mean()
        results["transformer"] = {"params": sum(p.numel() for p in gpt.parameters()), "steps": steps, "curve": curve,
                                  "bpc": float(bits.mean()), "mixed": float(mixed), "words": word_share(texts, known),
                                  "samples": texts}

    if not args.skip_lstm:
        print(f"\nLSTM (lstmgen train, its defaults{' with ' + args.train_args if args.train_args else ''}):")
        if run.exists():
            import shutil

            shutil.rmtree(run)
        r = subprocess.run([*cli, "train", "--data", str(data), "--run", str(run), "--max-minutes", f"{args.minutes:g}",
                            *args.train_args.split()], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for row in rows[:: max(1, len(rows) // 10)][:-1] + rows[-1:]:
            print(f"  lstm  {row['elapsed_s'] / 60:5.1f} min  step {row['step']:6d}  held-out {row['val_bpc']:.3f} bpc")
        loaded = checkpoint.load(str(run))
        model = loaded.model()
        # state carried, as evaluate --mix-counts
        _, per_char = dynamic_bpc(model, held, segment=EvaluateConfig.segment, lr=0.0, per_char=True)
        texts = [r["text"] for r in generate_batch(model, vocab, PRIMES, [derive_seed(0, i) for i in range(len(PRIMES))], sampling)]
        results["LSTM"] = {"params": sum(p.numel() for p in model.parameters()), "steps": rows[-1]["step"],
                           "curve": [(row["elapsed_s"] / 60, row["step"], row["val_bpc"]) for row in rows],
                           "bpc": float(per_char.mean()),
                           "mixed": float(Mixture(train_ids, held, len(vocab), order=10).mixed_bits(per_char, 0.4).mean()),
                           "words": word_share(texts, known), "train_args": args.train_args, "samples": texts}

    for name, r in results.items():  # every sample to a file, the first one here
        path = Path(args.workdir) / f"samples-{name.lower()}.txt"
        path.write_text("".join(f"--- prime {p!r}\n{p}{t}\n\n" for p, t in zip(PRIMES, r["samples"])))
        print(f"\n{name}, sample 1 of {len(r['samples'])} (all in {path}):\n{PRIMES[0]}{r['samples'][0]}")

    print(f"\n{'model':12} {'params':>9} {'steps':>7} {'held-out bpc':>12} {'+ count model':>13} {'known words':>11}")
    for name, r in results.items():
        print(f"{name:12} {r['params']:9,} {r['steps']:7,} {r['bpc']:12.4f} {r['mixed']:13.4f} {100 * r['words']:10.1f}%")
    if not results:
        return
    (work / "results.json").write_text(json.dumps({name: {k: v for k, v in r.items() if k != "samples"}
                                                    for name, r in results.items()}, indent=1))
    plot_curves(results, work / "curves.png")
    print(f"\ncurves in {work / 'curves.png'}, figures in {work / 'results.json'}")
    if len(results) == 2:
        print(f"\nLSTM / transformer held-out bpc: {results['LSTM']['bpc'] / results['transformer']['bpc']:.3f} "
              f"({'LSTM ahead' if results['LSTM']['bpc'] < results['transformer']['bpc'] else 'transformer ahead'})")


if __name__ == "__main__":
    main()
