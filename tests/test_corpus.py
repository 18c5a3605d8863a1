"""Corpus reading, vocabulary, windows and the prepare job (real Ray Data, real Parquet)."""

import hashlib
import http.server
import io
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lstmgen.config import PrepareConfig
from lstmgen.corpus import UNK, Vocab, fetch_wikitext
from lstmgen.errors import LstmgenError
from lstmgen.prepare import prepare
from lstmgen.windows import collate, read_split, split_ids

from .conftest import run_cli, wiki_text


def test_vocab_round_trip_and_unknown_characters():
    vocab = Vocab.from_codepoints([ord(c) for c in "hello wörld ✓"])
    assert vocab.tokens[0] == UNK and vocab.tokens[1:] == sorted(set("hello wörld ✓"))
    assert vocab.decode(vocab.encode("wörld ✓")) == "wörld ✓"
    assert vocab.encode("hez") == [vocab.index["h"], vocab.index["e"], 0]
    assert vocab.unknown("hez!") == ["!", "z"]
    assert Vocab.from_json(vocab.to_json()) == vocab


def _prepare(tmp_path: Path, text: str, **kw) -> tuple[Path, dict]:
    src = tmp_path / "corpus.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    manifest = prepare(PrepareConfig(out=str(out), corpus=[str(src)], **kw))
    return out, manifest


@pytest.mark.parametrize("seq_len,chunk_mb", [(64, 0.004), (5, 0.00005), (2, 16)])
def test_windows_cover_every_character_exactly_once(ray_local, tmp_path, seq_len, chunk_mb):
    # Multi-byte characters and many small chunks: chunk edges fall inside UTF-8 sequences.
    text = wiki_text(20_000) + "ünïcödé ✓ 😀 end\n" * 20
    out, manifest = _prepare(tmp_path, text, seq_len=seq_len, chunk_mb=chunk_mb, valid_fraction=0.2)
    vocab = Vocab.from_json((out / "vocab.json").read_text())
    train, valid = split_ids(str(out), "train"), split_ids(str(out), "valid")
    cut = len(text) - int(len(text) * 0.2)
    assert vocab.decode(train) == text[:cut]
    expected_valid = "".join(c if c in vocab.index else "\ufffd" for c in text[cut:])
    assert vocab.decode(valid) == expected_valid
    # every character after the first of a split is a target exactly once
    table = read_split(str(out), "train")
    assert table.column("index").to_pylist() == list(range(table.num_rows))
    assert int(np.sum(table.column("length").to_numpy() - 1)) == cut - 1
    assert manifest["splits"]["train"]["chars"] == cut
    assert manifest["splits"]["train"]["windows"] == table.num_rows


def test_vocabulary_comes_from_training_text_only(ray_local, tmp_path):
    text = "abcabcabc" * 50 + "XYZ"  # X, Y, Z only in the held-out tail
    out, manifest = _prepare(tmp_path, text, seq_len=8, valid_fraction=0.01)
    vocab = Vocab.from_json((out / "vocab.json").read_text())
    assert vocab.tokens == [UNK, "a", "b", "c"]
    assert manifest["splits"]["valid"]["unk_chars"] == 3
    assert manifest["id_type"] == "uint8"


def test_parquet_is_plain_pyarrow_with_compact_ids(ray_local, tmp_path):
    text = "".join(chr(0x400 + i % 300) for i in range(5000))  # > 256 distinct characters -> uint16
    out, manifest = _prepare(tmp_path, text, seq_len=16)
    table = pq.read_table(out / "train")
    ids_type = table.schema.field("ids").type
    assert ids_type.list_size == 17 and str(ids_type.value_type) == "uint16"
    assert manifest["vocab_size"] > 256
    x, y = collate(table.slice(0, 4))
    assert x.shape == y.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()
    src_hash = hashlib.sha256((tmp_path / "corpus.txt").read_bytes()).hexdigest()
    assert manifest["sources"][0]["sha256"] == src_hash


def test_wikitext_directory_gives_explicit_splits(ray_local, tmp_path):
    corpus = tmp_path / "wt"
    corpus.mkdir()
    for split, n in (("train", 3000), ("valid", 500), ("test", 400)):
        (corpus / f"wiki.{split}.raw").write_text(wiki_text(3000 + n)[3000 - n if split != "train" else 0 :][:n])
    manifest = prepare(PrepareConfig(out=str(tmp_path / "d"), corpus=[str(corpus)], seq_len=32))
    assert {k: v["chars"] for k, v in manifest["splits"].items()} == {"train": 3000, "valid": 500, "test": 400}
    assert (tmp_path / "d" / "test").is_dir()


def test_a_directory_without_a_training_file_is_refused_not_guessed(ray_local, tmp_path):
    corpus = tmp_path / "wt"
    corpus.mkdir()
    for name in ("wiki.valid.raw", "wiki.test.raw", "notes.txt"):
        (corpus / name).write_text(wiki_text(2000))
    with pytest.raises(LstmgenError, match="no training file"):
        prepare(PrepareConfig(out=str(tmp_path / "d"), corpus=[str(corpus)]))
    assert not (tmp_path / "d").exists()


