"""One writer per run directory. ``train`` holds a lease, ``RUN/lease.json``, while it runs: who
holds it (a random id, the host and the process) and until when. A heartbeat thread extends it
every ``RENEW_S`` seconds; a second ``train`` on the same run is refused while the lease is live.
A crashed holder's lease is taken over once it expires (``TTL_S``), or at once when the holder
ran on this host and its process is gone. Works on local disk and S3 alike: the lease is written,
then read back after a moment, and only the writer that finds its own id there goes on (two that
start together: the later write wins and the other stops).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import psutil

from lstmgen import storage
from lstmgen.errors import LstmgenError

TTL_S = 60.0
RENEW_S = 15.0
SETTLE_S = 0.5  # between writing the lease and reading it back


@dataclass
class Lease:
    path: str
    holder: dict
    stop: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this one."""
        self.stop.set()
        if (_read(self.path) or {}).get("id") == self.holder["id"]:
            storage.delete(self.path)


def acquire(run: str) -> Lease:
    path = storage.join(run, "lease.json")
    held = _read(path)
    if held and not _stale(held):
        raise LstmgenError(f"{run}: in use by another train (host {held.get('host')}, pid {held.get('pid')}); "
                           f"wait for it to end (or, if it crashed, up to {TTL_S:.0f} s for its lease to expire)")
    holder = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
    lease = Lease(path, holder)
    _write(lease)
    time.sleep(SETTLE_S)
    if (_read(path) or {}).get("id") != holder["id"]:
        raise LstmgenError(f"{run}: another train took this run at the same moment; choose another --run")
    threading.Thread(target=_heartbeat, args=(lease,), daemon=True, name="lstmgen-lease").start()
    return lease


def _heartbeat(lease: Lease) -> None:
    while not lease.stop.wait(RENEW_S):
        try:
            _write(lease)
        except LstmgenError as exc:  # storage briefly away: the next beat tries again within the TTL
            print(f"train: could not renew the run's lease ({exc})", flush=True)


def _write(lease: Lease) -> None:
    storage.write_text(lease.path, json.dumps(dict(lease.holder, expires=time.time() + TTL_S)))


def _read(path: str) -> dict | None:
    try:
        return json.loads(storage.read_text(path))
    except LstmgenError:
        return None  # none yet
    except ValueError:
        return {}  # unreadable: treated as expired


def _stale(held: dict) -> bool:
    if time.time() > float(held.get("expires", 0)):
        return True
    same_host = held.get("host") == socket.gethostname()
    return same_host and not psutil.pid_exists(int(held.get("pid", 0)))
