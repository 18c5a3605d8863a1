"""Local and S3 paths behind one small API.

Every path a user gives (corpus, prepared data, run directory, primes, output) may be a local
path or ``s3://bucket/prefix``. We resolve it once to a ``pyarrow.fs`` filesystem plus a path
inside it, so Parquet, Ray Data and Ray Train all see the same storage. S3 credentials come from
the standard AWS chain; ``AWS_ENDPOINT_URL`` (or ``--s3-endpoint``, which sets it) points at any
S3-compatible store. Timeouts and retries are short so a dead endpoint fails in seconds.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from lstmgen.errors import LstmgenError

S3_TIMEOUT_S = 5.0  # to connect
S3_SILENCE_S = 6.0  # without a byte, per attempt (two attempts)


def is_s3(path: str) -> bool:
    return str(path).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); refuses ``s3://`` and empty buckets."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise LstmgenError(f"{uri}: an S3 path needs a bucket, like s3://BUCKET/prefix")
    return bucket, key.strip("/")


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kwargs: dict = dict(
        connect_timeout=S3_TIMEOUT_S,
        # On Linux the SDK applies this as "less than 1 byte/s for this long": a transfer that moves
        # never trips it, an endpoint that accepts and never answers fails in ~2 x this.
        request_timeout=S3_SILENCE_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
    )
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        kwargs.setdefault("region", os.environ.get("AWS_REGION", "us-east-1"))
    return pafs.S3FileSystem(**kwargs)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """A user path -> (filesystem, path inside it). S3 paths lose their scheme."""
    path = str(path)
    if is_s3(path):
        bucket, key = split_s3(path)
        return s3_filesystem(), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def join(path: str, *parts: str) -> str:
    if is_s3(path):
        return posixpath.join(str(path).rstrip("/"), *parts)
    return str(Path(path, *parts))


def _describe(path: str, exc: Exception) -> LstmgenError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LstmgenError(f"{path}: {text}")


def info(path: str) -> pafs.FileInfo:
    fs, p = resolve(path)
    try:
        return fs.get_file_info(p)
    except OSError as exc:
        raise _describe(path, exc) from exc


def exists(path: str) -> bool:
    return info(path).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    return info(path).type == pafs.FileType.Directory


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise LstmgenError(f"{path}: no such file") from exc
    except OSError as exc:
        raise _describe(path, exc) from exc


def read_text(path: str) -> str:
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LstmgenError(f"{path}: not UTF-8 text (byte {exc.start} of {len(data)})") from None


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file. Locally via a temporary name and rename, so readers never see half
    a file; S3 objects only become visible once the upload completes."""
    fs, p = resolve(path)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
            Path(tmp).write_bytes(data)
            os.replace(tmp, p)
        else:
            with fs.open_output_stream(p) as f:
                f.write(data)
    except OSError as exc:
        raise _describe(path, exc) from exc


def write_file(path: str, local: str) -> None:
    """Write a local file to ``path`` in pieces (never whole in memory), as ``write_bytes`` does:
    locally through a temporary name and a rename, on S3 as one upload."""
    fs, p = resolve(path)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
            shutil.copyfile(local, tmp)
            os.replace(tmp, p)
        else:
            with open(local, "rb") as src, fs.open_output_stream(p) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
    except OSError as exc:
        raise _describe(path, exc) from exc


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def delete(path: str) -> None:
    """Remove one file (nothing if it is already gone)."""
    fs, p = resolve(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _describe(path, exc) from exc


def list_dir(path: str) -> list[pafs.FileInfo]:
    """Direct children of a directory (empty if it does not exist)."""
    fs, p = resolve(path)
    try:
        return fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    except OSError as exc:
        raise _describe(path, exc) from exc


def require_prefix(path: str) -> None:
    """Outputs go under a prefix, never straight into a bucket's root."""
    if is_s3(path) and not split_s3(path)[1]:
        raise LstmgenError(f"{path}: give a prefix inside the bucket, like {path.rstrip('/')}/NAME")


def check_bucket(path: str) -> None:
    """Fail in one line when an S3 path's bucket is missing, forbidden or unreachable."""
    if not is_s3(path):
        return
    bucket, _ = split_s3(path)
    fs = s3_filesystem()
    try:
        kind = fs.get_file_info(bucket).type
    except OSError as exc:
        raise _describe(path, exc) from exc
    if kind == pafs.FileType.NotFound:
        raise LstmgenError(f"{path}: bucket {bucket!r} does not exist (or is not visible)")


def copy_tree(src: str, dst: str) -> None:
    sfs, sp = resolve(src)
    dfs, dp = resolve(dst)
    try:
        if isinstance(dfs, pafs.LocalFileSystem):
            Path(dp).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(sp, dp, source_filesystem=sfs, destination_filesystem=dfs)
    except OSError as exc:
        raise _describe(f"{src} -> {dst}", exc) from exc


def publish(staging: str, dst: str, last=lambda rel: False) -> None:
    """Move a complete staging directory to ``dst``, replacing what is there. Locally one rename
    (after the old ``dst`` is moved aside and then removed). S3 has no rename: ``dst``'s commit
    markers (the files for which ``last(rel)`` holds) are deleted first, so a reader never pairs
    an old marker with new files; then server-side copies, the markers last; then ``dst``'s
    objects the staging did not have, and the staging prefix, are deleted."""
    sfs, sp = resolve(staging)
    dfs, dp = resolve(dst)
    try:
        if isinstance(dfs, pafs.LocalFileSystem):
            old = f"{dp}.old-{uuid.uuid4().hex[:8]}"
            if Path(dp).exists():
                os.replace(dp, old)
            os.replace(sp, dp)
            if Path(old).exists():
                dfs.delete_dir(old)
            return
        new, old_files = walk(staging), walk(dst)
        for rel in filter(last, old_files):
            dfs.delete_file(f"{dp}/{rel}")
        for rel in sorted(new, key=last):  # False sorts first
            dfs.copy_file(f"{sp}/{rel}", f"{dp}/{rel}")
        for rel in set(old_files) - set(new) - set(filter(last, old_files)):
            dfs.delete_file(f"{dp}/{rel}")
        dfs.delete_dir(sp)
    except OSError as exc:
        raise _describe(f"{staging} -> {dst}", exc) from exc


def walk(path: str) -> dict[str, int]:
    """Every file under a directory: relative path -> size in bytes."""
    fs, p = resolve(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise _describe(path, exc) from exc
    return {i.path[len(p) :].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers and jobs run in other directories); S3 unchanged.
    Any other scheme (``s3a://``, ``gs://``, ``S3://``, ``http://``) is refused, never taken for
    a local directory of that name."""
    if not path or is_s3(path):
        return path
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", path)
    if scheme:
        hint = "; S3 paths are spelled s3://" if scheme.group(1).lower().startswith("s3") else ""
        raise LstmgenError(f"{path}: {scheme.group(1)}:// is not supported here (a local path or s3://BUCKET/PREFIX){hint}")
    return str(Path(path).expanduser().resolve())
