"""The corpus: where it comes from (a file, a WikiText directory, several files, or a download),
how it is cut into byte-range chunks that Ray tasks decode independently, and the vocabulary.

Chunks are nominal byte ranges. Each reader moves both ends forward to the next UTF-8 character
boundary, so neighbouring chunks agree on where one stops and the next starts without ever
talking to each other, and no reader holds more than one chunk of the corpus in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lstmgen import storage
from lstmgen.errors import LstmgenError

UNK = "<unk>"
SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------------------------------------
# Download (WikiText-2 raw when no --corpus is given)


def fetch_wikitext(url: str, sha256: str, cache_dir: str) -> str:
    """Download the WikiText zip once, check its SHA-256, unpack it into the cache and return the
    directory that holds wiki.{train,valid,test}.raw. A cached copy is used without the network."""
    root = Path(os.path.expanduser(cache_dir)) / f"wikitext-{sha256[:16]}"
    marker = root / ".complete"
    if marker.exists():
        return str(_wikitext_dir(root))
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        archive = Path(tmp) / "download.zip"
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(archive, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                done = 0
                while block := response.read(1 << 20):
                    digest.update(block)
                    out.write(block)
                    done += len(block)
                    if total:
                        print(f"\rdownloading {url}: {done / total:6.1%}", end="", flush=True)
            if total:
                print()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise LstmgenError(
                f"could not download WikiText from {url} ({reason}); offline, pass --corpus FILE or DIR"
            ) from exc
        if digest.hexdigest() != sha256:
            raise LstmgenError(
                f"{url}: SHA-256 mismatch (got {digest.hexdigest()}, expected {sha256}); nothing was cached"
            )
        unpacked = Path(tmp) / "unpacked"
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(unpacked)
        except zipfile.BadZipFile as exc:
            raise LstmgenError(f"{url}: not a zip archive") from exc
        _wikitext_dir(unpacked)  # refuse an archive without the split files
        (unpacked / ".complete").write_text(json.dumps({"url": url, "sha256": sha256}))
        if root.exists():
            shutil.rmtree(root)
        os.replace(unpacked, root)
    return str(_wikitext_dir(root))


def _wikitext_dir(root: Path) -> Path:
    for candidate in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if (candidate / "wiki.train.raw").exists():
            return candidate
    raise LstmgenError(f"{root}: no wiki.train.raw inside the WikiText archive")


# ---------------------------------------------------------------------------------------------
# Sources: which files make up which split


def find_sources(corpus: list[str]) -> dict[str, list[str]]:
    """--corpus arguments -> {split: [files]}. A directory holding wiki.{train,valid,test}.raw (or
    train/valid/test files) gives explicit splits; anything else is one training stream."""
    if len(corpus) == 1 and storage.is_dir(corpus[0]):
        children = sorted(i.path for i in storage.list_dir(corpus[0]) if i.type.name == "File")
        prefix = "s3://" if storage.is_s3(corpus[0]) else ""
        children = [prefix + c for c in children]
        named = {}
        for split in SPLITS:
            hits = [c for c in children if Path(c).name in (f"wiki.{split}.raw", f"{split}.txt", split)]
            if hits:
                named[split] = hits[:1]
        if "train" in named:
            return named
        if named:  # valid/test files but no training file: never guess which text to train on
            raise LstmgenError(f"{corpus[0]}: holds {', '.join(Path(named[s][0]).name for s in named)} but no training "
                               "file (wiki.train.raw, train.txt or train); add it, or name the files to train on "
                               "with --corpus FILE")
        files = [c for c in children if not Path(c).name.startswith(".")]
        if not files:
            raise LstmgenError(f"{corpus[0]}: directory holds no files")
        return {"train": files}
    for path in corpus:
        kind = storage.info(path).type.name
        if kind == "NotFound":
            raise LstmgenError(f"{path}: no such file")
        if kind != "File":
            raise LstmgenError(f"{path}: not a file")
    return {"train": list(corpus)}


@dataclass
class Chunk:
    file: int  # index into the list of files
    path: str
    start: int  # nominal byte range [start, end)
    end: int
    size: int  # file size in bytes


def plan_chunks(files: list[str], chunk_bytes: int) -> list[Chunk]:
    chunks = []
    for i, path in enumerate(files):
        size = storage.info(path).size
        for start in range(0, max(size, 1), chunk_bytes):
            chunks.append(Chunk(i, path, start, min(start + chunk_bytes, size), size))
    return chunks


def _boundary(buf: bytes, i: int) -> int:
    """First index >= i that is not a UTF-8 continuation byte (at most 3 steps)."""
    for _ in range(3):
        if i < len(buf) and (buf[i] & 0xC0) == 0x80:
            i += 1
    return i


def read_chunk(chunk: Chunk, extra_chars: int = 0) -> tuple[str, str]:
    """Decode one chunk (strict UTF-8) and up to ``extra_chars`` characters that follow it."""
    fs, p = storage.resolve(chunk.path)
    hi = min(chunk.size, chunk.end + 3 + 4 * extra_chars)
    with fs.open_input_file(p) as f:
        buf = f.read_at(hi - chunk.start, chunk.start)
    s = 0 if chunk.start == 0 else _boundary(buf, 0)
    e = len(buf) if chunk.end >= chunk.size else _boundary(buf, chunk.end - chunk.start)
    try:
        text = buf[s:e].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = chunk.start + s + exc.start
        raise LstmgenError(f"{chunk.path}: not UTF-8: invalid byte 0x{buf[s + exc.start]:02x} at byte offset {offset}") from None
    tail = buf[e:].decode("utf-8", errors="ignore")[:extra_chars] if extra_chars else ""
    return text, tail


def codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def count_chars(chunk: Chunk) -> dict:
    """Pass 1 of prepare: how many characters this chunk holds, and of which kinds."""
    try:
        text, _ = read_chunk(chunk)
    except LstmgenError as exc:
        return {"file": chunk.file, "start": chunk.start, "chars": 0, "cps": [], "counts": [], "error": str(exc)}
    cps, counts = np.unique(codepoints(text), return_counts=True)
    return {"file": chunk.file, "start": chunk.start, "chars": len(text),
            "cps": cps.tolist(), "counts": counts.tolist(), "error": ""}


def file_sha256(path: str) -> str:
    fs, p = storage.resolve(path)
    digest = hashlib.sha256()
    with fs.open_input_stream(p) as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Vocabulary


class Vocab:
    """Characters <-> integer ids. Id 0 is ``<unk>``, reserved for characters never seen in the
    training split; the rest are the training characters in code-point order (stable across runs)."""

    def __init__(self, tokens: list[str]):
        if not tokens or tokens[0] != UNK:
            raise LstmgenError("vocabulary must start with <unk>")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self._cps = np.array([ord(t) for t in self.tokens[1:]], dtype=np.uint32)

    @classmethod
    def from_codepoints(cls, cps) -> Vocab:
        return cls([UNK] + [chr(c) for c in sorted(set(int(c) for c in cps))])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def dtype(self):
        return np.uint8 if len(self) <= 256 else np.uint16

    def encode_array(self, cps: np.ndarray, block: int = 1 << 20) -> np.ndarray:
        """Code points -> ids in the compact dtype; unseen characters -> 0 (``<unk>``). Works
        in blocks so the int64 intermediates stay small whatever the chunk size."""
        out = np.zeros(len(cps), dtype=self.dtype)
        if len(self._cps) == 0:
            return out
        for i in range(0, len(cps), block):
            part = cps[i : i + block]
            pos = np.minimum(np.searchsorted(self._cps, part), len(self._cps) - 1)
            out[i : i + block] = np.where(self._cps[pos] == part, pos + 1, 0)
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_array(codepoints(text)).astype(np.int64).tolist()

    def unknown(self, text: str) -> list[str]:
        return sorted({ch for ch in text if ch not in self.index})

    def decode(self, ids) -> str:
        return "".join(self.tokens[i] if i != 0 else "\ufffd" for i in ids)

    def to_json(self) -> str:
        return json.dumps({"unk": 0, "tokens": self.tokens}, ensure_ascii=False, indent=0)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        return cls(json.loads(text)["tokens"])

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens
