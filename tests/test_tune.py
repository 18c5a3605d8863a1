"""``lstmgen tune``: a real Ray Tune search over real training runs on an embedded Ray, through the
CLI. Each trial is an ordinary run; successive halving stops the ones behind; best.json trains."""

import json
import subprocess
from pathlib import Path

import pytest

from lstmgen.config import TrainConfig
from lstmgen.errors import LstmgenError
from lstmgen.tune import parse_search

from .conftest import one_line_error, prepare_slice, run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepare_slice(tmp_path_factory.mktemp("tune"), 150_000)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_search_stops_the_trials_behind_and_its_best_config_trains(data, tmp_path):
    search = tmp_path / "search"
    try:
        result = run_cli("tune", "--data", str(data), "--run", str(search), "--preset", "tiny", "--workers", "1", "--max-steps", "60",
                         "--eval-every", "10", "--hidden", "32", "--trials", "6", "--max-concurrent", "2", "--wait-timeout", "120",
                         "--search", "lr=choice:0.00001,0.02", "--search", "embed=choice:16,32", timeout=480)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the search did not end:\n{(exc.stdout or b'')[-4000:]}\n{(exc.stderr or b'')[-4000:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = json.loads((search / "trials.json").read_text())
    assert len(table) == 6
    assert next(r for r in table if r["trial"].endswith("_00000"))["config"] == {"lr": 0.02, "embed": 32}  # the baseline: tiny's

    # Every trial is an ordinary run with the drawn settings on top of the fixed ones.
    for row in table:
        run = Path(row["run"])
        saved = json.loads((run / "train_config.json").read_text())
        assert {k: saved[k] for k in ("lr", "embed")} == row["config"]
        assert saved["hidden"] == 32 and saved["max_steps"] == 60 and saved["workers"] == 1
        rows = _rows(run)
        assert row["steps"] == rows[-1]["step"] and row["best_val_bpc"] == min(r["val_bpc"] for r in rows)
    assert run_cli("report", table[0]["run"]).returncode == 0  # a trial is an ordinary run
    spans = []  # when each trial trained: never more than --max-concurrent at once
    for row in table:
        rows = _rows(Path(row["run"]))
        spans.append((rows[0]["time"] - rows[0]["elapsed_s"], rows[-1]["time"]))
    assert max(sum(start < t < end for start, end in spans) for t, _ in spans) <= 1, spans  # at a trial's start, at most one other
    stopped = [r for r in table if r["status"] == "stopped early"]
    finished = [r for r in table if r["status"] == "finished"]
    assert stopped and finished and len(stopped) + len(finished) == 6, table
    assert all(r["steps"] < 60 for r in stopped) and all(r["steps"] == 60 for r in finished)
    # Successive halving stops a trial only at a rung where another trial scored better at the same budget.
    for row in stopped:
        last = _rows(Path(row["run"]))[-1]
        others = [r for other in table if other is not row for r in _rows(Path(other["run"]))
                  if abs(r["budget_used"] - last["budget_used"]) < 1e-9]
        assert any(r["val_bpc"] < last["val_bpc"] for r in others), row
    assert "stopped early" in result.stdout and f"{len(stopped)} of 6 trials stopped early" in result.stdout

    # best.json: the best trial's config, which train takes with --config (tests/test_tracking.py trains with one).
    best = json.loads((search / "best.json").read_text())
    assert best["lr"] == table[0]["config"]["lr"] == 0.02 and best["embed"] == table[0]["config"]["embed"]
    assert not {"data", "run", "resume", "given", "preset"} & set(best)
    from lstmgen.config import settings_file, train_config

    cfg = train_config("", settings_file("best.json", json.dumps(best)), data="d", run="r", max_steps=20)
    assert (cfg.lr, cfg.embed, cfg.hidden, cfg.max_steps) == (0.02, best["embed"], 32, 20)  # a flag wins over the file


@pytest.mark.parametrize("spec, fragment", [
    ("lr=normal:0:1", "KIND one of"),
    ("lr", "NAME=KIND:ARGS"),
    ("colour=choice:red", "'colour' is not a train setting"),
    ("data=choice:x", "'data' is not a train setting"),
    ("lr=loguniform:0:1", "LO > 0"),
    ("lr=uniform:0.5:0.1", "LO < HI"),
    ("hidden=uniform:64:128", "use randint or choice"),
    ("hidden=randint:0:64", "--hidden"),
    ("dropout=uniform:0:1.5", "--dropout must be in [0, 1)"),
    ("lr=choice:", "no values"),
    ("lr=uniform:nan:1", "finite"),
    ("cell=choice:explicit,gru", "--cell must be"),
])
def test_a_bad_search_spec_is_one_line(spec, fragment):
    with pytest.raises(LstmgenError) as caught:
        parse_search([spec], TrainConfig(data="d", run="r"))
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_search_specs_become_the_settings_train_takes():
    parsed = parse_search(["lr=loguniform:3e-3:5e-2", "hidden=choice:256,384", "carry-state=choice:true,false",
                           "batch_size=randint:4:17"], TrainConfig(data="d", run="r"))
    assert parsed == {"lr": ("loguniform", [3e-3, 5e-2]), "hidden": ("choice", [256, 384]),
                      "carry_state": ("choice", [True, False]), "batch_size": ("randint", [4, 16])}


@pytest.mark.slow
def test_tune_refuses_bad_input_before_anything_is_written(data, tmp_path):
    run = tmp_path / "search"
    base = ("tune", "--data", str(data), "--run", str(run), "--workers", "1", "--search", "lr=uniform:0.01:0.02")
    one_line_error(run_cli(*base, "--search", "colour=choice:red"), "colour")
    one_line_error(run_cli(*base, "--max-concurrent", "2", "--workers", "2"), "--max-concurrent 2 x --workers 2")
    one_line_error(run_cli(*base, "--trials", "0"), "--trials")
    one_line_error(run_cli(*base, "--resume"), "nothing to resume")
    assert not run.exists()
    run.mkdir()
    (run / "mine.txt").write_text("keep")
    one_line_error(run_cli(*base), "already exists")
    assert [p.name for p in run.iterdir()] == ["mine.txt"]
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"hidden": "big"}))
    one_line_error(run_cli("train", "--data", str(data), "--run", str(tmp_path / "r"), "--config", str(config)),
                   "bad.json", "hidden must be int")
    config.write_text(json.dumps({"run": "elsewhere"}))
    one_line_error(run_cli("train", "--data", str(data), "--run", str(tmp_path / "r"), "--config", str(config)), "'run'")
    assert not (tmp_path / "r").exists()
