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
from collections.abc import Iterable, Iterator
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


def read_manifest(data: str) -> dict:
    """``DATA/manifest.json``, checked for the fields and types the jobs read, so that a damaged
    one fails here in one line naming it, not in a worker (where Ray Train would restart it)."""
    path = storage.join(data, "manifest.json")
    if not storage.exists(path):
        raise LstmgenError(f"{data}: no manifest.json; run lstmgen prepare --out {data} first")
    try:
        manifest = json.loads(storage.read_text(path))
        counts = [int(part[key]) == part[key] >= 0 for part in manifest["splits"].values() for key in ("chars", "windows")]
        good = int(manifest["seq_len"]) == manifest["seq_len"] > 0 and int(manifest["vocab_size"]) == manifest["vocab_size"] > 1
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LstmgenError(f"{path}: not a manifest written by lstmgen prepare ({type(exc).__name__}: {exc}); "
                           "prepare the data again") from None
    if not (good and all(counts)):
        raise LstmgenError(f"{path}: not a manifest written by lstmgen prepare (seq_len, vocab_size or a split's "
                           "counts is not a positive whole number); prepare the data again")
    return manifest


def read_vocab(data: str, manifest: dict | None = None) -> Vocab:
    """``DATA/vocab.json``, checked against the manifest's vocabulary size."""
    path = storage.join(data, "vocab.json")
    manifest = manifest or read_manifest(data)
    if not storage.exists(path):
        raise LstmgenError(f"{path}: missing; prepare the data again")
    try:
        vocab = Vocab.from_json(storage.read_text(path))
    except (ValueError, KeyError, TypeError, AttributeError, LstmgenError) as exc:
        raise LstmgenError(f"{path}: not a vocabulary written by lstmgen prepare ({type(exc).__name__}: {exc})") from None
    if len(vocab) != manifest["vocab_size"]:
        raise LstmgenError(f"{path}: {len(vocab)} characters, but manifest.json says {manifest['vocab_size']}; "
                           "prepare the data again")
    return vocab


def check_prepared(data: str, splits: tuple[str, ...]) -> tuple[dict, Vocab]:
    """Prepared data checked as far as it can be without reading the windows: the manifest, the
    vocabulary, and every Parquet footer of ``splits`` (the first is required, the others are
    checked where the manifest lists them). Cheap: a few small reads per file."""
    manifest = read_manifest(data)
    if splits[0] not in manifest["splits"]:
        raise LstmgenError(f"{data}: manifest.json lists no {splits[0]} split; prepare the data again")
    for split in splits:
        if split in manifest["splits"]:
            SplitReader(data, split)
    return manifest, read_vocab(data, manifest)


def split_dir(data: str, split: str) -> tuple[str, dict]:
    """The directory of a split and the manifest, checked: only the splits the manifest lists are trusted."""
    manifest = read_manifest(data)
    where = storage.join(data, split)
    if split not in manifest["splits"]:
        raise LstmgenError(f"{data}: no {split!r} split here (manifest.json lists {', '.join(manifest['splits'])})")
    if not storage.is_dir(where):
        raise LstmgenError(f"{where}: missing, though manifest.json lists the {split} split; prepare the data again")
    return where, manifest


def read_split(data: str, split: str) -> pa.Table:
    """All windows of a split, in order, with plain pyarrow (local or S3); for tests and benchmarks
    (the jobs stream a split with ``SplitReader``)."""
    fs, p = storage.resolve(split_dir(data, split)[0])
    return pq.read_table(p, filesystem=fs, schema=None).sort_by("index")


def window_ids(table: pa.Table, previous: tuple[int, int] | None = None) -> np.ndarray:
    """Undo the windowing of windows given in text order: their ids as one stream, in the stored
    dtype (uint8/uint16; a batch is cast to int64 only when it becomes a tensor). A window that
    directly follows a full window (the next ``index``) starts with that window's last id, which is
    dropped; ``length`` drops a short window's padding. ``previous`` is the (index, length) of the
    window read just before ``table``, when the caller reads on from it. (Where one source file of a
    split ends exactly on a full window, the next file's first character is dropped the same way.)"""
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.uint8)
    width = table.column("ids").type.list_size
    rows = table.column("ids").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    lengths = table.column("length").to_numpy()
    index = table.column("index").to_numpy()
    first = previous is not None and index[0] == previous[0] + 1 and previous[1] == width
    overlaps = np.r_[first, (index[1:] == index[:-1] + 1) & (lengths[:-1] == width)]
    keep = np.arange(width)[None, :] < lengths[:, None]
    keep[:, 0] &= ~overlaps
    return rows[keep]


