"""One writer per run directory. ``train`` holds a lease, ``RUN/lease.json``, while it runs: who
holds it (a random id, the host and the process) and until when. A heartbeat thread extends it
every ``RENEW_S`` seconds; a second ``train`` on the same run is refused while the lease is live.
A crashed holder's lease is taken over once it expires (``TTL_S``), or at once when the holder
ran on this host and its process is gone.

Every change to the lease is a compare-and-swap, so two trainers never both believe they hold a
run, however they interleave: it is created only if absent, and renewed, released or taken over
only if it is still the version this trainer last read. On S3 these are conditional writes
(``IfNoneMatch="*"``, ``IfMatch=ETag``); on local disk (or a filesystem every node mounts) the
same comparison runs under an exclusive ``flock`` of ``RUN/lease.json.lock``. A holder whose
renewal finds the lease taken (it was paused past its expiry and another trainer took the run)
stops its run rather than write on. A renewal can land although its answer never came (storage
stalled past the client's timeout, then served the request): the next renewal then finds another
version holding this holder's own id, and takes that version as its own.
"""

from __future__ import annotations

import _thread
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from lstmgen import storage
from lstmgen.errors import LstmgenError

TTL_S = 60.0
RENEW_S = 15.0


@dataclass
class Lease:
    path: str
    holder: dict
    version: str  # what this holder last wrote: the ETag on S3, a random tag on local disk
    on_lost: Callable[[str], None]
    lost: str = ""  # why this holder lost the lease, once it has
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one change at a time: a beat's or the release's

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this holder's.

        A beat already past its wait when ``stop`` is set holds ``lock`` until its renewal is
        written and its version known, so the delete below names the lease's current version
        (without the lock the delete could name the old one and fail, leaving the lease for its
        TTL; or go first, and the beat would find the lease gone and call ``on_lost`` after the
        run had ended). A beat that gets the lock after ``stop`` is set writes nothing."""
        self.stop.set()
        with self.lock:
            if self.lost:
                return
            try:
                if _swap(self.path, self.version, None) is None:  # a renewal whose answer was lost landed after all
                    held, version = _read(self.path)
                    if held is not None and held.get("id") == self.holder["id"]:
                        _swap(self.path, version, None)
            except LstmgenError as exc:  # storage away: the lease expires by itself
                print(f"train: could not release the run's lease ({exc}); it expires within {TTL_S:.0f} s", flush=True)


def acquire(run: str, on_lost: Callable[[str], None] | None = None) -> Lease:
    """Take the run's lease, or refuse in one line. ``on_lost`` is called from the heartbeat with
    a message if the lease is ever taken from this holder; by default it interrupts the main
    thread, which stops the run (``train`` turns that into the message)."""
    path = storage.join(run, "lease.json")
    held, version = _read(path)
    if held is not None and not _stale(held):
        raise LstmgenError(f"{run}: in use by another train (host {held.get('host')}, pid {held.get('pid')}); "
                           f"wait for it to end (or, if it crashed, up to {TTL_S:.0f} s for its lease to expire)")
    holder = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
    new = _swap(path, version, _text(holder))  # absent: create; stale: take over the version read
    if new is None:
        raise LstmgenError(f"{run}: another train took this run at the same moment; choose another --run")
    lease = Lease(path, holder, new, on_lost or _interrupt_main)
    threading.Thread(target=_heartbeat, args=(lease,), daemon=True, name="lstmgen-lease").start()
    return lease


def wait_until_free(run: str, timeout: float = TTL_S + RENEW_S) -> None:
    """Wait until the run's lease is gone or stale, up to ``timeout``: a search's trial restarted
    by ``tune --resume`` after its previous holder died on another node, which cannot tell it is
    dead before the lease expires. ``acquire`` then takes it (or says why not)."""
    path = storage.join(run, "lease.json")
    deadline = time.time() + timeout
    while time.time() < deadline:
        held, _ = _read(path)
        if held is None or _stale(held):
            return
        time.sleep(2.0)


def check_holder(run: str, holder_id: str) -> None:
    """Fencing: raise unless ``holder_id`` still holds the run's lease. The worker that publishes
    checks it before every metrics row and checkpoint, so a train that lost its run (its driver
    paused past the lease, or cut off from storage, while its workers trained on) writes nothing
    further into a run another train now owns. Storage that does not answer is waited for, up to
    ``TTL_S``: a short outage costs a pause, not a worker restart."""
    path = storage.join(run, "lease.json")
    deadline, said = time.time() + TTL_S, False
    while True:  # storage away: wait for it up to a lease's TTL (no row or checkpoint could be written meanwhile)
        try:
            held, _ = _read(path)
            break
        except LstmgenError as exc:
            if time.time() > deadline:
                raise LstmgenError(f"{path}: could not read the run's lease for {TTL_S:.0f} s ({exc})") from None
            if not said:
                print(f"train: storage unreachable ({exc}); waiting up to {TTL_S:.0f} s", flush=True)
                said = True
            time.sleep(1.0)
    if held is None or held.get("id") != holder_id:
        who = f"now held by host {held.get('host')}, pid {held.get('pid')}" if held else "gone"
        raise LstmgenError(f"{run}: this train no longer holds the run's lease ({who}); it stopped without writing further")


def _interrupt_main(message: str) -> None:
    _thread.interrupt_main()


def _heartbeat(lease: Lease) -> None:
    while not lease.stop.wait(RENEW_S):
        with lease.lock:
            if lease.stop.is_set():  # released while this beat waited for the lock
                return
            if not _beat(lease):
                return


def _beat(lease: Lease) -> bool:
    """One renewal, under ``lease.lock``. False once the lease is lost (``on_lost`` called)."""
    try:
        new = _swap(lease.path, lease.version, _text(lease.holder))
    except LstmgenError as exc:  # storage briefly away: the next beat tries again within the TTL
        print(f"train: could not renew the run's lease ({exc})", flush=True)
        return True
    if new is None:
        held, version = _read(lease.path)
        if held is not None and held.get("id") == lease.holder["id"]:  # an earlier renewal whose answer was lost landed
            lease.version = version
            return True
        who = f"host {held.get('host')}, pid {held.get('pid')}" if held else "removed"
        lease.lost = (f"{lease.path}: another train took this run ({who}) while this one was paused past its "
                      "lease; this train stopped without writing further")
        lease.stop.set()
        lease.on_lost(lease.lost)
        return False
    lease.version = new
    return True


def _text(holder: dict) -> str:
    return json.dumps(dict(holder, expires=time.time() + TTL_S))


def _stale(held: dict) -> bool:
    if time.time() > float(held.get("expires", 0)):
        return True
    same_host = held.get("host") == socket.gethostname()
    return same_host and not psutil.pid_exists(int(held.get("pid", 0)))


def _parse(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError:
        return {}  # unreadable: treated as expired


# ---------------------------------------------------------------------------------------------
# Compare-and-swap on S3 and on local disk. A version of None means "absent".


def _read(path: str) -> tuple[dict | None, str | None]:
    """The lease and its version, or (None, None) when there is none."""
    if storage.is_s3(path):
        return _s3_read(path)
    with _locked(path):
        return _local_read(path)


def _swap(path: str, expected: str | None, text: str | None) -> str | None:
    """Write ``text`` (None: delete) only if the lease's version is still ``expected`` (None: only
    if there is no lease). Returns the new version ("" after a delete), or None if the lease had
    changed."""
    if storage.is_s3(path):
        return _s3_swap(path, expected, text)
    with _locked(path):
        _, current = _local_read(path)
        if current != expected:
            return None
        if text is None:
            Path(path).unlink()
            return ""
        version = uuid.uuid4().hex
        storage.write_text(path, json.dumps(dict(json.loads(text), version=version)))
        return version


class _locked:
    """An exclusive ``flock`` of ``PATH.lock`` for one local compare-and-swap."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _local_read(path: str) -> tuple[dict | None, str | None]:
    try:
        held = _parse(Path(path).read_text())
    except FileNotFoundError:
        return None, None
    return held, str(held.get("version", "unversioned"))


