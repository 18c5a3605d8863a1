"""Generation: a prime warms the LSTM state, then characters are sampled one at a time with the
state carried (each new character costs one ``step``, never a re-run of the prefix).

``generate_batch`` is the one implementation. ``stream`` runs it for a single row and prints
characters as they come; ``generate_job`` runs it on a Ray Data actor pool for primes x samples,
each actor loading the checkpoint once and generating whole batches of rows in one tensor batch.

Output rows (JSONL or Parquet) have the fields
``prime, prime_index, sample, seed, text, chars, nll_per_char, stop_reason`` where ``text`` is the
continuation only, ``nll_per_char`` the mean negative log-likelihood (nats, under the model at
temperature 1) of the characters it sampled, and ``stop_reason`` one of ``length``, ``stop``
(a --stop string was produced; it is not included in ``text``) or ``next_article``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lstmgen import capacity, checkpoint, storage
from lstmgen.config import GenerateConfig, SampleConfig
from lstmgen.corpus import Vocab
from lstmgen.errors import LstmgenError
from lstmgen.model import CharLSTM
from lstmgen.sample import derive_seed, sample_next

# A WikiText top-level heading on a line of its own (" = Title = "), not a section (" = = S = = ").
TOP_HEADING = re.compile(r"(?:^|\n)( = [^=\n](?:[^\n]*[^=\n])? = )\n$")


def article_prime(title: str) -> str:
    return f" = {title.strip()} = \n"


def check_prime(prime: str, vocab: Vocab) -> None:
    if not prime:
        raise LstmgenError("the prime is empty; give at least one character")
    unknown = vocab.unknown(prime)
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10])
        raise LstmgenError(f"prime has {len(unknown)} character(s) the model never saw in training: {shown}")


def _stopped(text: str, cfg: SampleConfig) -> tuple[str, str] | None:
    """(kept text, reason) once a row must stop, else None."""
    for s in cfg.stop:
        if s and text.endswith(s):
            return text[: len(text) - len(s)], "stop"
    if cfg.until_next_article and text.endswith("\n"):
        m = TOP_HEADING.search(text)
        if m:
            return text[: m.start(1)], "next_article"
    return None


@torch.no_grad()
def generate_batch(model: CharLSTM, vocab: Vocab, primes: list[str], seeds: list[int], cfg: SampleConfig,
                   device: str = "cpu", on_text: Callable[[str], None] | None = None) -> list[dict]:
    """Generate one continuation per row. Rows with the same prime share one warm-up pass; each
    row's randomness comes from its own seed only, so rows never influence each other."""
    n = len(primes)
    states, logits = [None] * n, [None] * n
    for prime in dict.fromkeys(primes):
        ids = torch.tensor([vocab.encode(prime)], device=device)
        out, state = model(ids)
        for r in (r for r in range(n) if primes[r] == prime):
            states[r], logits[r] = state, out[0, -1]
    state = [(torch.cat([s[k][0] for s in states]), torch.cat([s[k][1] for s in states]))
             for k in range(model.cfg.layers)]
    last = torch.stack(logits)
    seed_arr = np.array(seeds, dtype=np.uint64)
    out_ids: list[list[int]] = [[] for _ in range(n)]
    columns: list[np.ndarray] = []  # fast path: no stop conditions, no streaming
    nll = np.zeros(n)
    texts = [""] * n
    reasons = ["length"] * n
    active = np.ones(n, dtype=bool)
    per_row = bool(cfg.stop) or cfg.until_next_article or on_text is not None
    for t in range(cfg.length):
        nxt = sample_next(last, cfg, seed_arr, t)
        logp = torch.log_softmax(last.float(), dim=-1).gather(1, nxt[:, None])[:, 0].cpu().numpy()
        if per_row:
            chars = nxt.tolist()
            for r in np.flatnonzero(active):
                out_ids[r].append(chars[r])
                nll[r] -= logp[r]
                ch = vocab.tokens[chars[r]]
                texts[r] += ch
                if on_text:
                    on_text(ch)
                hit = _stopped(texts[r], cfg)
                if hit:
                    texts[r], reasons[r] = hit
                    active[r] = False
        else:
            columns.append(nxt.cpu().numpy())
            nll -= logp
        if not active.any() or t == cfg.length - 1:
            break
        last, state = model.step(nxt, state)
    if not per_row:
        out_ids = np.stack(columns, axis=1).tolist()
        texts = [vocab.decode(ids) for ids in out_ids]
    return [{"prime": primes[r], "seed": int(seeds[r]), "text": texts[r], "chars": len(texts[r]),
             "nll_per_char": float(nll[r] / max(1, len(out_ids[r]))), "stop_reason": reasons[r]} for r in range(n)]


def load_for_generation(path: str, device: str = "cpu") -> tuple[CharLSTM, Vocab, str]:
    loaded = checkpoint.load(path, map_location=device)
    return loaded.model(device), loaded.vocab, loaded.path


def stream(cfg: GenerateConfig, out=sys.stdout) -> dict:
    """Single prime: print the prime, then each character as it is sampled."""
    model, vocab, _ = load_for_generation(cfg.checkpoint)
    prime = article_prime(cfg.article) if cfg.article else cfg.prime
    check_prime(prime, vocab)
    out.write(prime)
    out.flush()

    def emit(ch: str) -> None:
        out.write(ch)
        out.flush()

    row = generate_batch(model, vocab, [prime], [derive_seed(cfg.sampling.seed, 0, 0)], cfg.sampling, on_text=emit)[0]
    out.write("\n")
    return row


