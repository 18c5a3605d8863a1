"""s3:// everywhere, against a real S3 server (SeaweedFS on loopback): prepare -> train -> generate,
checkpoint copies between local disk and S3, and the errors a user meets with S3."""

import socket
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from .conftest import one_line_error, run_cli

pytestmark = pytest.mark.slow  # trains, or starts an S3 server or a Ray cluster

BUCKET = "lstmgen-e2e"


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_s3_prepare_train_generate_and_copy(s3, wiki_slice, tmp_path):
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(wiki_slice), BUCKET, "corpus/wiki.txt")
    env = s3.env
    r = run_cli("prepare", "--corpus", f"s3://{BUCKET}/corpus/wiki.txt", "--out", f"s3://{BUCKET}/data", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", "--data", f"s3://{BUCKET}/data", "--run", f"s3://{BUCKET}/runs/a", "--workers", "2",
                "--max-steps", "40", "--hidden", "64", "--eval-every", "20", env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    data_keys = _keys(s3, "data/")
    assert {"data/vocab.json", "data/manifest.json"} <= set(data_keys)
    assert any(k.startswith("data/train/") and k.endswith(".parquet") for k in data_keys)
    assert any(k.startswith("data/valid/") and k.endswith(".parquet") for k in data_keys)
    run_keys = _keys(s3, "runs/a/")
    for step in ("0000020", "0000040"):
        assert {f"runs/a/checkpoint_{step}/model.pt", f"runs/a/checkpoint_{step}/meta.json"} <= set(run_keys)
    assert {"runs/a/metrics.jsonl", "runs/a/loss.png", "runs/a/train_config.json"} <= set(run_keys)

    # The Parquet on S3 opens with plain pyarrow.
    fs = pafs.S3FileSystem(endpoint_override=s3.endpoint.split("://")[1], scheme="http",
                           access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"])
    assert pq.read_table(f"{BUCKET}/data/train", filesystem=fs).num_rows > 1000

    from_s3 = run_cli("generate", "--checkpoint", f"s3://{BUCKET}/runs/a", "--length", "80", "--seed", "9", env=env)
    assert from_s3.returncode == 0, from_s3.stderr[-2000:]

    # Publish and fetch back: S3 -> local -> S3 (another prefix) -> local gives the same text.
    r = run_cli("checkpoints", "copy", f"s3://{BUCKET}/runs/a", str(tmp_path / "local_run"), env=env)
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr[-2000:]
    r = run_cli("checkpoints", "copy", str(tmp_path / "local_run"), f"s3://{BUCKET}/published/a", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("checkpoints", "copy", f"s3://{BUCKET}/published/a", str(tmp_path / "again"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    local = run_cli("generate", "--checkpoint", str(tmp_path / "again"), "--length", "80", "--seed", "9")
    assert local.returncode == 0 and local.stdout == from_s3.stdout

    listing = run_cli("checkpoints", "list", f"s3://{BUCKET}/runs/a", env=env)
    assert listing.returncode == 0 and "best" in listing.stdout and f"s3://{BUCKET}/runs/a/checkpoint_0000040" in listing.stdout


def test_s3_errors_are_one_line_and_fast(s3, tmp_path):
    (tmp_path / "c.txt").write_text("some text " * 50)
    env = s3.env
    one_line_error(run_cli("prepare", "--corpus", "s3://", "--out", "d", env=env, cwd=tmp_path), "needs a bucket")
    one_line_error(run_cli("prepare", "--corpus", "c.txt", "--out", f"s3://{BUCKET}", env=env, cwd=tmp_path), "prefix")
    one_line_error(run_cli("prepare", "--corpus", "c.txt", "--out", "s3://no-such-bucket/data", env=env, cwd=tmp_path),
                   "no-such-bucket", "does not exist")
    one_line_error(run_cli("checkpoints", "list", "s3://no-such-bucket/runs/a", env=env), "no-such-bucket")
    no_credentials = dict(env, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_PROFILE=None,
                          AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    t0 = time.time()
    one_line_error(run_cli("checkpoints", "list", f"s3://{BUCKET}/runs/a", env=no_credentials), f"s3://{BUCKET}/runs/a")
    wrong_secret = dict(env, AWS_SECRET_ACCESS_KEY="not-the-secret")
    one_line_error(run_cli("checkpoints", "list", f"s3://{BUCKET}/runs/a", env=wrong_secret), "ACCESS_DENIED")
    dead_endpoint = dict(env, AWS_ENDPOINT_URL="http://127.0.0.1:9")
    one_line_error(run_cli("generate", "--checkpoint", f"s3://{BUCKET}/runs/a", env=dead_endpoint), f"s3://{BUCKET}/runs/a")
    assert time.time() - t0 < 60  # three failures, each in seconds, no endless retry loop
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # an endpoint that accepts connections and never answers
    try:
        t0 = time.time()
        one_line_error(run_cli("checkpoints", "list", f"s3://{BUCKET}/runs/a",
                               env=dict(env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{silent.getsockname()[1]}")), "Timeout")
        assert time.time() - t0 < 30
    finally:
        silent.close()
