"""Who uses the cores while a job trains: every thread of every process, over an interval.

    python bench/cpu_share.py [SECONDS] [--top N]

Reads /proc/PID/task/TID/stat and status twice, SECONDS apart, and prints each thread's share of
a core, its involuntary context switches per second (the times it was preempted) and its
voluntary ones (the times it went to sleep, i.e. woke up), busiest first, then the same by
process. Run it beside `lstmgen train` once the steps have settled.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

HZ = os.sysconf("SC_CLK_TCK")


def snapshot() -> dict:
    threads = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
                fields = stat[stat.rindex(")") + 2:].split()
                threads[(pid, tid)] = (cmd, stat[stat.index("(") + 1:stat.rindex(")")],
                                       int(fields[11]) + int(fields[12]),
                                       int(status["nonvoluntary_ctxt_switches"]), int(status["voluntary_ctxt_switches"]))
        except (OSError, ValueError, KeyError):
            continue  # a process or thread that ended meanwhile
    return threads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("seconds", type=float, nargs="?", default=10.0)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    before, start = snapshot(), time.time()
    time.sleep(args.seconds)
    after, dt = snapshot(), time.time() - start
    rows, by_process = [], collections.Counter()
    for key, (cmd, name, ticks, preempted, slept) in after.items():
        _, _, ticks0, preempted0, slept0 = before.get(key, (cmd, name, 0, 0, 0))
        share = (ticks - ticks0) / HZ / dt
        by_process[(key[0], cmd)] += share
        rows.append((share, key, name, (preempted - preempted0) / dt, (slept - slept0) / dt, cmd))
    rows.sort(reverse=True)
    print(f"cores used in {dt:.1f} s: {sum(r[0] for r in rows):.2f} of {os.cpu_count()}")
    print(f"{'core':>6} {'pid':>7} {'tid':>7} {'thread':16} {'preempted/s':>11} {'woke/s':>7}  process")
    for share, (pid, tid), name, preempted, slept, cmd in rows[:args.top]:
        print(f"{share:6.3f} {pid:>7} {tid:>7} {name[:16]:16} {preempted:11.0f} {slept:7.0f}  {cmd[:60]}")
    print("\nby process:")
    for (pid, cmd), share in by_process.most_common(args.top):
        print(f"{share:6.3f} {pid:>7}  {cmd}")


if __name__ == "__main__":
    main()
