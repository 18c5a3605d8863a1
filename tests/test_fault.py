"""Training survives failures: a worker that raises mid-run, and a driver killed with SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory, wiki_slice):
    root = tmp_path_factory.mktemp("fault")
    r = run_cli("prepare", "--corpus", str(wiki_slice), "--out", str(root / "data"))
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "data"


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_worker_failure_resumes_from_the_last_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--data", str(data), "--run", str(run), "--workers", "2", "--max-steps", "60",
                "--hidden", "64", "--eval-every", "20", "--max-failures", "1", env={"LSTMGEN_FAIL_AT_STEP": "30"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "injected failure at step 30" in r.stdout + r.stderr
    rows = _rows(run)
    assert [row["step"] for row in rows] == [20, 40, 60]
    assert [row["resumed_from"] for row in rows] == [0, 20, 20]  # restarted at step 20, not 0
    meta = json.loads((run / "checkpoint_0000060" / "meta.json").read_text())
    assert meta["step"] == 60


def test_resume_after_the_driver_is_killed(data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lstmgen.cli", "train", "--data", str(data), "--run", str(run), "--workers", "1",
           "--max-steps", "100000", "--hidden", "64", "--eval-every", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (run / "checkpoint_0000040" / "meta.json").exists():
            assert time.time() < deadline and proc.poll() is None, "no checkpoint before the kill"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
        proc.wait()
    r = run_cli("train", "--data", str(data), "--run", str(run), "--resume", "--max-steps", "80")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = _rows(run)
    # Ray Train registers a checkpoint once its snapshot records it: at most one interval is lost.
    assert rows[-1]["step"] == 80 and rows[-1]["resumed_from"] in (20, 40)
    assert [row["step"] for row in rows] == sorted({row["step"] for row in rows})  # no duplicated history
