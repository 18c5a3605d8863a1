"""A real Ray head for the submit tests: `ray start --head` on 127.0.0.1, its temp dir inside the
test's tmp dir (reached through a short symlink: Ray's socket paths must stay under 107 bytes),
token authentication on with a token of the test's own. Stopped by killing exactly its processes."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lstmgen.rehearse import stop_processes_under, wait_for_job_server

from .s3server import free_port


@dataclass
class RayHead:
    url: str
    temp_dir: str
    env: dict

    def stop(self) -> None:
        stop_processes_under(self.temp_dir)


def start(workdir: Path, num_cpus: int = 4) -> RayHead:
    (workdir / "ray").mkdir(parents=True, exist_ok=True)
    link = tempfile.mktemp(prefix="lr", dir="/tmp")
    os.symlink(workdir / "ray", link)
    gcs, dashboard = free_port(), free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", f"--temp-dir={link}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
           "--disable-usage-stats", f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    head = RayHead(f"http://127.0.0.1:{dashboard}", link, env)
    if out.returncode != 0:
        head.stop()
        raise RuntimeError(f"ray start --head failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    # Probe with this head's own token (in-process Ray caches whatever token it loaded first).
    try:
        wait_for_job_server(head.url, env["RAY_AUTH_TOKEN"], timeout=60)
    except Exception:
        head.stop()
        raise
    return head
