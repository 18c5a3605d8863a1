"""Ray Jobs client: submit ``jobs/<job>.py`` to a cluster's job server, follow, list and stop jobs.

The Ray SDK has no timeout of its own: a port that accepts TCP and never answers hangs
``submit_job`` for minutes, and a GCS address given instead of the dashboard URL takes tens of
seconds to fail. So every command first probes the server with a short timeout and turns each
failure into one line, and every SDK call after that has a deadline (``JobServer``); following a
job's logs checks every few seconds that the server still answers.

Token authentication (Ray's default for new clusters) is on: the token comes from
``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, and is sent only to a server
that has first identified itself as a Ray dashboard (``/api/authentication_mode``, which Ray
serves without a token) and said that it wants one.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from lstmgen.errors import LstmgenError

PROBE_TIMEOUT_S = 5.0  # the first contact
REQUEST_TIMEOUT_S = 15.0  # each job-server call after it
UPLOAD_TIMEOUT_S = 300.0  # a submission uploads the project (up to 100 MiB); logs can be long
HEARTBEAT_S = 5.0  # while following logs
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Passed to the job: where S3 is and how Ray should log. Credentials are never sent: the cluster
# has its own (an instance profile on AWS), and runtime_env is visible in the dashboard.
PASS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "LSTMGEN_WIKITEXT_URL",
            "LSTMGEN_WIKITEXT_SHA256", "LSTMGEN_FAIL_AT_STEP", "LSTMGEN_FAIL_MARKER")
EXCLUDES = [".git", ".venv", "venv", ".ci-work", ".lstmgen-rehearsal", "data", "runs", "gen", "lstmgen-run", "*.parquet", "*.pt",
            "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "bench/out"]


def job_server_url(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or ""
    if not address:
        raise LstmgenError("no cluster given: pass --address http://HOST:8265 or set RAY_ADDRESS "
                           "(ray dashboard cluster.yaml opens a tunnel to http://127.0.0.1:8265)")
    if address.startswith("ray://"):
        raise LstmgenError(f"{address}: that is a Ray Client address; the job server is the dashboard URL, like http://HOST:8265")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def auth_headers() -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    try:
        return dict(get_auth_headers_if_auth_enabled({}))
    except Exception:  # noqa: BLE001 - no token anywhere: the server will say if it needs one
        return {}


def _get_json(url: str, path: str, headers: dict, timeout: float) -> dict:
    """GET ``url + path`` as JSON within ``timeout`` seconds; every failure is one line."""
    request = urllib.request.Request(f"{url}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(65536)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise LstmgenError(f"{url}: the job server wants a token (HTTP {exc.code}); set RAY_AUTH_TOKEN to the "
                               "cluster's token (ray get-auth-token on the head node)") from None
        raise LstmgenError(f"{url}: not a Ray job server (GET {path} answered HTTP {exc.code})") from None
    except TimeoutError:
        raise LstmgenError(f"{url}: no answer within {timeout:.0f} s (is this the dashboard address, and is the tunnel up?)") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise LstmgenError(f"{url}: no answer within {timeout:.0f} s (is this the dashboard address?)") from None
        raise LstmgenError(f"{url}: cannot reach the job server ({reason})") from None
    except (OSError, ValueError) as exc:
        raise LstmgenError(f"{url}: cannot reach the job server ({exc})") from None
    try:
        answer = json.loads(body)
        return answer if isinstance(answer, dict) else {}
    except ValueError:
        return {}


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> dict:
    """Check that ``url`` is a reachable Ray job server, within ``timeout`` seconds each step, and
    return the headers to talk to it with (the token only if it is Ray and asks for one)."""
    parsed = urlparse(url)
    if parsed.port in (6379, 10001):
        hint = "the GCS port" if parsed.port == 6379 else "the Ray Client port"
        raise LstmgenError(f"{url}: port {parsed.port} is {hint}; the job server is the dashboard, usually http://{parsed.hostname}:8265")
    mode = _get_json(url, "/api/authentication_mode", {}, timeout).get("authentication_mode")  # no token sent
    if mode not in ("disabled", "token"):
        raise LstmgenError(f"{url}: not a Ray job server (GET /api/authentication_mode did not answer as Ray does)")
    headers = auth_headers() if mode == "token" else {}
    if "ray_version" not in _get_json(url, "/api/version", headers, timeout):
        raise LstmgenError(f"{url}: not a Ray job server (GET /api/version did not return Ray's version)")
    return headers


def _within(timeout: float, what: str, call, *args, **kwargs):
    """Run a blocking SDK call with a deadline (in a daemon thread, which a hung call cannot keep
    the process alive in)."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = call(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LstmgenError(f"{what}: no answer within {timeout:.0f} s; the job server stopped responding")
    if "error" in result:
        raise result["error"]
    return result["value"]


