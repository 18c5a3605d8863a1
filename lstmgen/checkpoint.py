"""Checkpoints that load without running pickled code, and that are never used half-written.

A checkpoint is a directory ``RUN/checkpoint_<step>`` holding

    model.pt   torch.save of plain tensors and numbers: model and optimizer state dicts, step,
               elapsed seconds. Loaded with ``torch.load(weights_only=True)`` only.
    meta.json  step, metrics, the train and model configs, the vocabulary, and the size and
               SHA-256 of model.pt. A checkpoint whose model.pt does not match is skipped.

``RUN`` alone means its best checkpoint (lowest validation bpc; the latest when none has one).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lstmgen import storage
from lstmgen.corpus import Vocab
from lstmgen.errors import LstmgenError
from lstmgen.model import CharLSTM, ModelConfig

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


def save(directory: str, state: dict, meta: dict) -> None:
    """Write a checkpoint into a local directory (Ray Train then persists it)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    meta = dict(meta, files={"model.pt": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}})
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "model.pt").write_bytes(data)
    (Path(directory) / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))


@dataclass
class Entry:
    path: str
    step: int
    meta: dict = field(default_factory=dict)
    error: str = ""

    @property
    def val_bpc(self) -> float | None:
        metrics = self.meta.get("metrics")
        value = metrics.get("val_bpc") if isinstance(metrics, dict) else None
        return value if isinstance(value, (int, float)) else None


def list_checkpoints(run: str) -> list[Entry]:
    """The run's checkpoints in step order; ones without a readable meta.json carry ``error``."""
    entries = []
    for child in storage.list_dir(run):
        name = Path(child.path).name
        m = CHECKPOINT_RE.match(name)
        if not m or child.type.name != "Directory":
            continue
        path = storage.join(run, name)
        try:
            meta = json.loads(storage.read_text(storage.join(path, "meta.json")))
            if not isinstance(meta, dict):
                raise ValueError("meta.json is not a JSON object")
            entries.append(Entry(path, int(m.group(1)), meta))
        except (LstmgenError, ValueError) as exc:
            entries.append(Entry(path, int(m.group(1)), error=f"incomplete ({exc})"))
    return sorted(entries, key=lambda e: e.step)


def ranked(entries: list[Entry]) -> list[Entry]:
    """Best first: lowest validation bpc (the later on a tie), then unscored ones newest first."""
    good = [e for e in entries if not e.error]
    scored = sorted((e for e in good if e.val_bpc is not None), key=lambda e: (e.val_bpc, -e.step))
    return scored + sorted((e for e in good if e.val_bpc is None), key=lambda e: -e.step)


def best(entries: list[Entry]) -> Entry | None:
    return next(iter(ranked(entries)), None)


def verify(entry: Entry) -> Entry:
    """Set ``error`` when the checkpoint's model.pt does not match its meta.json (a crash mid-write
    or mid-upload, a truncated copy). Reads the whole file."""
    if not entry.error:
        try:
            _model_bytes(entry.path, entry.meta)
        except LstmgenError as exc:
            entry.error = "damaged: " + str(exc).removeprefix(entry.path + "/")
    return entry


def first_intact(entries: list[Entry], skipped: list[Entry] | None = None) -> Entry | None:
    """The first of ``entries`` that verifies; the damaged ones before it go into ``skipped``."""
    for entry in entries:
        if not verify(entry).error:
            return entry
        if skipped is not None:
            skipped.append(entry)
    return None


def latest_intact(run: str) -> Entry | None:
    """The newest checkpoint whose files match its meta.json (a half-written one is skipped)."""
    return first_intact(list(reversed(list_checkpoints(run) if storage.exists(run) else [])))


def resolve(path: str) -> str:
    """A run directory -> its best intact checkpoint (a damaged better one is named on stderr and
    skipped); a checkpoint directory -> itself."""
    if storage.exists(storage.join(path, "meta.json")):
        return path
    if not storage.exists(path):
        raise LstmgenError(f"{path}: no such checkpoint or run directory")
    skipped: list[Entry] = []
    chosen = first_intact(ranked(list_checkpoints(path)), skipped)
    for entry in skipped:
        print(f"warning: skipped {entry.path}: {entry.error}", file=sys.stderr)
    if chosen is None:
        raise LstmgenError(f"{path}: no complete checkpoint in this run directory")
    return chosen.path


