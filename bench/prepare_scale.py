"""`lstmgen prepare` at WikiText-103 scale: builds a ~540 MB corpus from the shared WikiText-2
test split (each copy lightly perturbed: paragraphs rotated, a digit changed per line), runs the
real CLI on it and reports wall time, MB/s, peak memory (PSS) of the whole process tree (driver, Ray and
its workers) and Parquet bytes on disk against corpus bytes.

    python bench/prepare_scale.py [--mb 540] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.generate import peak_rss_of_tree  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def build_corpus(path: Path, megabytes: int) -> int:
    lines = WIKI.read_text(encoding="utf-8").splitlines(keepends=True)
    target = megabytes * 1_000_000
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            shift = (copy * 7919) % len(lines)
            for line in lines[shift:] + lines[:shift]:
                if copy and line[:1].isdigit():
                    line = str((int(line[0]) + copy) % 10) + line[1:]
                out.write(line)
            written = out.tell()
            copy += 1
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=540)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lstmgen-prepare-"))
    try:
        corpus = tmp / "big.txt"
        size = build_corpus(corpus, args.mb)
        print(f"corpus {size / 1e6:.0f} MB ({corpus})")
        cmd = [sys.executable, "-m", "lstmgen.cli", "prepare", "--corpus", str(corpus), "--out", str(tmp / "data")]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak = [0]
        threading.Thread(target=peak_rss_of_tree, args=(proc, peak), daemon=True).start()
        out, _ = proc.communicate()
        wall = time.perf_counter() - t0
        parquet = sum(p.stat().st_size for p in (tmp / "data").rglob("*.parquet"))
        print("\n".join(line for line in out.splitlines() if line.startswith("prepare:")))
        print(f"\n{'corpus MB':>9} {'wall s':>7} {'MB/s':>6} {'peak PSS GB':>11} {'parquet MB':>10} {'parquet/corpus':>14}")
        print(f"{size / 1e6:9.0f} {wall:7.1f} {size / 1e6 / wall:6.1f} {peak[0] / 1e9:11.2f} {parquet / 1e6:10.0f} "
              f"{parquet / size:14.2f}")
        print(f"ratio parquet/corpus {parquet / size:.2f} (target <= 1.1); "
              f"peak memory (PSS, whole process tree) {peak[0] / 1e9:.2f} GB (target < 2); exit {proc.returncode}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
