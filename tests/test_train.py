"""Training on data barely large enough: workers must agree on every epoch's batches (or the run
is refused on the driver), never stall with one worker in the all-reduce and one at Ray Data's
epoch barrier."""

import json

import pytest

from lstmgen.config import PrepareConfig, train_config
from lstmgen.prepare import prepare
from lstmgen.train import train

from .conftest import one_line_error, run_cli, wiki_text


@pytest.fixture(scope="module")
def tiny_data(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny.txt").write_text(wiki_text(8_193), encoding="utf-8")  # 128 windows of 64
    prepare(PrepareConfig(out=str(root / "data"), corpus=[str(root / "tiny.txt")], valid_fraction=0.0))
    return root / "data"


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# The runs below call the train job in this process, on the session's Ray (the CLI around it is
# tested by the refusals further down and by test_pipeline.py).


@pytest.mark.slow
def test_two_workers_finish_on_data_with_one_batch_per_epoch(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(train_config(data=str(tiny_data), run=str(run), workers=2, hidden=32, max_steps=120, max_minutes=0.0, eval_every=60))
    rows = _rows(run)
    assert [row["step"] for row in rows] == [60, 120] and all(row["workers"] == 2 for row in rows)


@pytest.mark.slow
def test_a_time_budget_that_ends_between_epochs_still_checkpoints_the_last_step(tiny_data, tmp_path):
    # A few steps per epoch, so the budget most likely runs out while the next epoch starts.
    run = tmp_path / "run"
    train(train_config(data=str(tiny_data), run=str(run), workers=1, hidden=32, max_steps=1000000, max_minutes=0.05,
                       eval_every=100000))
    last = _rows(run)[-1]
    saved = sorted(run.glob("checkpoint_*/meta.json"))
    assert saved and json.loads(saved[-1].read_text())["step"] == last["step"] > 0


@pytest.mark.slow
def test_a_last_checkpoint_after_an_evaluation_at_the_same_step_adds_no_second_row(tiny_data, tmp_path):
    """Caught: the final save at step 30 scored step 30 again and wrote a second row for it, right
    after the evaluation-only row of step 30 (rows 10, 20, 30, 30)."""
    run = tmp_path / "run"
    train(train_config(data=str(tiny_data), run=str(run), workers=1, hidden=32, max_steps=30, max_minutes=0.0,
                       eval_every=10, checkpoint_every=20))
    assert [row["step"] for row in _rows(run)] == [10, 20, 30]
    saved = json.loads(sorted(run.glob("checkpoint_*/meta.json"))[-1].read_text())
    assert saved["step"] == 30 and [row["step"] for row in saved["history"]] == [10, 20, 30]


@pytest.mark.slow
def test_workers_of_a_train_that_lost_its_lease_write_nothing_further(tiny_data, tmp_path, monkeypatch):
    """Fencing. The driver's heartbeat is kept from noticing (as when the driver is paused); once
    the first row is written another holder takes the lease, and the workers must stop at their
    next publish. Caught: without the check the workers trained on to --max-steps and wrote every
    row and checkpoint into the run another train now owned."""
    import threading
    import time

    from lstmgen import lease
    from lstmgen.errors import error_line

    monkeypatch.setattr(lease, "RENEW_S", 3600.0)
    run = tmp_path / "run"
    metrics, lease_file = run / "metrics.jsonl", run / "lease.json"
    intruder = {"id": "intruder", "host": "elsewhere", "pid": 1, "expires": time.time() + 3600}
    taken: list[int] = []

    def take_the_lease_after_the_first_row() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.02)
        lease_file.write_text(json.dumps(intruder))
        taken.append(len(_rows(run)))

    thief = threading.Thread(target=take_the_lease_after_the_first_row)
    thief.start()
    with pytest.raises(Exception) as failed:  # Ray Train's error around the workers' (the CLI prints error_line)
        train(train_config(data=str(tiny_data), run=str(run), workers=1, hidden=32, max_steps=100_000, max_minutes=0.0,
                           eval_every=10, max_failures=1))
    thief.join()
    line = error_line(failed.value)
    assert "no longer holds the run's lease" in line and "host elsewhere" in line
    rows = _rows(run)
    assert taken and len(rows) <= taken[0] + 1  # at most the publish already under way when the lease was taken
    assert rows[-1]["step"] < 1000 and {row["holder"] for row in rows} != {"intruder"}
    assert json.loads(lease_file.read_text())["id"] == "intruder"  # the loser removed nothing


@pytest.mark.slow
def test_data_too_small_for_every_worker_is_refused_before_training(tiny_data, tmp_path):
    one_line_error(run_cli("train", "--data", str(tiny_data), "--run", str(tmp_path / "r"), "--workers", "2",
                           "--batch-size", "64"), "128 training windows", "2 worker(s)", "--batch-size")
    assert not (tmp_path / "r").exists()
    one_line_error(run_cli("train", "--data", str(tiny_data), "--run", str(tmp_path / "r"), "--workers", "3-1"), "MIN-MAX")
    one_line_error(run_cli("train", "--data", str(tiny_data), "--run", str(tmp_path / "r"), "--workers", "two"), "--workers")


@pytest.mark.slow
def test_bf16_training_through_ray_train_and_its_checkpoint_generates_with_either_cell(ray_local, wiki_slice, tmp_path):
    """--precision bf16 runs the dtype logic of a GPU worker (autocast bf16) on the CPU."""
    import torch

    from lstmgen import checkpoint
    from lstmgen.config import SampleConfig
    from lstmgen.generate import generate_batch

    data, run = tmp_path / "data", tmp_path / "run"
    prepare(PrepareConfig(out=str(data), corpus=[str(wiki_slice)]))
    train(train_config(data=str(data), run=str(run), precision="bf16", workers=1, hidden=64, max_steps=90, max_minutes=0.0,
                       eval_every=30))
    rows = _rows(run)
    assert rows[-1]["val_bpc"] < rows[0]["val_bpc"] - 0.3, rows  # it learns
    assert json.loads((run / "train_config.json").read_text())["precision"] == "bf16"
    state = torch.load(run / "checkpoint_0000090" / "model.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in state["model"].values())  # fp32 weights in the checkpoint
    loaded, texts = checkpoint.load(str(run)), {}
    for cell in ("explicit", "fused"):
        rows = generate_batch(loaded.model(cell=cell), loaded.vocab, ["The "], [7], SampleConfig(length=40, greedy=True), "cpu")
        texts[cell] = rows[0]["text"]
    assert texts["explicit"] == texts["fused"] and len(texts["explicit"]) == 40
    one_line_error(run_cli("train", "--data", str(data), "--run", str(tmp_path / "r2"), "--precision", "fp16"), "--precision")


@pytest.mark.parametrize("flag, value", [("--log-every", "0"), ("--clip", "-1"), ("--max-failures", "-1"),
                                         ("--checkpoint-every", "-5"), ("--wait-timeout", "0"), ("--lr", "nan"),
                                         ("--max-minutes", "inf"), ("--seed", "-1"), ("--val-chars", "-1"),
                                         ("--weight-drop", "1"), ("--lr-floor", "2")])
def test_bad_training_flags_fail_before_anything_starts(tmp_path, flag, value):
    one_line_error(run_cli("train", "--data", str(tmp_path / "d"), "--run", str(tmp_path / "r"), flag, value), flag)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, flag", [(["prepare", "--out", "d", "--corpus", "c.txt", "--chunk-mb", "inf"], "--chunk-mb"),
                                        (["prepare", "--out", "d", "--corpus", "c.txt", "--valid-fraction", "nan"], "--valid-fraction"),
                                        (["generate", "--checkpoint", "r", "--temperature", "nan"], "--temperature"),
                                        (["generate", "--checkpoint", "r", "--seed", "-3"], "--seed"),
                                        (["evaluate", "--checkpoint", "r", "--data", "d", "--dynamic-lr", "inf"], "--dynamic-lr")])
def test_bad_flags_of_the_other_jobs_fail_before_anything_starts(tmp_path, args, flag):
    one_line_error(run_cli(*args, cwd=tmp_path), flag)
    assert not any(tmp_path.iterdir())


def test_the_schedule_warms_up_then_falls_to_lr_floor_and_stays_there():
    from lstmgen.config import TrainConfig
    from lstmgen.train import lr_at

    cfg = TrainConfig(data="d", run="r", lr=2e-2, warmup_steps=100, lr_floor=0.01)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(2e-4) and lr_at(cfg, 99, 0.0) == pytest.approx(2e-2)
    assert lr_at(cfg, 100, 0.0) == pytest.approx(2e-2)
    assert lr_at(cfg, 5000, 0.5) == pytest.approx(2e-2 * (0.01 + 0.99 / 2))
    assert lr_at(cfg, 9000, 1.0) == pytest.approx(2e-4) and lr_at(cfg, 9000, 1.7) == pytest.approx(2e-4)
