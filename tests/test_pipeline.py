"""End to end through the real CLI: prepare -> train (2 Ray Train workers) -> generate -> evaluate,
and every kind of bad input answered with one line and a non-zero exit."""

import hashlib
import json
import math
import pickle
import shutil

import pytest

from lstmgen.config import TrainConfig
from lstmgen.corpus import Vocab

from .conftest import one_line_error, run_cli

pytestmark = pytest.mark.slow  # trains, or starts an S3 server or a Ray cluster

PRIME = "I plan to make the world a better place"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, wiki_slice):
    root = tmp_path_factory.mktemp("e2e")
    r = run_cli("prepare", "--corpus", str(wiki_slice), "--out", "data", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", "--data", "data", "--run", "runs/first", "--workers", "2", "--max-steps", "80",
                "--hidden", "64", "--eval-every", "40", "--log-every", "20", cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root


def test_training_reduces_loss_and_writes_the_run(trained):
    run = trained / "runs" / "first"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [40, 80]
    assert rows[-1]["val_bpc"] < rows[0]["val_bpc"] and rows[-1]["train_bpc"] < rows[0]["train_bpc"]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    ckpts = sorted(p.name for p in run.glob("checkpoint_0*") if p.is_dir())
    assert ckpts == ["checkpoint_0000040", "checkpoint_0000080"]
    meta = json.loads((run / "checkpoint_0000080" / "meta.json").read_text())
    assert meta["step"] == 80 and meta["vocab"][0] == "<unk>" and meta["train"]["workers"] == 2


def test_generate_streams_characters_from_the_vocabulary(trained):
    r = run_cli("generate", "--checkpoint", "runs/first", "--prime", PRIME, "--length", "200", "--seed", "3", cwd=trained)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(PRIME)
    generated = r.stdout[len(PRIME) : -1]
    assert len(generated) == 200
    vocab = Vocab.from_json((trained / "data" / "vocab.json").read_text())
    assert not vocab.unknown(generated)
    again = run_cli("generate", "--checkpoint", "runs/first", "--prime", PRIME, "--length", "200", "--seed", "3", cwd=trained)
    assert again.stdout == r.stdout  # same seed, same text


def test_evaluate_gives_finite_bpc_below_uniform(trained):
    r = run_cli("evaluate", "--checkpoint", "runs/first", "--data", "data", "--json", cwd=trained)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    vocab_size = len(json.loads((trained / "data" / "vocab.json").read_text())["tokens"])
    assert math.isfinite(result["bpc"]) and result["bpc"] < math.log2(vocab_size)
    assert result["step"] == 80


def test_bad_evaluation_flags(trained):
    one_line_error(run_cli("evaluate", "--checkpoint", "runs/first", "--data", "data", "--mix-counts", "-1", cwd=trained), "--mix-counts")
    one_line_error(run_cli("evaluate", "--checkpoint", "runs/first", "--data", "data", "--dynamic", "--segment", "0", cwd=trained),
                   "--segment")


def test_checkpoints_list_and_report(trained):
    r = run_cli("checkpoints", "list", "runs/first", cwd=trained)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and "latest" in lines[2] and "best" in r.stdout
    r = run_cli("report", "runs/first", cwd=trained)
    assert r.returncode == 0 and "loss.png" in r.stdout and "valid bpc" in r.stdout


# ---------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, no traceback, nothing lost


def test_bad_corpus_inputs(tmp_path):
    one_line_error(run_cli("prepare", "--corpus", "missing.txt", "--out", "d", cwd=tmp_path), "missing.txt", "no such file")
    (tmp_path / "empty.txt").write_text("")
    one_line_error(run_cli("prepare", "--corpus", "empty.txt", "--out", "d", cwd=tmp_path), "empty")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    one_line_error(run_cli("prepare", "--corpus", "latin1.txt", "--out", "d", cwd=tmp_path), "not UTF-8", "byte offset 3")
    one_line_error(run_cli("prepare", "--corpus", "empty.txt", "--out", "d", "--seq-len", "1", cwd=tmp_path), "--seq-len")


def test_bad_generation_inputs(trained):
    one_line_error(run_cli("generate", "--checkpoint", "runs/first", "--temperature", "0", cwd=trained), "--temperature")
    one_line_error(run_cli("generate", "--checkpoint", "runs/first", "--length", "0", cwd=trained), "--length")
    one_line_error(run_cli("generate", "--checkpoint", "runs/first", "--prime", "snow ☃ man", cwd=trained), "'☃'")
    one_line_error(run_cli("generate", "--checkpoint", "runs/nothing", cwd=trained), "runs/nothing")


def test_corrupt_and_pickled_checkpoints_are_refused(trained, tmp_path):
    good = trained / "runs" / "first" / "checkpoint_0000080"
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    data = (truncated / "model.pt").read_bytes()
    (truncated / "model.pt").write_bytes(data[: len(data) // 2])
    one_line_error(run_cli("generate", "--checkpoint", str(truncated)), "truncated or corrupt")

    # A model.pt that carries a pickled object (with a matching checksum) must not be executed.
    evil = tmp_path / "evil"
    shutil.copytree(good, evil)
    payload = pickle.dumps({"model": Exploit()})
    (evil / "model.pt").write_bytes(payload)
    meta = json.loads((evil / "meta.json").read_text())
    meta["files"]["model.pt"] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (evil / "meta.json").write_text(json.dumps(meta))
    marker = tmp_path / "pwned"
    one_line_error(run_cli("generate", "--checkpoint", str(evil), env={"PWN_MARKER": str(marker)}), "refused")
    assert not marker.exists()


def test_a_damaged_latest_checkpoint_is_named_and_skipped(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "runs" / "first", run)
    latest = sorted(run.glob("checkpoint_0*"))[-1]
    data = (latest / "model.pt").read_bytes()
    (latest / "model.pt").write_bytes(data[: len(data) // 3])  # as a crash mid-upload leaves it
    r = run_cli("checkpoints", "list", str(run))
    assert r.returncode == 0, r.stderr
    tags = {line.rsplit(None, 1)[1]: line.rsplit(None, 1)[0] for line in r.stdout.splitlines()[1:]}  # path -> the rest
    assert "damaged" in tags[str(latest)] and "best" not in tags[str(latest)] and "latest" not in tags[str(latest)]
    assert [path for path, rest in tags.items() if "best" in rest and "latest" in rest] != [str(latest)]
    assert any("best" in rest for rest in tags.values()) and any("latest" in rest for rest in tags.values())
    r = run_cli("generate", "--checkpoint", str(run), "--length", "20", "--prime", "The ")
    assert r.returncode == 0 and r.stdout.startswith("The "), r.stderr[-2000:]
    assert f"skipped {latest}" in r.stderr and "truncated or corrupt" in r.stderr


def test_checkpoints_copy_never_mixes_two_runs(trained, tmp_path):
    first = trained / "runs" / "first"
    other = tmp_path / "other"
    shutil.copytree(first, other)
    shutil.rmtree(sorted(other.glob("checkpoint_0*"))[-1])  # a run with fewer checkpoints
    dst = tmp_path / "dst"
    assert run_cli("checkpoints", "copy", str(first), str(dst)).returncode == 0
    before = sorted(p.relative_to(dst) for p in dst.rglob("*"))
    one_line_error(run_cli("checkpoints", "copy", str(other), str(dst)), str(dst), "--overwrite")
    assert sorted(p.relative_to(dst) for p in dst.rglob("*")) == before  # untouched
    r = run_cli("checkpoints", "copy", str(other), str(dst), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in dst.glob("checkpoint_0*")) == sorted(p.name for p in other.glob("checkpoint_0*"))
    assert not list(tmp_path.glob("dst.*"))  # no staging or set-aside directory left behind


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch \"$PWN_MARKER\"",))


def test_checkpoint_from_another_vocabulary_is_refused(trained, tmp_path):
    (tmp_path / "other.txt").write_text("zzzz yyyy xxxx " * 500)
    assert run_cli("prepare", "--corpus", "other.txt", "--out", "other", cwd=tmp_path).returncode == 0
    one_line_error(run_cli("evaluate", "--checkpoint", str(trained / "runs" / "first"), "--data", "other", cwd=tmp_path),
                   "vocabulary")


def test_existing_run_is_not_overwritten(trained):
    before = (trained / "runs" / "first" / "metrics.jsonl").read_text()
    one_line_error(run_cli("train", "--data", "data", "--run", "runs/first", "--max-steps", "5", cwd=trained), "--resume")
    assert (trained / "runs" / "first" / "metrics.jsonl").read_text() == before
    one_line_error(run_cli("train", "--data", "nowhere", "--run", "runs/x", cwd=trained), "lstmgen prepare")
    one_line_error(run_cli("train", "--data", "data", "--run", "runs/x", "--preset", "nope", cwd=trained), "--preset")


def test_quick_start_pipeline_runs_every_stage(wiki_slice, tmp_path):
    r = run_cli("pipeline", "--corpus", str(wiki_slice), "--workdir", "qs", "--minutes", "0.15", "--length", "60",
                "--prime", "The ", cwd=tmp_path, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (tmp_path / "qs" / "data" / "manifest.json").exists() and (tmp_path / "qs" / "run" / "loss.png").exists()
    # the quick start trains on the defaults: what it saved differs only where --minutes and the paths say
    saved = json.loads((tmp_path / "qs" / "run" / "train_config.json").read_text())
    defaults = TrainConfig(data="", run="").__dict__
    assert {k for k in defaults if saved[k] != defaults[k]} == {"data", "run", "max_minutes", "given"}, saved
    body = r.stdout.rsplit("\n\npipeline:", 1)
    assert len(body) == 2 and "lstmgen report" in body[1]
    sample = body[0].split("--- sample: the prime and 60 generated characters ---\n", 1)[1]
    assert sample.startswith("The ") and len(sample) == len("The ") + 60  # the prime and 60 characters
    # A quiet terminal: the job's own lines, none of Ray's that a user cannot act on, no colour codes in a pipe.
    progress = [line for line in r.stdout.splitlines() if "| train " in line]
    assert progress and all(line.startswith("(RayTrainWorker pid=") for line in progress), r.stdout[-2000:]
    for noise in ("Reporting training result", "core_worker.cc", "Deprecat", "Progress bars disabled",
                  "Token authentication", "\x1b["):
        assert noise not in r.stdout + r.stderr, (noise, r.stderr[-3000:])
