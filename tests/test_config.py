"""Job configs: one place for every default, and flags a user did not give stay "not given"
through `--resume` (on real files in a run directory; no Ray needed)."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lstmgen import config as config_module
from lstmgen.config import PRESETS, TrainConfig, default, train_config
from lstmgen.corpus import Vocab
from lstmgen.errors import LstmgenError
from lstmgen.train import _reconcile_run, _save_run

from .conftest import one_line_error, run_cli


@pytest.fixture()
def saved_run(tmp_path):
    """A run first trained with 4 workers, 9 minutes and an explicit --keep 5."""
    vocab = Vocab(["<unk>", "a", "b"])
    first = train_config("", data=str(tmp_path / "data"), run=str(tmp_path / "run"), workers=4, max_minutes=9.0, keep=5)
    _save_run(first, vocab)
    return first, vocab


def test_resume_takes_the_limits_given_now_and_keeps_the_rest(saved_run):
    first, vocab = saved_run
    again = _reconcile_run(train_config("", data=first.data, run=first.run, resume=True, workers=2, workers_max=0), vocab)
    assert (again.workers, again.max_minutes, again.keep) == (2, 9.0, 5)  # --workers 2 wins, even at its default
    same = _reconcile_run(train_config("", data=first.data, run=first.run, resume=True), vocab)
    assert (same.workers, same.max_minutes, same.keep) == (4, 9.0, 5)  # nothing given: the saved run's values


def test_resume_never_changes_the_model(saved_run):
    first, vocab = saved_run
    again = _reconcile_run(train_config("", data=first.data, run=first.run, resume=True, hidden=64), vocab)
    assert again.hidden == first.hidden  # not in RESUMABLE: the checkpoint's shape rules
    with pytest.raises(LstmgenError, match="another vocabulary"):
        _reconcile_run(train_config("", data=first.data, run=first.run, resume=True), Vocab(["<unk>", "c"]))


def test_presets_are_overridden_by_flags_and_recorded_as_not_given():
    cfg = train_config("best", data="d", run="r", hidden=128)
    assert cfg.hidden == 128 and cfg.max_minutes == 60.0 and cfg.given == ["hidden"]
    with pytest.raises(LstmgenError, match="unknown --preset"):
        train_config("huge", data="d", run="r")


def test_presets_hold_only_what_differs_from_the_defaults():
    defaults = TrainConfig(data="d", run="r")
    for name, values in PRESETS.items():
        same = {key: value for key, value in values.items() if getattr(defaults, key) == value}
        assert not same, f"--preset {name} restates defaults: {same}"
    assert train_config("cpu-10min", data="d", run="r").__dict__ == {**defaults.__dict__, "preset": "cpu-10min"}


def test_the_help_shows_the_dataclass_defaults():
    out = subprocess.run([sys.executable, "-m", "lstmgen.cli", "train", "--help"], capture_output=True, text=True,
                         env={"COLUMNS": "300", "PATH": ""}).stdout
    for name in ("hidden", "lr", "max_minutes", "eval_every", "workers"):
        assert default(TrainConfig, name) in out, (name, out)
    saved = json.loads(json.dumps(TrainConfig(data="d", run="r").__dict__))
    assert saved["given"] == []


def test_the_readme_states_the_same_defaults():
    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    d = TrainConfig(data="d", run="r")
    for phrase in (f"{d.layers} x {d.hidden} explicit LSTM", f"embedding {d.embed}",
                   f"dropout {d.dropout} before the head ({d.embed_dropout} on the embeddings)",
                   f"{d.workers} workers x batch {d.batch_size}", f"lr {d.lr:.0e}".replace("e-0", "e-"),
                   f"weight decay {d.weight_decay}", f"{d.warmup_steps} warmup steps",
                   f"cosine to {d.lr_floor:g} x lr", f"clip {d.clip}",
                   f"every {d.eval_every} steps", f"--max-minutes {d.max_minutes:g}", f"--max-steps {d.max_steps}"):
        assert phrase in text, phrase


@pytest.mark.parametrize("out", ["s3a://bucket/data", "S3://bucket/data", "gs://bucket/data", "http://host/data"])
def test_unknown_uri_schemes_are_refused_not_made_local_directories(tmp_path, out):
    one_line_error(run_cli("prepare", "--out", out, "--corpus", "c.txt", cwd=tmp_path), out, "not supported")
    one_line_error(run_cli("prepare", "--out", "d", "--corpus", out, cwd=tmp_path), out)
    assert not any(tmp_path.iterdir())


def test_values_too_large_for_their_storage_type_are_refused(tmp_path):
    one_line_error(run_cli("prepare", "--out", "d", "--corpus", "c.txt", "--seq-len", "40000", cwd=tmp_path), "--seq-len")
    assert not any(tmp_path.iterdir())


JOB_CONFIGS = [c for c in vars(config_module).values() if dataclasses.is_dataclass(c) and isinstance(c, type)]
REQUIRED = {"data": "d", "run": "r", "out": "o", "checkpoint": "c", "train": {"data": "d", "run": "r"}}
FLAG_OF = {"workers_max": "--workers"}  # parts of a flag that is not named after them
NUMERIC = [(c, f.name) for c in JOB_CONFIGS for f in dataclasses.fields(c) if f.type in ("int", "float", int, float)]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(which=st.sampled_from(NUMERIC),
       value=st.one_of(st.sampled_from([0, -1, 10**18, float("nan"), float("inf"), float("-inf"), 1e308, -1e-308]),
                       st.integers(), st.floats()))
def test_every_numeric_setting_of_every_job_takes_an_edge_value_or_names_its_flag(which, value):
    """Each job's config (what its CLI flags and its job entrypoint build) either accepts the value
    or refuses it with an LstmgenError (the CLI's one ``error:`` line) that names the flag; NaN and
    infinities are never accepted."""
    cls, name = which
    required = {f.name: REQUIRED[f.name] for f in dataclasses.fields(cls) if f.name in REQUIRED
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    try:
        cls(**required, **{name: value})
    except LstmgenError as exc:
        assert FLAG_OF.get(name, f"--{name.replace('_', '-')}") in str(exc), (cls.__name__, name, value, str(exc))
        return
    assert not (isinstance(value, float) and not math.isfinite(value)), (cls.__name__, name, value)


@pytest.mark.parametrize("args,fragment", [(("train", "--data", "d", "--run", "r", "--hidden", "abc"), "'--hidden'"),
                                           (("train", "--data", "d"), "'--run'"),
                                           (("evaluate", "--checkpoint", "c", "--data", "d", "--bogus", "1"), "--bogus"),
                                           (("nosuch",), "nosuch")])
def test_a_flag_of_the_wrong_type_unknown_or_missing_is_one_line(tmp_path, args, fragment):
    """Caught: Typer's own box of several lines (usage, a hint, the error) instead of one line."""
    result = one_line_error(run_cli(*args, cwd=tmp_path), fragment)
    assert result.endswith("--help)") and result.count("\n") == 0 and not any(tmp_path.iterdir())