class SplitReader:
    """One prepared split read in text order, a bounded piece at a time (local or S3).

    Opening reads only the Parquet footers: every row group's first window ``index`` (from its
    statistics) and row count. Reading windows [start, stop) then streams the row groups that hold
    them, ``batch`` windows at a time, so memory stays bounded by one row group (one prepare chunk,
    ``--chunk-mb``) and a batch per reader however large the split is."""

    COLUMNS = ["ids", "length", "index"]

    def __init__(self, data: str, split: str, batch: int = 4096):
        import pyarrow.dataset as pads

        self.batch = batch
        where, manifest = split_dir(data, split)
        self.chars = int(manifest["splits"][split]["chars"])
        self.seq_len = int(manifest["seq_len"])
        fs, path = storage.resolve(where)
        try:
            dataset = pads.dataset(path, filesystem=fs, format="parquet")
            fragments = list(dataset.get_fragments())
        except (OSError, pa.ArrowException) as exc:
            raise LstmgenError(f"{where}: unreadable Parquet ({_first_line(exc)}); prepare the data again") from None
        self.row_groups: list[tuple[int, int, object]] = []  # (first window index, windows, row-group fragment)
        for fragment in fragments:
            self.row_groups += self._row_groups(fragment, manifest)
        self.row_groups.sort(key=lambda group: group[0])
        self.empty = dataset.schema.empty_table()
        self.windows = self._check_windows(where, manifest["splits"][split]["windows"])

    def _row_groups(self, fragment, manifest: dict) -> list[tuple[int, int, object]]:
        """A file's row groups, from its footer, checked: readable, the schema prepare writes, the
        ``index`` statistics to find windows by, and no id beyond the vocabulary."""
        try:
            meta = fragment.metadata
            sch = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as exc:
            raise LstmgenError(f"{fragment.path}: not a readable Parquet file ({_first_line(exc)}); prepare the data again") from None
        ids = sch.field("ids").type if "ids" in sch.names else None
        if not (isinstance(ids, pa.FixedSizeListType) and ids.list_size == self.seq_len + 1
                and {"length", "index"} <= set(sch.names)):
            raise LstmgenError(f"{fragment.path}: not windows of {self.seq_len + 1} ids as lstmgen prepare writes them "
                               f"(schema {sch.to_string(show_schema_metadata=False).replace(chr(10), '; ')})")
        index, element = sch.names.index("index"), 0  # ids' one leaf is the first column
        groups = []
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            if not group.num_rows:
                continue
            stats, id_stats = group.column(index).statistics, group.column(element).statistics
            if stats is None or not stats.has_min_max:
                raise LstmgenError(f"{fragment.path}: no index statistics; was it written by lstmgen prepare?")
            if id_stats is not None and id_stats.has_min_max and int(id_stats.max) >= manifest["vocab_size"]:
                raise LstmgenError(f"{fragment.path}: holds id {id_stats.max}, beyond the {manifest['vocab_size']} "
                                   "characters of the vocabulary; prepare the data again")
            groups.append((int(stats.min), group.num_rows, fragment.subset(row_group_ids=[g])))
        return groups

    def _check_windows(self, where: str, expected: int) -> int:
        """The windows must run 0, 1, 2, ... across the files with none missing, and as many as
        manifest.json says: a file removed or cut short would otherwise shorten the split unseen."""
        position, before = 0, "the split's start"
        for first, rows, fragment in self.row_groups:
            if first != position:
                raise LstmgenError(f"{fragment.path}: starts at window {first}, but {before} ends at window {position}: "
                                   f"a file of {where} is missing or cut short; prepare the data again")
            position, before = position + rows, fragment.path
        if position != expected:
            raise LstmgenError(f"{where}: the Parquet files hold {position} windows (the last is {before}), manifest.json "
                               f"says {expected}: a file is missing or cut short; prepare the data again")
        return position

    def tables(self, start: int = 0, stop: int | None = None) -> Iterator[pa.Table]:
        """Windows [start, stop) of the split in order, at most ``batch`` at a time."""
        stop = self.windows if stop is None else min(stop, self.windows)
        for first, rows, fragment in self.row_groups:
            if first + rows <= start or first >= stop:
                continue
            position = first
            for record_batch in self._batches(fragment):
                lo, hi = max(start - position, 0), min(stop - position, record_batch.num_rows)
                if hi > lo:
                    yield pa.Table.from_batches([record_batch.slice(lo, hi - lo)])
                position += record_batch.num_rows
                if position >= stop:
                    return

    def _batches(self, fragment) -> Iterator[pa.RecordBatch]:
        """A row group's windows, with each page's CRC checked (prepare writes them): damage
        inside a file fails here in a line naming it, not as a decoding error or wrong ids later.
        (So does storage that stops answering; Ray Train restarts the workers for that.)"""
        import pyarrow.dataset as pads

        options = pads.ParquetFragmentScanOptions(page_checksum_verification=True)
        try:
            yield from fragment.to_batches(batch_size=self.batch, columns=self.COLUMNS, fragment_scan_options=options)
        except (OSError, pa.ArrowException) as exc:
            raise LstmgenError(f"{fragment.path}: could not read its windows ({_first_line(exc)})") from None

    def read(self, start: int, stop: int) -> pa.Table:
        """Windows [start, stop) as one table."""
        tables = list(self.tables(start, stop))
        return pa.concat_tables(tables) if tables else self.empty

    def ids(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """The text of windows [start, stop) as consecutive pieces of ids."""
        previous = None
        for table in self.tables(start, stop):
            yield window_ids(table, previous)
            previous = (table.column("index")[-1].as_py(), table.column("length")[-1].as_py())

    def rows(self, rows: int, max_chars: int = 0) -> list[Iterator[np.ndarray]]:
        """The split (or its first ``max_chars``) cut into ``rows`` rows of equal windows, plus one
        short row with the windows left over, each a lazy reader: nothing is read until a row is.
        Consecutive rows overlap by one id, so every id but the first is a target once."""
        n = self.windows if not max_chars else min(self.windows, -(-max_chars // self.seq_len))
        rows = max(1, min(rows, n))
        per = n // rows
        bounds = [(r * per, (r + 1) * per) for r in range(rows)] + ([(rows * per, n)] if rows * per < n else [])
        return [self.ids(a, b) for a, b in bounds]


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def pieces_of(windows: int, size: int) -> list[dict]:
    """Cut windows [0, windows) into pieces of about ``size`` consecutive windows (sizes differ
    by at most one): the units training workers share out and read."""
    n = _piece_count(windows, size)
    return [_piece(windows, n, i) for i in range(n)]


def worker_pieces(windows: int, size: int, rank: int, world: int, seed: object = None) -> list[dict]:
    """Worker ``rank``'s share of an epoch's pieces (those of ``pieces_of``): every ``world``-th
    piece of them, in an order shuffled by ``seed`` (given alike on every worker, so the shares
    never overlap; None keeps the text's order). Every worker gets as many pieces; the last
    ``n % world`` of the shuffled order wait for another epoch. Only this worker's pieces are
    built: a few numbers each."""
    n = _piece_count(windows, size)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    return [_piece(windows, n, int(i)) for i in order[rank:n - n % world:world]]


def _piece_count(windows: int, size: int) -> int:
    return max(1, -(-windows // max(1, size)))


def _piece(windows: int, n: int, i: int) -> dict:
    return {"start": windows * i // n, "stop": windows * (i + 1) // n}


def split_ids(data: str, split: str, max_chars: int = 0) -> np.ndarray:
    """A whole split (or its first ``max_chars``) as one int64 array in memory: for the count
    model and the benchmarks, which hold the text at once by design. Evaluation streams instead
    (``SplitReader``)."""
    pieces = list(SplitReader(data, split).rows(1, max_chars)[0])
    return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)


class Stream:
    """One row of text read ``n`` characters at a time from pieces of ids pulled as needed.

    ``take(n)`` returns up to ``n + 1`` ids (inputs are the first ``n``, targets the last ``n``)
    and moves on by ``n``, so the next take starts with this one's last id: every id after the
    first is a target once. Fewer than ``n + 1`` ids means the pieces ran out. Several streams may
    share one iterator of pieces: whichever needs text next takes the next piece."""

    def __init__(self, pieces: Iterable[np.ndarray], skip: int = 0):
        self.pieces = iter(pieces)
        self.buffer = np.zeros(0, dtype=np.int64)
        self.position = 0
        self.skip = skip  # ids to drop before the first one handed out

    def take(self, n: int) -> np.ndarray:
        while len(self.buffer) - self.position < n + 1:
            piece = next(self.pieces, None)
            if piece is None:
                break
            cut = min(self.skip, len(piece))
            self.skip -= cut
            self.buffer = np.concatenate([self.buffer[self.position :], piece[cut:]])
            self.position = 0
        out = self.buffer[self.position : self.position + n + 1]
        self.position += max(len(out) - 1, 0)
        return out
