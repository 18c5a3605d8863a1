"""Every damaged input is one line that names the file (property-based, Hypothesis).

Each test cuts, flips, drops or inserts bytes of one file a command reads (prepared data, a
checkpoint, metrics.jsonl, a primes file, a corpus), runs what that command runs to read it, and
checks the outcome: it works as documented, or it fails with an ``LstmgenError`` (the CLI prints
it as its one ``error:`` line, see ``test_a_damaged_parquet_file_fails_the_train_command_in_one_line``)
that names the file; any other exception fails the test. Every other file under the directory is
unchanged afterwards. Real files, real Parquet, real torch checkpoints; Ray only to prepare.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstmgen import checkpoint
from lstmgen.config import GenerateConfig, PrepareConfig
from lstmgen.errors import LstmgenError
from lstmgen.generate import read_primes
from lstmgen.model import CharLSTM, ModelConfig
from lstmgen.prepare import prepare
from lstmgen.report import read_metrics
from lstmgen.windows import SplitReader, check_prepared

from .conftest import one_line_error, run_cli, wiki_text

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

DAMAGE = st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 1)),  # keep only the first part
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),  # one byte xor'ed
    st.tuples(st.just("drop"), st.floats(0, 1), st.integers(1, 64)),  # a span removed
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),  # bytes added
)


def damaged(data: bytes, how: tuple) -> bytes:
    at = min(len(data), int(how[1] * len(data)))
    if how[0] == "cut":
        return data[:at]
    if how[0] == "flip":
        at = min(at, len(data) - 1)
        return data[:at] + bytes([data[at] ^ how[2]]) + data[at + 1 :]
    if how[0] == "drop":
        return data[:at] + data[at + how[2] :]
    return data[:at] + how[2] + data[at:]


def _snapshot(root: Path, but: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file() and p != but}


def _outcome(root: Path, target: Path, how: tuple, read) -> str:
    """Damage ``target``, run ``read``, restore it. Returns "ok" or the error line; asserts the
    line names the file and nothing else under ``root`` changed."""
    before, original = _snapshot(root, target), target.read_bytes()
    target.write_bytes(damaged(original, how))
    try:
        read()
        return "ok"
    except LstmgenError as exc:
        line = str(exc)
        assert "\n" not in line and target.name in line, (how, line)
        return line
    finally:
        target.write_bytes(original)
        assert _snapshot(root, target) == before


# ---------------------------------------------------------------------------------------------
# Prepared data: what train checks on the driver, then what its workers read


@pytest.fixture(scope="module")
def data(ray_local, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damage")
    (root / "corpus.txt").write_text(wiki_text(40_000), encoding="utf-8")
    prepare(PrepareConfig(out=str(root / "data"), corpus=[str(root / "corpus.txt")], seq_len=32, chunk_mb=0.01,
                          valid_fraction=0.2))
    return root / "data"


def _read_prepared(data: Path) -> None:
    """train's driver checks, then every window as its workers and evaluate read them."""
    manifest, vocab = check_prepared(str(data), ("train", "valid"))
    for split in ("train", "valid"):
        reader = SplitReader(str(data), split)
        table = reader.read(0, reader.windows)
        assert table.num_rows == manifest["splits"][split]["windows"]
        ids = table.column("ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        assert int(np.max(ids)) < len(vocab)


def _prepared_files(data: Path) -> list[Path]:
    parquet = sorted(data.glob("train/*.parquet"))
    assert len(parquet) >= 2, "the fixture should write several files per split"
    return [data / "manifest.json", data / "vocab.json", parquet[0], parquet[-1], *sorted(data.glob("valid/*.parquet"))]


@SETTINGS
@given(which=st.integers(0, 4), how=DAMAGE)
def test_damaged_prepared_data_fails_in_one_line_naming_the_file(data, which, how):
    """Caught, before the checks in windows.py: a Parquet file cut short or removed shortened the
    split unseen; manifest.json with a field of the wrong type, and vocab.json shorter than the
    ids, failed in the workers as bare ``ValueError``/``IndexError``/``JSONDecodeError`` text,
    after Ray Train had restarted them; a flipped byte in a data page could decode to other ids
    unseen (prepare now writes page CRCs and the readers check them)."""
    files = _prepared_files(data)
    _outcome(data, files[which % len(files)], how, lambda: _read_prepared(data))


@pytest.mark.parametrize("field,value", [("seq_len", "64"), ("seq_len", [64]), ("vocab_size", None), ("splits", []),
                                         ("splits", {"train": {"chars": -1, "windows": 3}}), ("seq_len", 0)])
def test_a_manifest_field_of_the_wrong_type_or_shape_is_named(data, field, value):
    manifest = data / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(good, **{field: value})))
    try:
        with pytest.raises(LstmgenError, match="manifest.json: not a manifest"):
            _read_prepared(data)
    finally:
        manifest.write_text(json.dumps(good))


