"""Shared fixtures: a real embedded Ray, the WikiText-2 slice, and a CLI runner.

Nothing here is mocked: Ray is a real local runtime, the CLI runs as a real subprocess."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

WIKI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
FIRST = ("test_rehearsal.py", "test_fault.py", "test_s3.py", "test_submit.py",  # the longest files, started first
         "test_tune.py", "test_tracking.py")


def pytest_collection_modifyitems(items: list) -> None:
    """The longest test files first: the suite runs in two processes, one file at a time each
    (pytest-xdist, --dist loadfile), and a long file started last would run on alone."""
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


def wiki_text(chars: int) -> str:
    if not WIKI.exists():
        pytest.skip(f"{WIKI} is missing (the shared WikiText-2 test split sits beside the checkout)")
    return WIKI.read_text(encoding="utf-8")[:chars]


@pytest.fixture(scope="session")
def wiki_slice(tmp_path_factory) -> Path:
    """~100 KB of WikiText-2 raw (test split), the corpus of the end-to-end tests."""
    path = tmp_path_factory.mktemp("corpus") / "wiki100k.txt"
    path.write_text(wiki_text(100_000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """A real embedded Ray for in-process tests (the CLI tests start their own)."""
    import ray

    from lstmgen.runtime import init_ray

    init_ray(workers=2)
    yield ray
    ray.shutdown()


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``lstmgen ARGS`` as a real subprocess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None removes a variable
    return subprocess.run([sys.executable, "-m", "lstmgen.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def prepare_slice(root: Path, chars: int) -> Path:
    """The first ``chars`` characters of WikiText-2's test split prepared by the real CLI (with a
    valid split): the data a test module's runs train on."""
    (root / "corpus.txt").write_text(wiki_text(chars), encoding="utf-8")
    result = run_cli("prepare", "--corpus", str(root / "corpus.txt"), "--out", str(root / "data"))
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "data"


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert a failed command printed one 'error:' line naming the fragments, and no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback for the whole session."""
    from . import s3server

    server = s3server.start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def corpora(ray_local, tmp_path_factory):
    """The WikiText-2 test split whole (1.29 M characters) and its first tenth, prepared with
    seq_len 16 and small chunks (many files and row groups), and no validation split."""
    from lstmgen.config import PrepareConfig
    from lstmgen.prepare import prepare

    text = wiki_text(2_000_000)
    out = {}
    for name, chars in (("small", len(text) // 10), ("large", len(text))):
        root = tmp_path_factory.mktemp(name)
        (root / "corpus.txt").write_text(text[:chars], encoding="utf-8")
        prepare(PrepareConfig(out=str(root / "data"), corpus=[str(root / "corpus.txt")], seq_len=16, chunk_mb=0.03,
                              valid_fraction=0.0))
        out[name] = (str(root / "data"), text[:chars])
    return out


def peak_memory(fn) -> int:
    """The peak of Python's traced allocations plus the peak of Arrow's memory pool while ``fn``
    runs (tracemalloc does not see Arrow's buffers: Parquet pages, decoded columns). The two
    peaks are added, an upper bound of the peak of both together."""
    import pyarrow as pa

    gc.collect()  # what earlier work left for the cycle collector is not counted: only what ``fn`` holds
    previous = pa.default_memory_pool()
    arrow = pa.proxy_memory_pool(previous)  # counts what goes through it, its own peak included
    pa.set_memory_pool(arrow)
    tracemalloc.start()
    try:
        fn()
        assert arrow.max_memory() > 0, "Arrow's allocations went around the pool being counted"
        return tracemalloc.get_traced_memory()[1] + arrow.max_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
