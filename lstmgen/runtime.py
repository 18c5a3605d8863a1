"""Starting or joining Ray. Local jobs run on an embedded, private Ray (``address="local"``, so a
stale cluster file left by ``ray stop`` is never joined); jobs submitted to a cluster join it
through ``RAY_ADDRESS``, which the Ray job supervisor sets."""

from __future__ import annotations

import logging
import os

# Before Ray Data is imported: its per-operator INFO lines drown the job's own progress lines.
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints reach the driver once, not twice

import ray  # noqa: E402

_embedded = False


def embedded() -> bool:
    """True when this process started its own local Ray (not joined a cluster)."""
    return _embedded


def init_ray(workers: int = 0, address: str | None = None) -> None:
    global _embedded
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address.startswith(("http://", "https://")):
        address = "local"  # a job-server URL is for `lstmgen submit`/`jobs`; jobs run here run embedded
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
    ray.init(**kwargs)