class JobServer:
    """Ray's ``JobSubmissionClient`` with a deadline on each call (the SDK sets none)."""

    def __init__(self, url: str, headers: dict):
        from ray.job_submission import JobSubmissionClient

        self.url, self.headers = url, headers
        self.sdk = _within(REQUEST_TIMEOUT_S, url, JobSubmissionClient, url, headers=headers)

    def _call(self, name: str, *args, timeout: float = REQUEST_TIMEOUT_S, **kwargs):
        return _within(timeout, f"{self.url} ({name})", getattr(self.sdk, name), *args, **kwargs)

    def submit_job(self, **kwargs) -> str:
        return self._call("submit_job", timeout=UPLOAD_TIMEOUT_S, **kwargs)  # uploads the working_dir

    def list_jobs(self):
        return self._call("list_jobs")

    def get_job_info(self, job_id: str):
        return self._call("get_job_info", job_id)

    def get_job_status(self, job_id: str):
        return self._call("get_job_status", job_id)

    def get_job_logs(self, job_id: str) -> str:
        return self._call("get_job_logs", job_id, timeout=UPLOAD_TIMEOUT_S)

    def stop_job(self, job_id: str) -> bool:
        return self._call("stop_job", job_id)

    def tail_job_logs(self, job_id: str):
        return self.sdk.tail_job_logs(job_id)


def client(address: str | None) -> JobServer:
    url = job_server_url(address)
    headers = probe(url)
    import logging

    for name in ("ray.dashboard.modules", "ray._private.runtime_env", "ray.dashboard"):
        logging.getLogger(name).setLevel(logging.WARNING)  # per-file upload notes drown the job id

    return JobServer(url, headers)


def project_runtime_env() -> tuple[dict, str]:
    """The runtime_env that ships this project, and how to call a job inside it.

    ``LSTMGEN_CODE_ON_NODES=PATH`` says the checkout is already at PATH on every node (the
    rehearsal cluster on this machine sets it): the job then runs there in place and nothing is
    shipped. (On a rehearsal that matters: its simulated nodes share one disk, and each node
    would unpack a shipped copy over the one the others are running in.)"""
    root = Path(__file__).resolve().parent.parent
    env_vars = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    env_vars.update(RAY_TRAIN_ENABLE_PRINT_PATCH="0", RAY_DATA_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    in_place = os.environ.get("LSTMGEN_CODE_ON_NODES")
    if in_place:
        return {"working_dir": f"local://{Path(in_place).expanduser().resolve()}", "env_vars": env_vars}, "python jobs/{job}.py"
    if (root / "jobs").is_dir() and (root / "pyproject.toml").exists():  # a checkout: ship it whole
        return {"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env_vars}, "python jobs/{job}.py"
    return {"py_modules": [str(Path(__file__).resolve().parent)], "env_vars": env_vars}, "python -m lstmgen.cli {job}"


def submit(job: str, args: list[str], address: str | None, gpu: bool = False) -> str:
    import shlex

    runtime_env, pattern = project_runtime_env()
    root = Path(__file__).resolve().parent.parent
    if job in ("prepare", "train", "generate", "evaluate") and "{job}.py" in pattern and (root / "jobs" / f"{job}.py").exists():
        entrypoint = pattern.format(job=job)
    else:
        entrypoint = f"python -m lstmgen.cli {job}"
    entrypoint = " ".join([entrypoint, *(shlex.quote(a) for a in args)])
    c = client(address)
    submission_id = f"lstmgen-{job.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"
    kwargs: dict = {}
    if gpu and job == "generate":
        kwargs["entrypoint_num_gpus"] = 0  # the actors take the GPUs, the driver needs none
    return c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                        metadata={"lstmgen": job}, **kwargs)


def follow(c: JobServer, job_id: str, out=sys.stdout) -> str:
    """Print the job's logs as they come, until it ends; return its final status. A job may be
    silent for long, so the server (not the stream) is checked every ``HEARTBEAT_S`` seconds:
    two checks without an answer end the command in one line."""

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    async def heartbeat() -> None:
        misses = 0
        while misses < 2:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await asyncio.to_thread(_get_json, c.url, "/api/authentication_mode", {}, PROBE_TIMEOUT_S)
                misses = 0
            except LstmgenError:
                misses += 1
        raise LstmgenError(f"{c.url}: the job server stopped answering while following {job_id}; "
                           f"the job may still be running (lstmgen jobs status {job_id})")

    async def both() -> None:
        tasks = [asyncio.ensure_future(tail()), asyncio.ensure_future(heartbeat())]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()

    try:
        asyncio.run(both())
    except LstmgenError:
        raise
    except Exception as exc:  # noqa: BLE001 - the log stream closing early is not the job's status
        out.write(f"\n(log stream ended: {exc})\n")
    return wait(c, job_id, timeout=60)


def wait(c, job_id: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while True:
        status = c.get_job_status(job_id).value
        if status in TERMINAL or time.time() > deadline:
            return status
        time.sleep(0.5)


def status_of(c, job_id: str):
    try:
        return c.get_job_info(job_id)
    except RuntimeError as exc:
        raise LstmgenError(f"{job_id}: no such job ({str(exc).splitlines()[0]})") from None


def list_table(c) -> str:
    jobs = sorted(c.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
    rows = [f"{'job id':42}  {'status':10}  {'started':19}  {'minutes':>7}  entrypoint"]
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        end = (j.end_time or time.time() * 1000) / 1000
        minutes = f"{(end - j.start_time / 1000) / 60:7.1f}" if j.start_time else f"{'-':>7}"
        entry = j.entrypoint if len(j.entrypoint) <= 60 else j.entrypoint[:57] + "..."
        rows.append(f"{(j.submission_id or j.job_id or '-'):42}  {str(j.status.value):10}  {started:19}  {minutes}  {entry}")
    return "\n".join(rows)