def test_a_removed_parquet_file_is_named_with_the_counts(data):
    files = sorted(data.glob("train/*.parquet"))
    for gone in (files[0], files[len(files) // 2], files[-1]):
        kept = gone.read_bytes()
        gone.unlink()
        try:
            with pytest.raises(LstmgenError, match=r"is missing or cut short") as failed:
                _read_prepared(data)
            assert "window" in str(failed.value) and "train" in str(failed.value)
        finally:
            gone.write_bytes(kept)
    _read_prepared(data)  # whole again


@pytest.mark.slow
def test_a_damaged_parquet_file_fails_the_train_command_in_one_line(data, tmp_path):
    """Through the CLI: one ``error:`` line naming the file, before any worker starts (so no
    restarts), and no run directory left behind."""
    target = sorted(data.glob("train/*.parquet"))[1]
    original = target.read_bytes()
    target.write_bytes(original[: len(original) // 2])
    try:
        result = run_cli("train", "--data", str(data), "--run", str(tmp_path / "run"), "--max-steps", "5")
    finally:
        target.write_bytes(original)
    one_line_error(result, target.name)
    assert "worker(s) x batch" not in result.stdout and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# A checkpoint: what generate and evaluate load


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    model_cfg = ModelConfig(vocab_size=5, embed=4, hidden=8, layers=1, dropout=0.0, embed_dropout=0.0)
    model = CharLSTM(model_cfg)
    directory = run / checkpoint.checkpoint_name(10)
    meta = {"step": 10, "metrics": {"step": 10, "val_bpc": 2.0}, "history": [], "train": {},
            "model": model_cfg.__dict__, "vocab": ["<unk>", "a", "b", "c", "d"], "seq_len": 8}
    checkpoint.save(str(directory), {"model": model.state_dict(), "step": 10}, meta)
    return directory


def _load_and_run(directory: Path) -> None:
    loaded = checkpoint.load(str(directory))
    model = loaded.model()
    with torch.no_grad():
        logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits).all()


@SETTINGS
@given(which=st.sampled_from(["meta.json", "model.pt"]), how=DAMAGE)
def test_a_damaged_checkpoint_fails_in_one_line_naming_the_file(saved, which, how):
    """Caught: meta.json that parsed to another JSON type, or named a vocabulary without <unk>,
    failed as bare ``AttributeError``/"vocabulary must start with <unk>" without the file."""
    _outcome(saved.parent, saved / which, how, lambda: _load_and_run(saved))


# ---------------------------------------------------------------------------------------------
# metrics.jsonl (lstmgen report), a primes file (lstmgen generate --primes-file), a corpus (prepare)


@SETTINGS
@given(how=DAMAGE)
def test_damaged_metrics_fail_in_one_line_naming_the_file(tmp_path_factory, how):
    """Caught: a cut row failed as a bare ``JSONDecodeError``; an empty file as ``IndexError``."""
    run = tmp_path_factory.mktemp("metrics")
    rows = [{"step": s, "train_bpc": 2.0, "val_bpc": 2.1, "elapsed_s": s / 10, "chars_per_s": 1e3} for s in (10, 20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _outcome(run, run / "metrics.jsonl", how, lambda: read_metrics(str(run)))


@SETTINGS
@given(suffix=st.sampled_from([".txt", ".jsonl"]), how=DAMAGE)
def test_a_damaged_primes_file_fails_in_one_line_naming_the_file(tmp_path_factory, suffix, how):
    """Caught: bytes that are not UTF-8 failed as a bare ``UnicodeDecodeError``."""
    root = tmp_path_factory.mktemp("primes")
    path = root / f"primes{suffix}"
    lines = ["The river", " = Valkyria = ", "I plan to make the world a better place"]
    path.write_text("".join((json.dumps({"prime": p}) if suffix == ".jsonl" else p) + "\n" for p in lines))
    _outcome(root, path, how, lambda: read_primes(GenerateConfig(checkpoint="c", primes_file=str(path), out="o.jsonl")))


@pytest.mark.slow
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(how=DAMAGE)
def test_a_damaged_corpus_prepares_or_fails_in_one_line_naming_it(ray_local, tmp_path_factory, how):
    root = tmp_path_factory.mktemp("corpus")
    corpus = root / "corpus.txt"
    corpus.write_text(wiki_text(6_000) + "Ünïcödé — ≠ 字\n", encoding="utf-8")
    out = tmp_path_factory.mktemp("prepared") / "data"
    outcome = _outcome(root, corpus, how, lambda: prepare(PrepareConfig(out=str(out), corpus=[str(corpus)], seq_len=16,
                                                                        valid_fraction=0.0)))
    assert (outcome == "ok") == (out / "manifest.json").exists()
