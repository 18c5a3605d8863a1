"""One writer per run: the lease in RUN/lease.json, on real files and on a real S3 server."""

import json
import socket
import subprocess
import sys
import threading
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


def _trainer(run: str, start: threading.Barrier, won: list, refused: list) -> None:
    start.wait()
    try:
        won.append(lease.acquire(run))
    except LstmgenError as exc:
        refused.append(str(exc))


def _race(run: str, rounds: int) -> None:
    """Two trainers start on one run at the same moment, ``rounds`` times, on a free run and on
    one whose lease has expired: exactly one wins every time."""
    from lstmgen import storage

    for i in range(rounds):
        path = f"{run}/{i}"
        if i % 2:  # a crashed holder's expired lease to take over
            storage.write_text(storage.join(path, "lease.json"),
                               json.dumps({"id": "old", "host": "elsewhere", "pid": 1, "expires": time.time() - 1}))
        start, won, refused = threading.Barrier(2), [], []
        threads = [threading.Thread(target=_trainer, args=(path, start, won, refused)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 1, (i, refused)
        assert _holds(path)["id"] == won[0].holder["id"]
        won[0].release()


def test_two_trainers_racing_for_one_run_on_local_disk(tmp_path):
    _race(str(tmp_path / "runs"), 40)


def test_a_holder_paused_past_its_lease_finds_it_taken_and_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "TTL_S", 0.5)
    monkeypatch.setattr(lease, "RENEW_S", 2.0)  # the heartbeat comes late, as after a long pause
    lost: list[str] = []
    first = lease.acquire(str(tmp_path / "run"), on_lost=lost.append)
    time.sleep(1.0)
    second = lease.acquire(str(tmp_path / "run"))  # expired: taken over
    deadline = time.time() + 10
    while not lost and time.time() < deadline:
        time.sleep(0.1)
    assert lost and "another train took this run" in lost[0] and first.lost == lost[0]
    first.release()  # the lost holder removes nothing
    assert _holds(str(tmp_path / "run"))["id"] == second.holder["id"]
    second.release()
    assert not (tmp_path / "run" / "lease.json").exists()


@pytest.mark.slow
def test_the_lease_works_on_s3(s3, monkeypatch):
    s3.client().create_bucket(Bucket="leases")
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    _check_one_writer("s3://leases/runs/a")
    _race("s3://leases/race", 40)
