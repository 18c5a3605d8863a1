"""The spot reclaim watcher against a fake instance metadata service on loopback (IMDSv2). Its
drain of a real Ray node, and what training does then, are in test_rehearsal.py."""

import time

import pytest

from lstmgen import spot
from lstmgen.rehearse import FakeMetadata

from .conftest import one_line_error, run_cli


def test_the_watcher_reads_the_notice_with_a_session_token_and_takes_404_as_none():
    metadata = FakeMetadata()
    try:
        assert spot.reclaim_deadline(metadata.url) is None  # 404: no reclaim announced
        metadata.reclaim_at = time.time() + 90
        assert abs(spot.reclaim_deadline(metadata.url) - metadata.reclaim_at) <= 1  # the time AWS gave, to the second
        puts = [r for r in metadata.requests if r == ("PUT", "/latest/api/token")]
        gets = [r for r in metadata.requests if r[0] == "GET"]
        assert len(puts) == len(gets) == 2  # a token (with its TTL: the fake answers 400 without) first, every time
    finally:
        metadata.stop()


def test_on_an_on_demand_instance_the_watcher_exits_at_once():
    metadata = FakeMetadata(reclaim_at=time.time() + 60, life_cycle="on-demand")
    try:
        assert spot.watch("127.0.0.1:1", metadata.url, node_id="n", every=0.1) is None  # no drain attempted
        assert metadata.polls() == 0
    finally:
        metadata.stop()


def test_a_metadata_service_away_at_boot_does_not_end_the_watcher():
    """Caught: the first read (the instance's life cycle) was outside the retry, so a 503 at boot
    ended the watcher for good (cluster.yaml starts it once)."""
    metadata = FakeMetadata(life_cycle="on-demand", unavailable=3)
    try:
        assert spot.watch("127.0.0.1:1", metadata.url, node_id="n", every=0.05) is None  # it got its answer at last
        assert len(metadata.requests) > 3
    finally:
        metadata.stop()


def test_the_watcher_finds_its_own_ray_node_by_the_instance_address(ray_local):
    """``own_node_id`` against a real Ray node: the alive node at the metadata's local-ipv4."""
    node = next(n for n in ray_local.nodes() if n["Alive"])
    metadata = FakeMetadata(local_ipv4=node["NodeManagerAddress"])
    try:
        address = ray_local.get_runtime_context().gcs_address
        assert spot.own_node_id(address, metadata.url) == node["NodeID"] == ray_local.get_runtime_context().get_node_id()
        metadata.local_ipv4 = "192.0.2.250"  # no node there
        with pytest.raises(RuntimeError, match="no alive Ray node at 192.0.2.250"):
            spot.own_node_id(address, metadata.url)
    finally:
        metadata.stop()


def test_cluster_reclaim_without_a_running_rehearsal_is_one_line(tmp_path):
    one_line_error(run_cli("cluster", "reclaim", "f" * 56, "--workdir", str(tmp_path)), str(tmp_path), "lstmgen cluster rehearse")