@dataclass
class Loaded:
    path: str
    meta: dict
    state: dict
    vocab: Vocab

    def model(self, device: str = "cpu", cell: str | None = None) -> CharLSTM:
        cfg = ModelConfig(**self.meta["model"])
        if cell:
            cfg.cell = cell
        model = CharLSTM(cfg)
        try:
            model.load_state_dict(self.state["model"])
        except (RuntimeError, KeyError) as exc:
            raise LstmgenError(f"{storage.join(self.path, 'meta.json')}: the model config does not match model.pt's "
                               f"weights ({str(exc).splitlines()[0]})") from exc
        return model.to(device).eval()


def load(path: str, map_location: str = "cpu") -> Loaded:
    """Load a checkpoint (or a run's best) safely; one clear error for anything wrong."""
    path = resolve(path)
    meta_path = storage.join(path, "meta.json")
    try:
        meta = json.loads(storage.read_text(meta_path))
        vocab = Vocab(meta["vocab"])
        ModelConfig(**meta["model"])
    except (ValueError, KeyError, TypeError, LstmgenError) as exc:
        raise LstmgenError(f"{meta_path}: corrupt checkpoint metadata ({type(exc).__name__}: {exc})") from None
    data = _model_bytes(path, meta)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise LstmgenError(f"{storage.join(path, 'model.pt')}: refused to load: not a plain-tensor checkpoint "
                           f"({str(exc).splitlines()[0]})") from exc
    return Loaded(path, meta, state, vocab)


def _model_bytes(path: str, meta: dict) -> bytes:
    """model.pt's bytes, once they match the size and SHA-256 that meta.json records."""
    try:
        expected = meta["files"]["model.pt"]
        size, digest = int(expected["bytes"]), str(expected["sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LstmgenError(f"{storage.join(path, 'meta.json')}: corrupt checkpoint metadata (no size and SHA-256 for "
                           "model.pt)") from exc
    data = storage.read_bytes(storage.join(path, "model.pt"))
    if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        raise LstmgenError(f"{storage.join(path, 'model.pt')}: truncated or corrupt (size/SHA-256 differ from meta.json)")
    return data


def check_vocab(loaded: Loaded, data: str) -> None:
    """Refuse to pair a checkpoint with data prepared under another vocabulary."""
    from lstmgen.windows import read_vocab

    data_vocab = read_vocab(data)
    if data_vocab != loaded.vocab:
        raise LstmgenError(
            f"{loaded.path}: checkpoint vocabulary ({len(loaded.vocab)} chars) does not match {data} "
            f"({len(data_vocab)} chars); prepare the data with the corpus the model was trained on"
        )


LEASE_FILES = ("lease.json", "lease.json.lock")  # the run's lease (lstmgen.lease), never copied


def copy_verified(src: str, dst: str, overwrite: bool = False) -> tuple[int, int]:
    """Copy a run or checkpoint directory (local <-> S3) so that an interrupted copy never leaves
    something at ``dst`` that looks whole: the files go to a staging directory beside ``dst``,
    every file's size and SHA-256 is checked there, and only then is the staging directory
    published (renamed locally; on S3 copied server-side, each checkpoint's meta.json after its
    model.pt). A non-empty ``dst`` is refused unless ``overwrite``. Returns (files, bytes)."""
    files = {rel: size for rel, size in storage.walk(src).items() if rel not in LEASE_FILES}  # a live run's lease stays
    if not files:
        raise LstmgenError(f"{src}: nothing to copy")
    if storage.walk(dst) and not overwrite:
        raise LstmgenError(f"{dst}: not empty; pass --overwrite to replace what is there, or choose another destination")
    staging = f"{dst.rstrip('/')}.partial-{uuid.uuid4().hex[:8]}"
    storage.copy_tree(src, staging)
    for name in LEASE_FILES:
        storage.delete(storage.join(staging, name))
    copied = storage.walk(staging)
    for rel, size in files.items():
        if copied.get(rel) != size:
            raise LstmgenError(f"{staging}/{rel}: size differs after copy ({copied.get(rel)} != {size}); {dst} untouched")
        a = hashlib.sha256(storage.read_bytes(storage.join(src, rel))).hexdigest()
        b = hashlib.sha256(storage.read_bytes(storage.join(staging, rel))).hexdigest()
        if a != b:
            raise LstmgenError(f"{staging}/{rel}: SHA-256 differs after copy; {dst} untouched")
    storage.publish(staging, dst, last=lambda rel: Path(rel).name == "meta.json")
    return len(files), sum(files.values())
