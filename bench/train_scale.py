"""`lstmgen train` at WikiText-103 scale and beyond: memory and time to the first step must not
grow with the corpus.

For each size, builds a corpus on disk the way bench/prepare_scale.py does (copies of the shared
WikiText-2 test split, lightly perturbed), prepares it, then trains 2 workers for a fixed number
of steps with the real CLI, after the same on the WikiText-2 test split itself (1.3 MB) as the
reference, and prints: seconds from the command to step 1, steps/s after warm-up
(from step 10 on), and the peak memory (PSS) of the whole process tree (driver, Ray, workers,
object store). Then the same from s3:// on a SeaweedFS server on loopback for the first size
(prepare writes straight to S3; the run directory is on S3 too).

    python bench/train_scale.py [--sizes 500 2000] [--steps 60] [--no-s3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.generate import peak_rss_of_tree  # noqa: E402
from bench.prepare_scale import WIKI, build_corpus  # noqa: E402

STEP = re.compile(r"step\s+(\d+) \|\s+[\d.]+%")


def timed_train(args: list[str], env: dict | None = None) -> dict:
    """Run ``lstmgen train ARGS``; time every logged step as its line arrives."""
    import os

    cmd = [sys.executable, "-m", "lstmgen.cli", "train", *args, "--log-every", "1"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    peak = [0]
    threading.Thread(target=peak_rss_of_tree, args=(proc, peak), daemon=True).start()
    seen: dict[int, float] = {}
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        m = STEP.search(line)
        if m:
            seen.setdefault(int(m.group(1)), time.perf_counter() - t0)
    proc.wait()
    if proc.returncode != 0 or 1 not in seen:
        raise SystemExit(f"train failed (exit {proc.returncode}):\n{''.join(tail)}")
    last = max(seen)
    return {"first_step_s": seen[1], "steps_per_s": (last - 10) / (seen[last] - seen[10]), "peak_gb": peak[0] / 1e9,
            "wall_s": time.perf_counter() - t0}


def prepare(corpus: str, out: str, env: dict | None = None) -> float:
    import os

    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lstmgen.cli", "prepare", "--corpus", corpus, "--out", out],
                       capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise SystemExit(f"prepare failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000], help="corpus sizes in MB")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--workdir", default="", help="keep corpora and prepared data here (default: a temp dir, removed)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lstmgen-train-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    train_flags = ["--workers", "2", "--max-steps", str(args.steps), "--eval-every", str(args.steps), "--val-chars", "20000"]
    rows = []
    try:
        for mb in [0, *args.sizes]:  # 0: the WikiText-2 test split itself (1.3 MB), the reference
            corpus, data = (WIKI, work / "data-wiki") if mb == 0 else (work / f"corpus-{mb}.txt", work / f"data-{mb}")
            if not corpus.exists():
                build_corpus(corpus, mb)
            if not (data / "manifest.json").exists():
                print(f"{mb} MB: prepare {prepare(str(corpus), str(data)):.0f} s", flush=True)
            shutil.rmtree(work / f"run-{mb}", ignore_errors=True)
            rows.append((f"{corpus.stat().st_size / 1e6:.0f} MB, local", timed_train(
                ["--data", str(data), "--run", str(work / f"run-{mb}"), *train_flags])))
            print(rows[-1], flush=True)
        if not args.no_s3:
            from tests import s3server

            server = s3server.start(work / "seaweedfs")
            try:
                server.client().create_bucket(Bucket="scale")
                mb = args.sizes[0]
                print(f"{mb} MB to s3: prepare {prepare(str(work / f'corpus-{mb}.txt'), 's3://scale/data', server.env):.0f} s",
                      flush=True)
                rows.append((f"{mb} MB, s3://", timed_train(["--data", "s3://scale/data", "--run", "s3://scale/run", *train_flags],
                                                             server.env)))
            finally:
                server.stop()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'corpus':>16} {'to step 1 s':>11} {'steps/s':>8} {'peak PSS GB':>11} {'wall s':>7}")
    for name, r in rows:
        print(f"{name:>16} {r['first_step_s']:11.1f} {r['steps_per_s']:8.2f} {r['peak_gb']:11.2f} {r['wall_s']:7.0f}")
    print("targets: peak PSS <= 4 GB and <= 25 s to step 1 at every size")


if __name__ == "__main__":
    main()