# ---------------------------------------------------------------------------------------------
# Batch job on Ray Data


def read_primes(cfg: GenerateConfig) -> list[dict]:
    """--primes-file lines (or JSONL objects with "prime" and optional "num_samples"), or the
    single --prime / --article."""
    if not cfg.primes_file:
        return [{"prime": article_prime(cfg.article) if cfg.article else cfg.prime}]
    text = storage.read_text(cfg.primes_file)
    primes = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if cfg.primes_file.endswith(".jsonl"):
            try:
                item = json.loads(line)
                entry = {"prime": article_prime(item["article"]) if "article" in item else item["prime"]}
                if "num_samples" in item:
                    entry["num_samples"] = int(item["num_samples"])
            except (ValueError, KeyError, TypeError) as exc:
                raise LstmgenError(f"{cfg.primes_file}:{n}: not a JSON object with a \"prime\" ({exc})") from exc
            primes.append(entry)
        else:
            primes.append({"prime": line.replace("\\n", "\n")})
    if not primes:
        raise LstmgenError(f"{cfg.primes_file}: no primes in the file")
    return primes


class GenerateActor:
    """Loads the checkpoint once; each call generates a whole batch of rows together."""

    def __init__(self, checkpoint_path: str, sampling: dict, device: str):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.device = device
        self.model, self.vocab, _ = load_for_generation(checkpoint_path, device)
        self.cfg = SampleConfig(**sampling)

    def __call__(self, batch: dict) -> dict:
        rows = generate_batch(self.model, self.vocab, [str(p) for p in batch["prime"]],
                              [int(s) for s in batch["seed"]], self.cfg, self.device)
        out = {k: [r[k] for r in rows] for k in rows[0]}
        out["prime_index"] = batch["prime_index"]
        out["sample"] = batch["sample"]
        return out


def output_format(cfg: GenerateConfig) -> str:
    if cfg.format:
        return cfg.format
    if cfg.out.endswith(".parquet"):
        return "parquet"
    if cfg.out.endswith((".jsonl", ".json")):
        return "jsonl"
    raise LstmgenError(f"{cfg.out}: cannot tell the format from the name; use .jsonl or .parquet, or --format")


SCHEMA = pa.schema([("prime", pa.string()), ("prime_index", pa.int64()), ("sample", pa.int64()),
                    ("seed", pa.int64()), ("text", pa.string()), ("chars", pa.int64()),
                    ("nll_per_char", pa.float64()), ("stop_reason", pa.string())])


def generate_job(cfg: GenerateConfig) -> dict:
    import ray

    fmt = output_format(cfg)
    storage.require_prefix(cfg.out)
    storage.check_bucket(cfg.out)
    if storage.exists(cfg.out) and not cfg.overwrite:
        raise LstmgenError(f"{cfg.out}: already exists; pass --overwrite to replace it")
    primes = read_primes(cfg)
    loaded = checkpoint.load(cfg.checkpoint)
    for p in primes:
        check_prime(p["prime"], loaded.vocab)
    items = [{"prime_index": i, "prime": p["prime"], "sample": s, "seed": derive_seed(cfg.sampling.seed, i, s)}
             for i, p in enumerate(primes) for s in range(p.get("num_samples", cfg.num_samples))]
    capacity.require_shared_storage({"--checkpoint": loaded.path}, cfg.shared_fs)
    bundle, use_gpu = capacity.bundle_for(cfg.gpu)
    capacity.require("generate", bundle, cfg.concurrency, cfg.wait_timeout)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    device = "cuda" if use_gpu else "cpu"
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * cfg.concurrency))).map_batches(
        GenerateActor,
        fn_constructor_kwargs={"checkpoint_path": loaded.path, "sampling": asdict(cfg.sampling), "device": device},
        batch_size=cfg.batch_size, batch_format="numpy", concurrency=cfg.concurrency,
        num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
        resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")} or None,
    )
    t0, chars, done = time.time(), 0, 0
    from tqdm import tqdm

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "out")
        writer = pq.ParquetWriter(local, SCHEMA) if fmt == "parquet" else open(local, "w", encoding="utf-8")
        with tqdm(total=len(items), unit="sample", desc="generate", file=sys.stderr) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                table = batch.select(SCHEMA.names).cast(SCHEMA)
                if fmt == "parquet":
                    writer.write_table(table)
                else:
                    for row in table.to_pylist():
                        writer.write(json.dumps(row, ensure_ascii=False) + "\n")
                chars += sum(table.column("chars").to_pylist())
                done += table.num_rows
                bar.update(table.num_rows)
        writer.close()
        storage.write_file(cfg.out, local)  # streamed: the driver never holds every row
    seconds = time.time() - t0
    print(f"generate: {done} samples, {chars:,} chars in {seconds:.1f} s ({chars / max(seconds, 1e-9):,.0f} chars/s) -> {cfg.out}")
    return {"samples": done, "chars": chars, "seconds": seconds, "out": cfg.out}