def _s3_client():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", region_name=os.environ.get("AWS_REGION", "us-east-1"),
                        config=Config(connect_timeout=storage.S3_TIMEOUT_S, read_timeout=storage.S3_SILENCE_S,
                                      retries={"max_attempts": 2}))


def _s3_error(path: str, exc: Exception) -> LstmgenError:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        return LstmgenError(f"{path}: {exc.response.get('Error', {}).get('Code', 'error')} "
                            f"({exc.response.get('Error', {}).get('Message', '')})")
    return LstmgenError(f"{path}: {type(exc).__name__}: {exc}")


def _s3_read(path: str) -> tuple[dict | None, str | None]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = storage.split_s3(path)
    try:
        obj = _s3_client().get_object(Bucket=bucket, Key=key)
        return _parse(obj["Body"].read().decode("utf-8", "replace")), obj["ETag"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None, None
        raise _s3_error(path, exc) from None
    except BotoCoreError as exc:
        raise _s3_error(path, exc) from None


def _s3_swap(path: str, expected: str | None, text: str | None) -> str | None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = storage.split_s3(path)
    condition = {"IfMatch": expected} if expected is not None else {"IfNoneMatch": "*"}
    try:
        if text is None:
            _s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=expected)
            return ""
        return _s3_client().put_object(Bucket=bucket, Key=key, Body=text.encode("utf-8"), **condition)["ETag"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
            return None
        raise _s3_error(path, exc) from None
    except BotoCoreError as exc:
        raise _s3_error(path, exc) from None
