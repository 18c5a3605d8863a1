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


def _both_read_the_expired_lease_first(run: str, monkeypatch) -> None:
    """Two trainers read the same expired lease before either writes (a barrier after the read
    forces it), so only the compare-and-swap can tell them apart: exactly one takes the run."""
    from lstmgen import storage

    storage.write_text(storage.join(run, "lease.json"),
                       json.dumps({"id": "old", "host": "elsewhere", "pid": 1, "expires": time.time() - 1}))
    real_read, both_read = lease._read, threading.Barrier(2, timeout=10)

    def read_then_wait(path: str):
        held = real_read(path)
        both_read.wait()
        return held

    monkeypatch.setattr(lease, "_read", read_then_wait)
    start, won, refused = threading.Barrier(2), [], []
    threads = [threading.Thread(target=_trainer, args=(run, start, won, refused)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(lease, "_read", real_read)
    assert len(won) == 1 and len(refused) == 1, (won, refused)
    assert "at the same moment" in refused[0]
    assert _holds(run)["id"] == won[0].holder["id"]
    won[0].release()


def test_two_trainers_that_both_read_an_expired_lease_cannot_both_take_it(tmp_path, monkeypatch):
    """Caught: the takeover test above passed with the compare-and-swap replaced by a plain write,
    because two threads rarely both read before either writes; here they always do."""
    _both_read_the_expired_lease_first(str(tmp_path / "run"), monkeypatch)


@pytest.mark.parametrize("beat", ["writes after the delete", "has written, version not yet kept"])
def test_a_release_racing_a_heartbeat_removes_the_lease_and_loses_nothing(tmp_path, monkeypatch, beat):
    """The heartbeat is held inside its renewal (before its write, or after it but before it keeps
    the new version) while ``release()`` runs, then let go. Caught on the code without
    ``Lease.lock``: the release deleted first and the beat then found the lease gone and called
    ``on_lost`` after the run had ended (which interrupts the main thread); or the beat's new
    version made the release's conditional delete fail and the lease stayed for its TTL."""
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    real_swap, in_beat, go = lease._swap, threading.Event(), threading.Event()

    def held_swap(path: str, expected, text):
        gated = threading.current_thread().name == "lstmgen-lease" and not go.is_set()
        if gated and beat == "writes after the delete":
            in_beat.set()
            assert go.wait(10)
        new = real_swap(path, expected, text)
        if gated and beat != "writes after the delete":
            in_beat.set()
            assert go.wait(10)
        return new

    monkeypatch.setattr(lease, "_swap", held_swap)
    lost: list[str] = []
    held = lease.acquire(str(tmp_path / "run"), on_lost=lost.append)
    assert in_beat.wait(10)
    releasing = threading.Thread(target=held.release)
    releasing.start()
    releasing.join(0.5)  # without the lock the release is done by now; with it, it waits for the beat
    go.set()
    releasing.join(10)
    time.sleep(0.2)  # a beat that would still call on_lost has done so
    assert not releasing.is_alive()
    assert lost == [] and held.lost == ""
    assert not (tmp_path / "run" / "lease.json").exists()


def test_a_renewal_that_landed_without_an_answer_does_not_lose_the_lease(tmp_path, monkeypatch):
    """The storage serves a renewal after the client has given up on it (a stalled S3 server, then
    continued). Caught by bench/chaos.py: the next renewal's compare-and-swap failed against the
    version the lost answer carried, and the holder stopped its run, saying another train (its own
    host and pid) had taken it."""
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    real_swap, beats = lease._swap, []

    def answer_lost_once(path: str, expected, text):
        new = real_swap(path, expected, text)
        if threading.current_thread().name == "lstmgen-lease":
            beats.append(new)
            if len(beats) == 1:
                raise LstmgenError(f"{path}: ReadTimeoutError: read timeout")  # written, but the holder never hears
        return new

    monkeypatch.setattr(lease, "_swap", answer_lost_once)
    lost: list[str] = []
    held = lease.acquire(str(tmp_path / "run"), on_lost=lost.append)
    deadline = time.time() + 10
    while len(beats) < 4 and time.time() < deadline:
        time.sleep(0.02)
    assert len(beats) >= 4 and lost == [] and _holds(str(tmp_path / "run"))["id"] == held.holder["id"]
    held.release()
    assert not (tmp_path / "run" / "lease.json").exists()


@pytest.mark.slow
def test_the_lease_works_on_s3(s3, monkeypatch):
    s3.client().create_bucket(Bucket="leases")
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    _check_one_writer("s3://leases/runs/a")
    _race("s3://leases/race", 40)
    _both_read_the_expired_lease_first("s3://leases/stale", monkeypatch)
