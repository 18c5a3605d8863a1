"""Cluster mode against a real `ray start --head` on 127.0.0.1: submit prepare -> train -> generate
as Ray jobs, follow/list/status/logs/stop, and fast one-line failures for bad addresses."""

import http.server
import json
import socket
import threading
import time

import pytest

from . import raycluster
from .conftest import one_line_error, run_cli


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = raycluster.start(tmp_path_factory.mktemp("cluster"))
    yield h
    h.stop()


def _cli(head, *args, **kw):
    env = dict(head.env, RAY_ADDRESS=head.url)
    return run_cli(*args, env=env, **kw)


@pytest.mark.slow
def test_submit_prepare_train_generate_as_jobs(head, wiki_slice, tmp_path):
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "gen.jsonl"
    (tmp_path / "primes.txt").write_text("The \nIn 1990\n")
    steps = [
        ("prepare", "--corpus", str(wiki_slice), "--out", str(data)),
        ("train", "--data", str(data), "--run", str(run), "--workers", "2", "--max-steps", "30", "--hidden", "64",
         "--eval-every", "15"),
        ("generate", "--checkpoint", str(run), "--primes-file", str(tmp_path / "primes.txt"), "--num-samples", "2",
         "--length", "30", "--out", str(out)),
        ("tune", "--data", str(data), "--run", str(tmp_path / "search"), "--workers", "1", "--max-steps", "20", "--hidden", "32",
         "--eval-every", "10", "--trials", "1", "--max-concurrent", "1", "--search", "lr=choice:0.01,0.02"),
    ]
    for step in steps:
        r = _cli(head, "submit", *step, "--follow", timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        job_id = r.stdout.splitlines()[0]
        assert job_id.startswith(f"lstmgen-{step[0]}-") and "SUCCEEDED" in r.stderr
        status = _cli(head, "jobs", "status", job_id)
        assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    assert json.loads((data / "manifest.json").read_text())["splits"]["train"]["windows"] > 0
    assert (run / "checkpoint_0000030" / "model.pt").exists()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["chars"] == 30 for r in rows)
    trials = json.loads((tmp_path / "search" / "trials.json").read_text())
    assert len(trials) == 1 and trials[0]["status"] == "finished" and (tmp_path / "search" / "best.json").exists()
    listing = _cli(head, "jobs", "list")
    assert listing.returncode == 0 and listing.stdout.count("SUCCEEDED") >= 4
    logs = _cli(head, "jobs", "logs", job_id)
    assert "trials stopped early" in logs.stdout


@pytest.mark.slow
def test_follow_exit_code_reflects_a_failing_job(head, tmp_path):
    r = _cli(head, "submit", "evaluate", "--checkpoint", str(tmp_path / "missing"), "--data", str(tmp_path), "--follow")
    assert r.returncode == 1
    assert "no such checkpoint" in r.stdout and "FAILED" in r.stderr


@pytest.mark.slow
def test_stop_ends_a_long_job(head, wiki_slice, tmp_path):
    r = _cli(head, "submit", "prepare", "--corpus", str(wiki_slice), "--out", str(tmp_path / "d"), "--follow")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(head, "submit", "train", "--data", str(tmp_path / "d"), "--run", str(tmp_path / "long"), "--workers", "1",
             "--max-steps", "1000000", "--hidden", "64")
    job_id = r.stdout.strip().splitlines()[0]
    deadline = time.time() + 120
    while not (tmp_path / "long" / "train_config.json").exists():  # the job is past start-up, training
        assert time.time() < deadline
        time.sleep(1)
    stopped = _cli(head, "jobs", "stop", job_id, timeout=120)
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout, stopped.stderr


@pytest.mark.slow
def test_bad_addresses_fail_fast_with_one_line(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts TCP connections and never answers
    not_ray = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=not_ray.serve_forever, daemon=True).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    cases = [
        (f"http://127.0.0.1:{closed_port}", "cannot reach"),
        (f"http://127.0.0.1:{silent.getsockname()[1]}", "no answer within"),
        (f"http://127.0.0.1:{not_ray.server_port}", "not a Ray job server"),
        ("127.0.0.1:6379", "GCS port"),
    ]
    try:
        for address, fragment in cases:
            t0 = time.time()
            one_line_error(run_cli("jobs", "list", "--address", address, cwd=tmp_path), fragment)
            assert time.time() - t0 < 10, address
            t0 = time.time()
            one_line_error(run_cli("submit", "train", "--data", "d", "--run", "r", "--address", address, cwd=tmp_path), fragment)
            assert time.time() - t0 < 10, address
    finally:
        silent.close()
        not_ray.shutdown()
    one_line_error(run_cli("jobs", "list", env={"RAY_ADDRESS": None}), "--address")


def test_a_job_server_url_given_to_a_job_command_is_refused_not_run_here(tmp_path):
    one_line_error(run_cli("train", "--data", "d", "--run", "r", "--address", "http://127.0.0.1:8265", cwd=tmp_path),
                   "is a job server", "lstmgen submit", "leave out --address")
    one_line_error(run_cli("prepare", "--out", "d", "--corpus", "c.txt", cwd=tmp_path, env={"RAY_ADDRESS": "http://127.0.0.1:8265"}),
                   "RAY_ADDRESS http://127.0.0.1:8265 is a job server", "unset RAY_ADDRESS")
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


class _FakeServer(http.server.ThreadingHTTPServer):
    """A loopback HTTP server that answers from a table (path -> JSON) and records what it saw;
    paths not in the table hang until the server is shut down (a stalled job server)."""

    daemon_threads = True

    def __init__(self, answers: dict):
        self.answers, self.seen, self.release = answers, [], threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.seen.append((self.path, self.headers.get("Authorization")))
                if self.path not in server.answers:
                    server.release.wait(120)
                    return
                body = json.dumps(server.answers[self.path]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def close(self) -> None:
        self.release.set()
        self.shutdown()


RAY_VERSION = {"version": "4", "ray_version": "2.60.0", "ray_commit": "0" * 40, "session_name": "fake"}


def test_the_token_goes_only_to_a_server_that_identified_itself_as_ray(tmp_path):
    impostor = _FakeServer({"/api/version": RAY_VERSION, "/api/authentication_mode": {"mode": "token"}})
    try:
        one_line_error(run_cli("jobs", "list", "--address", impostor.url, env={"RAY_AUTH_TOKEN": "s3cr3t-token"}),
                       "not a Ray job server")
    finally:
        impostor.close()
    assert impostor.seen and all(auth is None for _, auth in impostor.seen), impostor.seen


@pytest.mark.slow  # three 15-second deadlines
def test_a_job_server_that_stops_answering_ends_the_command_in_one_line(tmp_path):
    stalled = _FakeServer({"/api/version": RAY_VERSION, "/api/authentication_mode": {"authentication_mode": "disabled"}})
    try:
        for args in (["jobs", "list"], ["jobs", "status", "some-job"], ["jobs", "logs", "some-job", "--follow"]):
            t0 = time.time()
            one_line_error(run_cli(*args, "--address", stalled.url, timeout=120), "no answer within 15 s")
            assert time.time() - t0 < 40, args
    finally:
        stalled.close()
