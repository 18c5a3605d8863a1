"""Integer ids -> fixed-length windows -> Parquet, and back from Arrow to torch.

A window holds ``seq_len + 1`` ids: inputs are the first ``seq_len``, targets the last
``seq_len``. Windows start every ``seq_len`` characters, so consecutive windows overlap by one id
and every character after the first of a stream is a target exactly once. The last window of a
stream may be short: ``length`` says how many ids are real; the rest are padding (0) that the
loss ignores.

Parquet schema (one row per window)::

    ids    fixed_size_list<uint8 | uint16>[seq_len + 1]   uint16 once the vocabulary exceeds 256
    length int16                                          real ids in this window (2..seq_len+1)
    index  int64                                          position of the window in its split
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lstmgen import storage
from lstmgen.corpus import Chunk, Vocab, codepoints, read_chunk
from lstmgen.errors import LstmgenError

if TYPE_CHECKING:
    import torch

IGNORE = -100  # target id that cross-entropy skips (padding)


def count_windows(n_chars: int, seq_len: int) -> int:
    return 0 if n_chars < 2 else -(-(n_chars - 1) // seq_len)


def schema(seq_len: int, vocab_size: int) -> pa.Schema:
    value = pa.uint8() if vocab_size <= 256 else pa.uint16()
    return pa.schema([("ids", pa.list_(value, seq_len + 1)), ("length", pa.int16()), ("index", pa.int64())])


def windows_table(ids: np.ndarray, starts: np.ndarray, stream_end: int, first_index: int,
                  seq_len: int, vocab_size: int) -> pa.Table:
    """Cut windows that start at ``starts`` (offsets into ``ids``) and stop at ``stream_end``."""
    sch = schema(seq_len, vocab_size)
    width = seq_len + 1
    dtype = np.uint8 if vocab_size <= 256 else np.uint16
    padded = np.zeros(stream_end + width, dtype=dtype)
    padded[:stream_end] = ids[:stream_end]
    rows = np.lib.stride_tricks.sliding_window_view(padded, width)[starts]  # (n, width), no index matrix
    lengths = np.minimum(stream_end - starts, width).astype(np.int16)
    values = pa.array(rows.reshape(-1), type=sch.field("ids").type.value_type)
    return pa.table(
        [pa.FixedSizeListArray.from_arrays(values, width), pa.array(lengths),
         pa.array(np.arange(first_index, first_index + len(starts), dtype=np.int64))],
        schema=sch,
    )


def encode_chunk(task: dict, tokens: list[str], seq_len: int) -> pa.Table:
    """Pass 2 of prepare: the windows whose first character lies in this chunk.

    ``task`` holds the chunk, its first character's offset in the file (``char0``), and the
    ranges (characters of the file that belong to the split) it overlaps, each with the index of
    its first window in the split."""
    vocab = Vocab(tokens)
    chunk = Chunk(**task["chunk"])
    text, tail = read_chunk(chunk, extra_chars=seq_len + 1)
    ids = vocab.encode_array(codepoints(text + tail))
    c0, c1 = task["char0"], task["char0"] + len(text)
    tables = []
    for s0, s1, first_index in task["ranges"]:  # chars [s0, s1) of the file
        lo = max(c0, s0)
        k0 = -(-(lo - s0) // seq_len)  # first window starting at or after lo
        starts = s0 + seq_len * np.arange(k0, count_windows(s1 - s0, seq_len), dtype=np.int64)
        starts = starts[starts < min(c1, s1 - 1)]
        if len(starts):
            stream_end = min(s1, c0 + len(ids)) - c0
            tables.append(windows_table(ids, starts - c0, stream_end, first_index + k0, seq_len, len(vocab)))
    return pa.concat_tables(tables) if tables else schema(seq_len, len(vocab)).empty_table()


# ---------------------------------------------------------------------------------------------
# Arrow -> torch


def collate(table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
    """A pyarrow batch of windows -> (inputs, targets), int64 (B, seq_len). Padding targets are
    ``IGNORE``. Goes through one flat numpy view of the fixed-size list: no per-row Python.
    (torch is imported here, not at the top: prepare's Ray tasks never need it.)"""
    import torch

    col = table.column("ids").combine_chunks()
    width = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    w = torch.from_numpy(flat.reshape(-1, width).astype(np.int64))
    x, y = w[:, :-1], w[:, 1:].clone()
    lengths = torch.from_numpy(table.column("length").to_numpy().astype(np.int64))
    y[torch.arange(width - 1)[None, :] >= (lengths[:, None] - 1)] = IGNORE
    return x, y


def read_split(data: str, split: str) -> pa.Table:
    """All windows of a split, in order, with plain pyarrow (local or S3)."""
    where = storage.join(data, split)
    manifest_path = storage.join(data, "manifest.json")
    if not storage.exists(manifest_path):
        raise LstmgenError(f"{data}: no manifest.json; is it a directory written by lstmgen prepare?")
    listed = json.loads(storage.read_text(manifest_path))["splits"]
    if split not in listed or not storage.is_dir(where):  # only the splits the manifest lists are trusted
        raise LstmgenError(f"{data}: no {split!r} split here (manifest.json lists {', '.join(listed)})")
    fs, p = storage.resolve(where)
    table = pq.read_table(p, filesystem=fs, schema=None)
    return table.sort_by("index")


def table_ids(table: pa.Table) -> np.ndarray:
    """Undo the windowing of windows given in order: one contiguous id stream (consecutive windows
    overlap by one id; ``length`` drops the padding of a short last window)."""
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    width = table.column("ids").type.list_size
    rows = table.column("ids").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    lengths = table.column("length").to_numpy()
    pieces = [rows[0, : lengths[0]]] + [rows[i, 1 : lengths[i]] for i in range(1, len(rows))]
    return np.concatenate(pieces).astype(np.int64)


def split_ids(data: str, split: str, max_chars: int = 0) -> np.ndarray:
    """A split's ids as one contiguous stream (for evaluation with the LSTM state carried across
    windows). Streams of several files are joined."""
    table = read_split(data, split)
    if max_chars:
        table = table.slice(0, max(1, -(-max_chars // max(1, table.column("ids").type.list_size - 1))))
    return table_ids(table)