def test_invalid_utf8_reports_byte_offset(ray_local, tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"fine text " * 100 + b"\xff\xfe broken")
    with pytest.raises(LstmgenError, match="byte offset 1000"):
        prepare(PrepareConfig(out=str(tmp_path / "d"), corpus=[str(src)], chunk_mb=0.0003))


def test_empty_corpus_and_existing_output_are_refused(ray_local, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LstmgenError, match="empty"):
        prepare(PrepareConfig(out=str(tmp_path / "d"), corpus=[str(tmp_path / "empty.txt")]))
    out, _ = _prepare(tmp_path, "some text " * 100, seq_len=8)
    before = (out / "manifest.json").read_text()
    with pytest.raises(LstmgenError, match="--overwrite"):
        prepare(PrepareConfig(out=str(out), corpus=[str(tmp_path / "corpus.txt")]))
    assert (out / "manifest.json").read_text() == before


def test_overwrite_replaces_every_split_and_readers_trust_only_the_manifest(ray_local, tmp_path):
    wt = tmp_path / "wt"
    wt.mkdir()
    for split, n in (("train", 3000), ("valid", 500), ("test", 400)):
        (wt / f"wiki.{split}.raw").write_text(wiki_text(n))
    out = tmp_path / "d"
    prepare(PrepareConfig(out=str(out), corpus=[str(wt)], seq_len=16))
    assert read_split(str(out), "test").num_rows > 0
    (tmp_path / "other.txt").write_text("zzzz yyyy " * 300)  # one file: train + valid tail, no test split
    prepare(PrepareConfig(out=str(out), corpus=[str(tmp_path / "other.txt")], seq_len=16, overwrite=True))
    assert not (out / "test").exists() and not list(tmp_path.glob("d.*"))  # no old split, no staging left
    assert Vocab.from_json((out / "vocab.json").read_text()).tokens[1:] == sorted(set("zzzz yyyy "))
    with pytest.raises(LstmgenError, match="lists train, valid"):
        read_split(str(out), "test")
    (out / "stray").mkdir()  # a directory the manifest does not list is not a split
    with pytest.raises(LstmgenError, match="no 'stray' split"):
        read_split(str(out), "stray")


def test_a_directory_of_other_files_is_never_taken_as_output(ray_local, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "c.txt").write_text(wiki_text(3000))
    for overwrite in (False, True):
        with pytest.raises(LstmgenError, match="not prepared data"):
            prepare(PrepareConfig(out=str(tmp_path / "mine"), corpus=[str(tmp_path / "c.txt")], overwrite=overwrite))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_an_overwrite_killed_midway_leaves_the_old_data_whole(tmp_path):
    (tmp_path / "a.txt").write_text(wiki_text(200_000))
    (tmp_path / "b.txt").write_text(wiki_text(400_000)[::-1])
    assert run_cli("prepare", "--corpus", "a.txt", "--out", "d", "--seq-len", "16", cwd=tmp_path).returncode == 0
    before = {p.relative_to(tmp_path / "d"): p.read_bytes() for p in (tmp_path / "d").rglob("*") if p.is_file()}
    proc = subprocess.Popen([sys.executable, "-m", "lstmgen.cli", "prepare", "--corpus", "b.txt", "--out", "d",
                             "--seq-len", "16", "--chunk-mb", "0.05", "--overwrite"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob("d.partial-*/vocab.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "prepare finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)  # mid-way through writing the new data
    proc.wait()
    after = {p.relative_to(tmp_path / "d"): p.read_bytes() for p in (tmp_path / "d").rglob("*") if p.is_file()}
    assert after == before  # the old data, whole; the half-written new data only in the staging directory


# ---------------------------------------------------------------------------------------------
# Download, checksum and cache against a local HTTP server


@pytest.fixture()
def http_archive(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split, text in (("train", "training text " * 200), ("valid", "valid text " * 20), ("test", "test " * 20)):
            zf.writestr(f"wikitext-2-raw/wiki.{split}.raw", text)
    payload = buf.getvalue()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/wikitext-2-raw-v1.zip", hashlib.sha256(payload).hexdigest(), hits
    server.shutdown()


def test_download_verifies_checksum_and_caches(http_archive, tmp_path):
    url, sha, hits = http_archive
    cache = tmp_path / "cache"
    with pytest.raises(LstmgenError, match="SHA-256 mismatch"):
        fetch_wikitext(url, "0" * 64, str(cache))
    assert not any(cache.rglob("wiki.train.raw"))  # nothing cached from a bad download
    first = fetch_wikitext(url, sha, str(cache))
    assert Path(first, "wiki.valid.raw").read_text().startswith("valid text")
    n = len(hits)
    assert fetch_wikitext(url, sha, str(cache)) == first and len(hits) == n  # cache hit, no request


def test_download_offline_names_the_corpus_flag(tmp_path):
    with pytest.raises(LstmgenError, match="--corpus"):
        fetch_wikitext("http://127.0.0.1:9/none.zip", "0" * 64, str(tmp_path))
