"""Before a job asks Ray for workers: can this cluster ever hold them, and do its nodes share the
job's storage?

Ray waits for resources forever: a request no node can hold (``--gpu`` where there is no GPU,
more workers than the cluster's largest size) stays pending with no word to the user. So every
job that asks for workers checks first, from the driver, within seconds:

- what the alive nodes hold now (each worker's bundle must fit on one node);
- what the autoscaler can ever add: its node types x ``max_workers``, read from the autoscaling
  config on the head (Ray's published copy, else ``LSTMGEN_CLUSTER_CONFIG``, else the file
  ``ray up`` leaves at ``~/ray_bootstrap_config.yaml``). Without one, an embedded Ray has exactly
  what it has; a cluster we know nothing about may still grow, so we wait.

A request that can never fit fails with one line naming what was asked and what exists. One that
can fit later asks the autoscaler for it (``request_resources``), prints a progress line while
nodes start, and gives up after ``wait_timeout`` seconds with one line.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lstmgen import storage
from lstmgen.errors import LstmgenError

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
PROGRESS_EVERY_S = 10.0


@dataclass
class Capacity:
    nodes: list[dict]  # alive nodes' total resources
    node_types: dict | None  # name -> {"resources": {...}, "max_workers": n}; None: unknown
    max_workers: int  # the autoscaler's global cap on worker nodes
    embedded: bool

    def fits_now(self, bundle: dict) -> int:
        return sum(_fit(node, bundle) for node in self.nodes)

    def fits_ever(self, bundle: dict) -> float:
        """How many bundles the cluster could ever hold; ``inf`` when nobody can say."""
        if self.node_types is None:
            return self.fits_now(bundle) if self.embedded else math.inf
        if any(not t["resources"] and t["max_workers"] > 0 for t in self.node_types.values()):
            return math.inf  # a node type whose resources Ray detects only at launch: nobody can say
        head = sum(_fit(n, bundle) for n in self.nodes if n.get("node:__internal_head__"))
        per_type = sorted(((_fit(t["resources"], bundle), t["max_workers"]) for t in self.node_types.values()), reverse=True)
        total, room = head, self.max_workers
        for per_node, count in per_type:
            take = min(count, room)
            total, room = total + per_node * take, room - take
        return total

    def describe(self) -> str:
        totals: dict[str, float] = {}
        for node in self.nodes:
            for k, v in node.items():
                if not k.startswith("node:") and k not in ("memory", "object_store_memory"):
                    totals[k] = totals.get(k, 0) + v
        now = f"{len(self.nodes)} node(s) with {_fmt(totals)}"
        if self.node_types is None:
            return now + ("" if self.embedded else " (autoscaler limits unknown)")
        types = ", ".join(f"{name} up to {t['max_workers']} x {_fmt(t['resources'])}" for name, t in self.node_types.items())
        return f"{now}; the autoscaler can add {types or 'nothing'}"


def _fit(node: dict, bundle: dict) -> int:
    counts = [int(node.get(k, 0) // v) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 0


def _fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _autoscaler_config() -> dict | None:
    path = os.environ.get("LSTMGEN_CLUSTER_CONFIG") or os.path.expanduser(BOOTSTRAP_CONFIG)
    if not os.path.exists(path):
        return None
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None


def capacity() -> Capacity:
    """What the connected Ray cluster holds now and what its autoscaler can add."""
    import ray

    from lstmgen.runtime import embedded

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    config = None if embedded() else _autoscaler_config()
    if config is None:
        return Capacity(nodes, None, 0, embedded())
    head = config.get("head_node_type")
    types = {name: {"resources": dict(spec.get("resources") or {}), "max_workers": int(spec.get("max_workers", 0))}
             for name, spec in (config.get("available_node_types") or {}).items() if name != head}
    return Capacity(nodes, types, int(config.get("max_workers", sum(t["max_workers"] for t in types.values()))), False)


def require(what: str, bundle: dict, count: int, wait_timeout: float, log=print) -> None:
    """Make sure ``count`` x ``bundle`` can be placed; wait (with progress) up to ``wait_timeout``
    seconds for the autoscaler to add nodes; fail with one line when it can never happen."""
    from ray.autoscaler.sdk import request_resources

    cap = capacity()
    if cap.fits_now(bundle) >= count:
        return
    asked = f"{what} asks for {count} x {_fmt(bundle)}"
    if cap.fits_ever(bundle) < count:
        hint = " (no GPU anywhere: leave out --gpu)" if bundle.get("GPU") and not any(n.get("GPU") for n in cap.nodes) \
            and not any(t["resources"].get("GPU") for t in (cap.node_types or {}).values()) else ""
        raise LstmgenError(f"{asked}, but this cluster can hold at most {int(cap.fits_ever(bundle))}: {cap.describe()}{hint}")
    request_resources(bundles=[bundle] * count)
    t0 = last = time.time()
    log(f"{what}: waiting for {count} x {_fmt(bundle)} (up to {wait_timeout:.0f} s); {cap.describe()}")
    try:
        while True:
            time.sleep(1.0)
            cap = capacity()
            placed = cap.fits_now(bundle)
            if placed >= count:
                log(f"{what}: resources ready after {time.time() - t0:.0f} s ({len(cap.nodes)} node(s) up)")
                return
            if time.time() - t0 > wait_timeout:
                raise LstmgenError(f"{asked}; after {wait_timeout:.0f} s only {placed} fit ({cap.describe()}); "
                                   "raise --wait-timeout or ask for less")
            if time.time() - last >= PROGRESS_EVERY_S:
                last = time.time()
                request_resources(bundles=[bundle] * count)  # again: an autoscaler busy removing idle nodes may have passed it by
                log(f"{what}: still waiting, {placed}/{count} placeable on {len(cap.nodes)} node(s) up "
                    f"({time.time() - t0:.0f} s of {wait_timeout:.0f} s)")
    finally:
        request_resources(bundles=[])  # from here on the job's own demand keeps the nodes


def require_shared_storage(paths: dict[str, str], shared_fs: bool) -> None:
    """Refuse local paths on a cluster whose nodes share no disk (``--shared-fs`` opts in for a
    filesystem mounted at the same place on every node, e.g. EFS or NFS)."""
    local = {flag: p for flag, p in paths.items() if p and not storage.is_s3(p)}
    if shared_fs or not local:
        return
    cap = capacity()
    if cap.embedded:
        return
    can_grow = bool(cap.node_types) and any(t["max_workers"] > 0 for t in cap.node_types.values())
    if len(cap.nodes) > 1 or can_grow:
        flag, path = next(iter(local.items()))
        raise LstmgenError(f"{flag} {path} is a local path, but this cluster's nodes share no disk "
                           f"({cap.describe()}); use s3://BUCKET/... or pass --shared-fs if it is mounted on every node")


def bundle_for(gpu: bool) -> tuple[dict, bool]:
    """One worker's resources, and whether it really uses a GPU. On a rehearsal cluster
    (``lstmgen cluster rehearse``) ``LSTMGEN_GPU_RESOURCE`` names the GPU's stand-in."""
    if not gpu:
        return {"CPU": 1}, False
    standin = os.environ.get("LSTMGEN_GPU_RESOURCE")
    if standin:
        return {"CPU": 1, standin: 1}, False
    return {"CPU": 1, "GPU": 1}, True

