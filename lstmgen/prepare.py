"""Prepare job: corpus -> vocabulary + Parquet windows, as two Ray Data passes over byte chunks.

Pass 1 counts characters per chunk (which also validates UTF-8), so the driver learns every
chunk's character offset, the split points and the vocabulary of the training split without
reading the text itself. Pass 2 encodes each chunk and cuts its windows straight into Parquet
shards. Memory is bounded by one chunk per task; nothing is O(corpus) in the driver.

Everything is written to a staging directory beside ``--out`` and published only when complete
(``storage.publish``; ``manifest.json`` last): an interrupted prepare, or an interrupted
``--overwrite``, never leaves a mix of old and new data that ``train`` would accept.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from dataclasses import asdict

import numpy as np
import pyarrow.fs as pafs
import ray

from lstmgen import capacity, corpus, storage
from lstmgen.config import PrepareConfig
from lstmgen.corpus import Vocab
from lstmgen.errors import LstmgenError
from lstmgen.windows import count_windows, encode_chunk

MAX_VOCAB = 1 << 16  # window ids are uint8, or uint16 past 256 characters


def prepare(cfg: PrepareConfig) -> dict:
    t0 = time.time()
    out = cfg.out
    storage.require_prefix(out)
    storage.check_bucket(out)
    if storage.exists(storage.join(out, "manifest.json")):
        if not cfg.overwrite:
            raise LstmgenError(f"{out}: already holds prepared data; pass --overwrite to replace it")
    elif storage.walk(out):
        raise LstmgenError(f"{out}: holds files that are not prepared data (no manifest.json); choose another --out")
    # A download lands in the local --cache-dir: on a multi-node cluster that is a local corpus too.
    local_corpus = next((c for c in cfg.corpus if not storage.is_s3(c)), "") if cfg.corpus else cfg.cache_dir
    capacity.require_shared_storage({"--out": out, "--corpus": local_corpus}, cfg.shared_fs)
    sources = cfg.corpus or [corpus.fetch_wikitext(cfg.url, cfg.sha256, cfg.cache_dir)]
    for src in sources:
        storage.check_bucket(src)
    splits = corpus.find_sources(sources)
    files = [f for split in corpus.SPLITS for f in splits.get(split, [])]
    split_of = {f: split for split in corpus.SPLITS for f in splits.get(split, [])}
    chunks = corpus.plan_chunks(files, max(64, int(cfg.chunk_mb * (1 << 20))))
    print(f"prepare: {len(files)} file(s), {sum(c.end - c.start for c in chunks) / 1e6:.1f} MB, {len(chunks)} chunk(s)")

    # Pass 1: characters per chunk. File hashes are computed alongside.
    hashes = [ray.remote(corpus.file_sha256).remote(f) for f in files]
    counted = _dataset([asdict(c) for c in chunks]).map(_count_row).take_all()
    errors = sorted((r["file"], r["start"], r["error"]) for r in counted if r["error"])
    if errors:
        raise LstmgenError(errors[0][2])
    counted.sort(key=lambda r: (r["file"], r["start"]))
    file_chars = [0] * len(files)
    char0 = {}
    for r in counted:
        char0[(r["file"], r["start"])] = file_chars[r["file"]]
        file_chars[r["file"]] += r["chars"]

    # Character ranges of the files that make up each split.
    split_ranges: dict[str, list[tuple[int, int, int]]] = {}  # split -> [(file, c0, c1)]
    for i, f in enumerate(files):
        split_ranges.setdefault(split_of[f], []).append((i, 0, file_chars[i]))
    if "valid" not in splits and cfg.valid_fraction > 0:
        total = sum(file_chars[i] for i, _, _ in split_ranges["train"])
        cut = total - int(total * cfg.valid_fraction)
        train, valid, seen = [], [], 0
        for i, c0, c1 in split_ranges["train"]:
            k = min(max(cut - seen, 0), c1 - c0)
            if k > 0:
                train.append((i, c0, c0 + k))
            if c1 - c0 - k > 0:
                valid.append((i, c0 + k, c1))
            seen += c1 - c0
        split_ranges["train"], split_ranges["valid"] = train, valid

    train_chars = sum(c1 - c0 for _, c0, c1 in split_ranges["train"])
    if train_chars < 2:
        raise LstmgenError(f"{', '.join(sources)}: corpus is empty (need at least 2 characters of training text)")

    # Vocabulary: characters of the training split only.
    train_counts = _count_in_ranges(counted, chunks, split_ranges["train"], char0)
    vocab = Vocab.from_codepoints(train_counts)
    if len(vocab) > MAX_VOCAB:
        raise LstmgenError(f"{', '.join(sources)}: {len(vocab):,} distinct characters in the training text; "
                           f"ids are stored as uint16, so at most {MAX_VOCAB:,} (including <unk>) fit")
    staging = f"{out.rstrip('/')}.partial-{uuid.uuid4().hex[:8]}"  # published as --out when complete
    storage.write_text(storage.join(staging, "vocab.json"), vocab.to_json())

    manifest: dict = {
        "seq_len": cfg.seq_len, "vocab_size": len(vocab),
        "id_type": "uint8" if len(vocab) <= 256 else "uint16",
        "sources": [{"path": f, "split": split_of[f], "bytes": storage.info(f).size, "chars": file_chars[i]}
                    for i, f in enumerate(files)],
        "splits": {}, "config": asdict(cfg),
    }
    # Pass 2: encode and window, one Parquet directory per split.
    fs, root = storage.resolve(staging)
    for split, ranges in split_ranges.items():
        tasks, n_windows = _window_tasks(counted, chunks, ranges, char0, cfg.seq_len)
        target = f"{root}/{split}"
        fs.delete_dir_contents(target, missing_dir_ok=True)
        if n_windows:
            (_dataset(tasks)
             .map_batches(_encode_batch, fn_kwargs={"tokens": vocab.tokens, "seq_len": cfg.seq_len},
                          batch_size=1, batch_format="pyarrow")
             .write_parquet(target, filesystem=fs, compression="zstd", min_rows_per_file=1,
                            write_page_checksum=True))  # a damaged page fails its read, naming its file
        elif isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(target)
        chars = sum(c1 - c0 for _, c0, c1 in ranges)
        counts = _count_in_ranges(counted, chunks, ranges, char0)
        unk = sum(n for cp, n in counts.items() if chr(cp) not in vocab.index)
        manifest["splits"][split] = {"chars": chars, "windows": n_windows, "unk_chars": unk}
        print(f"prepare: {split}: {chars:,} chars -> {n_windows:,} windows ({unk:,} <unk>)")

    for entry, digest in zip(manifest["sources"], ray.get(hashes)):
        entry["sha256"] = digest
    manifest["seconds"] = round(time.time() - t0, 2)
    storage.write_text(storage.join(staging, "manifest.json"), json.dumps(manifest, indent=2, ensure_ascii=False))
    storage.publish(staging, out, last=lambda rel: rel == "manifest.json")
    print(f"prepare: wrote {out} (vocabulary {len(vocab)}, {manifest['seconds']} s)")
    return manifest


def _dataset(items: list[dict]) -> ray.data.Dataset:
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def _count_row(row: dict) -> dict:
    return corpus.count_chars(corpus.Chunk(**{k: row[k] for k in ("file", "path", "start", "end", "size")}))


def _encode_batch(batch, tokens: list[str], seq_len: int):
    task = json.loads(batch.column("task")[0].as_py())
    return encode_chunk(task, tokens, seq_len)


def _count_in_ranges(counted: list[dict], chunks, ranges, char0: dict) -> Counter:
    """Character counts inside the given char ranges. Whole chunks use pass 1's counts; a chunk
    cut by a range boundary (the --valid-fraction split point) is re-read and counted exactly."""
    by_key = {(c.file, c.start): c for c in chunks}
    total: Counter = Counter()
    for r in counted:
        c0 = char0[(r["file"], r["start"])]
        c1 = c0 + r["chars"]
        for f, s0, s1 in ranges:
            if f != r["file"] or not (s0 < c1 and c0 < s1):
                continue
            if s0 <= c0 and c1 <= s1:
                total.update(dict(zip(r["cps"], r["counts"])))
            else:
                text, _ = corpus.read_chunk(by_key[(r["file"], r["start"])])
                cps, counts = np.unique(corpus.codepoints(text[max(s0, c0) - c0 : min(s1, c1) - c0]), return_counts=True)
                total.update(dict(zip(cps.tolist(), counts.tolist())))
    return total


def _window_tasks(counted, chunks, ranges, char0, seq_len) -> tuple[list[dict], int]:
    """One task per chunk that holds the first character of at least one window of the split."""
    n_windows, indexed = 0, []
    for f, s0, s1 in ranges:
        indexed.append((f, s0, s1, n_windows))
        n_windows += count_windows(s1 - s0, seq_len)
    tasks = []
    by_key = {(c.file, c.start): c for c in chunks}
    for r in counted:
        c0 = char0[(r["file"], r["start"])]
        c1 = c0 + r["chars"]
        mine = [(s0, s1, w0) for f, s0, s1, w0 in indexed if f == r["file"] and s0 < c1 and c0 < s1 - 1]
        if mine:
            task = {"chunk": asdict(by_key[(r["file"], r["start"])]), "char0": c0, "ranges": mine}
            tasks.append({"task": json.dumps(task)})
    return tasks, n_windows
