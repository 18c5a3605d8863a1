"""The spot reclaim watcher: AWS's two-minute notice, turned into a Ray drain.

AWS announces a spot reclaim about two minutes ahead in the instance metadata
(``/latest/meta-data/spot/instance-action``), but nothing in Ray's AWS provider reads it. This
watcher runs on every worker node (cluster.yaml starts it after ``ray start``), asks the metadata
service (IMDSv2: a session token first, short timeouts) every few seconds, and on a notice
drains its own Ray node with reason preemption and the deadline AWS gave. Ray Train's workers on
that node then see the drain (``ray.train.get_preemption_info``), and ``train`` checkpoints at
once and takes no more steps until the node goes. On an on-demand node the metadata says so
(``instance-life-cycle``) and the watcher exits at once.

The metadata endpoint is a setting (``--metadata-url`` / ``LSTMGEN_METADATA_URL``), so the tests
and ``lstmgen cluster rehearse`` serve a notice from loopback.

    python -m lstmgen.spot --address HEAD:6379 [--node-id HEX] [--metadata-url URL] [--every S]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

METADATA_URL = "http://169.254.169.254"
TIMEOUT_S = 2.0


def _metadata(base: str, path: str) -> str | None:
    """One IMDSv2 read: a session token, then the path; None for 404 (nothing there)."""
    request = urllib.request.Request(f"{base}/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as r:
        token = r.read().decode()
    request = urllib.request.Request(f"{base}/latest/meta-data/{path}", headers={"X-aws-ec2-metadata-token": token})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as r:
            return r.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def reclaim_deadline(base: str) -> float | None:
    """When the instance is stopped or terminated (UNIX seconds), or None when no reclaim is
    announced."""
    text = _metadata(base, "spot/instance-action")
    if text is None:
        return None
    when = datetime.strptime(json.loads(text)["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return when.timestamp()


def drain(address: str, node_id: str, deadline: float, message: str) -> None:
    """Drain a Ray node with reason preemption and a deadline (UNIX seconds), as ``ray drain-node`` does."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=address)
    accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   message, int(deadline * 1000))
    if not accepted:
        raise RuntimeError(f"the drain of node {node_id} was refused: {why}")


def own_node_id(address: str, base: str) -> str:
    """This instance's Ray node: the alive node whose address is this instance's private IP."""
    import ray._raylet
    from ray.core.generated import gcs_pb2

    ip = _metadata(base, "local-ipv4")
    nodes = ray._raylet.GcsClient(address=address).get_all_node_info(timeout=10)
    for node_id, node in nodes.items():
        if node.state == gcs_pb2.GcsNodeInfo.ALIVE and node.node_manager_address == ip:
            return node_id.hex()
    raise RuntimeError(f"no alive Ray node at {ip}")


def _until_it_answers(what: str, read, every: float):
    """``read()`` until it answers: the metadata service or the GCS briefly away (at boot, most
    often) must not end a watcher that cluster.yaml starts only once."""
    while True:
        try:
            return read()
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            print(f"lstmgen.spot: could not read {what} ({exc}); trying again in {every:g} s", flush=True)
            time.sleep(every)


def watch(address: str, base: str, node_id: str = "", every: float = 5.0) -> float | None:
    """Poll until a reclaim is announced, drain the node once, return the seconds AWS gave. Returns
    None at once on an on-demand instance. Everything the drain needs (this node's id) is found
    before the first poll, and the drain's deadline is the one AWS announced, so none of the two
    minutes goes on lookups after the notice."""
    life_cycle = _until_it_answers("the instance metadata", lambda: _metadata(base, "instance-life-cycle"), every)
    if (life_cycle or "spot") != "spot":
        print("lstmgen.spot: an on-demand instance: no reclaim to watch for", flush=True)
        return None
    node = node_id or _until_it_answers("this node's Ray node id", lambda: own_node_id(address, base), every)
    while (deadline := _until_it_answers("the instance metadata", lambda: reclaim_deadline(base), every)) is None:
        time.sleep(every)
    seconds = deadline - time.time()
    drain(address, node, deadline, f"spot reclaim announced by the instance metadata, {seconds:.0f} s ahead")
    print(f"lstmgen.spot: reclaim in {seconds:.0f} s: drained Ray node {node} (reason preemption)", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lstmgen.spot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="The cluster's GCS address, HOST:6379.")
    parser.add_argument("--node-id", default="", help="The Ray node to drain (default: this instance's).")
    parser.add_argument("--metadata-url", default=os.environ.get("LSTMGEN_METADATA_URL", METADATA_URL),
                        help="The instance metadata service.")
    parser.add_argument("--every", type=float, default=5.0, help="Seconds between polls.")
    args = parser.parse_args(argv)
    try:
        watch(args.address, args.metadata_url.rstrip("/"), args.node_id, args.every)
    except (OSError, RuntimeError) as exc:
        print(f"error: lstmgen.spot: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
