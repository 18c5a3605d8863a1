"""Starting or joining Ray. Local jobs run on an embedded, private Ray (``address="local"``, so a
stale cluster file left by ``ray stop`` is never joined); jobs submitted to a cluster join it
through ``RAY_ADDRESS``, which the Ray job supervisor sets.

Importing this module sets the environment Ray reads once at its own import (the CLI imports it
first, before any module that imports Ray); it does not import Ray itself."""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import threading

from lstmgen.errors import LstmgenError

# Lines Ray prints that a user of lstmgen cannot act on. They are dropped from the terminal (and
# from a job's log) unless LSTMGEN_DEBUG=1; a real error or an actionable warning still shows.
RAY_NOISE = (
    "Reporting training result",  # Ray Train logs every report() at INFO level on each worker
    "'PreemptionWatcher' and ID",  # an E-level core_worker line about a Ray Train actor's restart policy
    "Progress bars disabled",  # lstmgen turns Ray Data's bars off: the workers print their own progress
    "RayDeprecationWarning: `ExecutionOptions.exclude_resources`",  # Ray Train's own use of an option,
    "self.exclude_resources = exclude_resources",  # and the source line the warning quotes
    "Token authentication is enabled for this Ray cluster",  # Ray's default, which lstmgen keeps
    "PYTHON worker processes have been started on node",  # the raylet counting Ray Train's and Ray Data's actors at start
    "Detected that the Ray Train controller actor",  # its placement group cleaned up after a Tune trial is stopped
)
DEBUG = os.environ.get("LSTMGEN_DEBUG", "") not in ("", "0")

# Before Ray is imported (it reads these once).
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # Ray Data's per-operator INFO lines
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints reach the driver once, not twice
if not DEBUG:
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(re.escape(n) for n in RAY_NOISE))  # workers' lines
if not sys.stdout.isatty():
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in a file or a pipe


class _DropNoise(logging.Filter):
    """The same lines when the driver logs them itself (through Python logging)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return DEBUG or not any(n in record.getMessage() for n in RAY_NOISE)


for _name in ("ray.data._internal.progress", "ray._private.authentication.authentication_token_setup"):
    logging.getLogger(_name).addFilter(_DropNoise())  # a logger's filter holds whatever handler Ray adds later


_embedded = False


def embedded() -> bool:
    """True when this process started its own local Ray (not joined a cluster)."""
    return _embedded


def init_ray(workers: int = 0, address: str | None = None, then: tuple[str, ...] = ()) -> None:
    """Start or join Ray. ``then``: modules the job imports next (torch: about a second), loaded
    in a thread meanwhile, as most of ``ray.init`` is waiting for Ray's own processes to start."""
    import ray

    global _embedded
    if ray.is_initialized():
        return
    given = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address.startswith(("http://", "https://")):  # a job server: never a silent run on this machine
        hint = "leave out --address" if given == "--address" else "unset RAY_ADDRESS"
        raise LstmgenError(f"{given} {address} is a job server: `lstmgen submit JOB ...` runs the job there; "
                           f"{hint} to run it here, or give the cluster's GCS address (HOST:6379) to drive it from here")
    _embedded = address == "local"
    kwargs: dict = dict(address=address, logging_level=logging.WARNING, log_to_driver=True)
    if address == "local":
        # One logical CPU more than the training workers take, so Ray Data tasks never starve
        # behind them on a small machine. Everything binds to loopback; the dashboard too (Ray
        # Train's placement-group cleaner asks its state API and warns in a loop without it).
        cpus = max(os.cpu_count() or 1, workers + 1)
        dashboard = os.environ.get("LSTMGEN_DASHBOARD", "1") != "0"
        kwargs.update(num_cpus=cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                      dashboard_port=None, _node_ip_address="127.0.0.1")
    loading = threading.Thread(target=_import, args=(then,), name="lstmgen-import", daemon=True)
    loading.start()
    ray.init(**kwargs)
    loading.join()


def _import(modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (the job's own import, a moment later, reports it)
            return
