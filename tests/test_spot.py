"""The spot reclaim watcher against a fake instance metadata service on loopback (IMDSv2). Its
drain of a real Ray node, and what training does then, are in test_rehearsal.py."""

import time

from lstmgen import spot
from lstmgen.rehearse import FakeMetadata

from .conftest import one_line_error, run_cli


def test_the_watcher_reads_the_notice_with_a_session_token_and_takes_404_as_none():
    metadata = FakeMetadata()
    try:
        assert spot.seconds_to_reclaim(metadata.url) is None  # 404: no reclaim announced
        metadata.reclaim_at = time.time() + 90
        assert 85 <= spot.seconds_to_reclaim(metadata.url) <= 90
        puts = [r for r in metadata.requests if r == ("PUT", "/latest/api/token")]
        gets = [r for r in metadata.requests if r[0] == "GET"]
        assert len(puts) == len(gets) == 2  # a token first, every time (the fake answers 401 without one)
    finally:
        metadata.stop()


def test_on_an_on_demand_instance_the_watcher_exits_at_once():
    metadata = FakeMetadata(reclaim_at=time.time() + 60, life_cycle="on-demand")
    try:
        assert spot.watch("127.0.0.1:1", metadata.url, node_id="n", every=0.1) is None  # no drain attempted
        assert metadata.polls() == 0
    finally:
        metadata.stop()


def test_cluster_reclaim_without_a_running_rehearsal_is_one_line(tmp_path):
    one_line_error(run_cli("cluster", "reclaim", "f" * 56, "--workdir", str(tmp_path)), str(tmp_path), "lstmgen cluster rehearse")
