#!/usr/bin/python3
"""CPU per no-op task, per process, of the task pools: the measure that survives a loaded machine.

On two shared cores a pool's tasks/s says more about the other load than about the pool, but the
CPU each of its processes spends per task barely moves with it. This runs no-op tasks through
each pool named and reads the CPU time (utime + stime from /proc/<pid>/stat) of the service or
parent process and of its worker processes around each run:

  executor      ringpool.Executor(2).map(noop, range(N)), chunksize 1 (this checkout's build)
  cpp           bench_pool_cpp --paired from a build: N tasks through Pool::submit, a future each
  cpp_map       the same, as one Pool::map of N calls

Pools given as NAME or NAME=BUILD_DIR[@SOURCE_TREE] (cpp and cpp_map: the build whose
benchmarks/bench_pool_cpp runs, default ./build, and the tree whose bindings its workers import,
default this checkout: an older tree's worker module against a newer binary, say). Runs alternate
between the pools, the order reversing every round; each row is the median over the runs.

    /usr/bin/python3 benchmarks/pool_cpu.py [--tasks N] [--rounds R] POOL [POOL ...]
    e.g.  benchmarks/pool_cpu.py executor cpp cpp_map
          benchmarks/pool_cpu.py cpp_map=build@/tmp/old-tree cpp_map=build
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid):
    """Descendants of pid (workers and the zygote)."""
    parents = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                parents[int(p)] = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    out, frontier = [], [pid]
    while frontier:
        nxt = [c for c, pp in parents.items() if pp in frontier]
        out += nxt
        frontier = nxt
    return out


def noop(x=None):
    return x


class CppPool:
    """bench_pool_cpp --paired: a warm C++ Pool that runs N tasks per request."""

    def __init__(self, build, tree, as_map):
        exe = Path(build) / "benchmarks" / "bench_pool_cpp"
        self.prefix = "map " if as_map else ""
        self.proc = subprocess.Popen([str(exe), str(tree), "--paired"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"pool_cpu: {exe} did not start")
        self.pid = self.proc.pid

    def run(self, n):
        self.proc.stdin.write(f"{self.prefix}{n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("pool_cpu: bench_pool_cpp ended")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(60)


class ExecutorPool:
    def __init__(self):
        sys.path.insert(0, str(HERE.parent / "bindings"))
        import ringpool  # why: only when the Executor row is asked for (the C++ rows need no ringpool)

        self.ex = ringpool.Executor(2)
        list(self.ex.map(noop, range(2000)))
        self.pid = os.getpid()

    def run(self, n):
        out = list(self.ex.map(noop, range(n)))
        assert len(out) == n

    def close(self):
        self.ex.shutdown()


def measure(spec, n, runs):
    name, _, where = spec.partition("=")
    build, _, tree = where.partition("@")
    if name == "executor":
        pool = ExecutorPool()
    elif name in ("cpp", "cpp_map"):
        pool = CppPool(build or HERE.parent / "build", tree or HERE.parent, name == "cpp_map")
        pool.run(2000)
    else:
        raise SystemExit(f"pool_cpu: unknown pool {name!r} (executor, cpp, cpp_map)")
    kids = [k for k in children(pool.pid)]
    out = []
    try:
        for _ in range(runs):
            before = cpu_seconds(pool.pid), {k: cpu_seconds(k) for k in kids}
            t0 = time.perf_counter()
            pool.run(n)
            wall = time.perf_counter() - t0
            service = cpu_seconds(pool.pid) - before[0]
            workers = sum(cpu_seconds(k) - c for k, c in before[1].items())
            out.append((n / wall, service / n * 1e6, workers / n * 1e6))
    finally:
        pool.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pools", nargs="+")
    ap.add_argument("--tasks", type=int, default=400_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    got = {p: [] for p in args.pools}
    load = os.getloadavg()[0]
    for r in range(args.rounds):
        for p in (args.pools if r % 2 == 0 else args.pools[::-1]):
            got[p] += measure(p, args.tasks, 2)
    print(f"CPU per no-op task, {args.tasks:,} tasks a run, 2 runs per pool and round, {args.rounds} rounds; "
          f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}\n")
    print("| pool | service or parent (us/task) | workers (us/task) | in all | tasks/s (noisy) |")
    print("|---|---:|---:|---:|---:|")
    for p, rows in got.items():
        s = statistics.median(r[1] for r in rows)
        w = statistics.median(r[2] for r in rows)
        print(f"| {p} | {s:.3f} | {w:.3f} | {s + w:.3f} | {statistics.median(r[0] for r in rows):,.0f} |")


if __name__ == "__main__":
    main()
