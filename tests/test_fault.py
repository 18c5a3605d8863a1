"""Training survives failures: a worker that raises mid-run, and a driver killed with SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lstmgen import checkpoint

from .conftest import one_line_error, run_cli

pytestmark = pytest.mark.slow  # trains, or starts an S3 server or a Ray cluster


@pytest.fixture(scope="module")
def data(tmp_path_factory, wiki_slice):
    root = tmp_path_factory.mktemp("fault")
    r = run_cli("prepare", "--corpus", str(wiki_slice), "--out", str(root / "data"))
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "data"


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_worker_failure_resumes_from_the_checkpoint_reported_just_before(data, tmp_path):
    # The failure comes one step after checkpoint 40 is reported: before Ray Train's controller
    # polls the workers and registers it, so Ray's own record is still checkpoint 20.
    run = tmp_path / "run"
    r = run_cli("train", "--data", str(data), "--run", str(run), "--workers", "2", "--max-steps", "60",
                "--hidden", "32", "--eval-every", "20", "--max-failures", "1",
                env={"LSTMGEN_FAIL_AT_STEP": "41", "LSTMGEN_FAIL_MARKER": str(tmp_path / "failed")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "injected failure at step 41" in r.stdout + r.stderr
    rows = _rows(run)
    assert [row["step"] for row in rows] == [20, 40, 60]
    assert [row["resumed_from"] for row in rows] == [0, 0, 40]  # restarted from the newest checkpoint
    meta = json.loads((run / "checkpoint_0000060" / "meta.json").read_text())
    assert meta["step"] == 60


def test_resume_after_the_driver_is_killed(data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lstmgen.cli", "train", "--data", str(data), "--run", str(run), "--workers", "1",
           "--max-steps", "100000", "--hidden", "64", "--eval-every", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (run / "checkpoint_0000020" / "meta.json").exists():
            assert time.time() < deadline and proc.poll() is None, "no checkpoint before the kill"
            time.sleep(0.5)
        # One writer per run: a second train on the run in use is refused, and writes nothing.
        metrics = (run / "metrics.jsonl").read_text()
        one_line_error(run_cli("train", "--data", str(data), "--run", str(run), "--resume"), "in use by another train")
        assert proc.poll() is None and (run / "metrics.jsonl").read_text().startswith(metrics)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
        proc.wait()
    time.sleep(5)  # whatever of the killed run outlived its driver has ended by now
    newest = max(int(p.parent.name.split("_")[1]) for p in run.glob("checkpoint_0*/meta.json"))
    intact = checkpoint.latest_intact(str(run))
    r = run_cli("train", "--data", str(data), "--run", str(run), "--resume", "--max-steps", str(newest + 20))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = _rows(run)
    # Resumed from the newest intact checkpoint (Ray Train's own record may lag): at most one interval lost.
    assert rows[-1]["step"] == newest + 20, (newest, intact.step, rows[-3:])
    assert rows[-1]["resumed_from"] == intact.step >= newest - 20, (newest, intact.step, rows[-3:])
    assert [row["step"] for row in rows] == sorted({row["step"] for row in rows})  # no duplicated history


def test_s3_going_down_while_checkpointing_fails_clearly_and_keeps_complete_checkpoints(data, tmp_path):
    from . import s3server

    server = s3server.start(tmp_path / "seaweed")
    env = server.env
    try:
        server.client().create_bucket(Bucket="flaky")
        cmd = [sys.executable, "-m", "lstmgen.cli", "train", "--data", str(data), "--run", "s3://flaky/runs/x",
               "--workers", "1", "--max-steps", "100000", "--hidden", "32", "--eval-every", "10", "--max-failures", "1"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **env}, start_new_session=True)
        deadline = time.time() + 180
        key = "runs/x/checkpoint_0000020/meta.json"
        while True:
            assert time.time() < deadline and proc.poll() is None, "no checkpoint on S3 in time"
            listed = server.client().list_objects_v2(Bucket="flaky", Prefix="runs/x/").get("Contents", [])
            if any(o["Key"] == key for o in listed):
                break
            time.sleep(0.5)
        server.stop()  # the store goes away while the run keeps checkpointing
        try:
            _, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the run neither failed nor finished after S3 went down") from None
        assert proc.returncode != 0
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in stderr.split(errors[0])[-1], stderr[-3000:]
    finally:
        server.stop()
    server = s3server.start(tmp_path / "seaweed", ports=server.ports)  # same data, same address
    try:
        deadline = time.time() + 90  # the volume server re-registers with the master after a restart
        while True:
            try:
                server.client().get_object(Bucket="flaky", Key=key)["Body"].read()
                break
            except Exception:
                assert time.time() < deadline, "SeaweedFS did not serve the old objects again"
                time.sleep(1)
        r = run_cli("generate", "--checkpoint", "s3://flaky/runs/x/checkpoint_0000020", "--length", "20", env=server.env)
        assert r.returncode == 0, r.stderr[-2000:]  # the checkpoint completed before the outage is intact
        r = run_cli("checkpoints", "list", "s3://flaky/runs/x", env=server.env)
        assert r.returncode == 0 and "checkpoint_0000020" in r.stdout
    finally:
        server.stop()
