"""One writer per run: the lease in RUN/lease.json, on real files and on a real S3 server."""

import json
import socket
import subprocess
import sys
import time

import pytest

from lstmgen import lease
from lstmgen.errors import LstmgenError


def _holds(run: str) -> dict:
    from lstmgen import storage

    return json.loads(storage.read_text(storage.join(run, "lease.json")))


def _check_one_writer(run: str) -> None:
    first = lease.acquire(run)
    with pytest.raises(LstmgenError, match="in use by another train"):
        lease.acquire(run)
    assert _holds(run)["id"] == first.holder["id"]
    first.release()
    second = lease.acquire(run)  # released: free again
    second.release()


def test_a_live_lease_refuses_a_second_writer(tmp_path):
    _check_one_writer(str(tmp_path / "run"))


def test_a_crashed_holders_lease_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process of this host that no longer exists
    (run / "lease.json").write_text(json.dumps({"id": "x", "host": socket.gethostname(), "pid": gone.pid,
                                                "expires": time.time() + 3600}))
    lease.acquire(str(run)).release()
    # another host's lease: live until it expires, then taken over
    (run / "lease.json").write_text(json.dumps({"id": "y", "host": "elsewhere", "pid": 1, "expires": time.time() + 3600}))
    with pytest.raises(LstmgenError, match="host elsewhere"):
        lease.acquire(str(run))
    (run / "lease.json").write_text(json.dumps({"id": "y", "host": "elsewhere", "pid": 1, "expires": time.time() - 1}))
    lease.acquire(str(run)).release()


@pytest.mark.slow
def test_the_lease_works_on_s3(s3, monkeypatch):
    s3.client().create_bucket(Bucket="leases")
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    _check_one_writer("s3://leases/runs/a")
