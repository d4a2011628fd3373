#!/usr/bin/python3
"""Two builds of ringpool side by side: the task-pool rows of bench_pool.py, base against new, in one run.

"No slower than the previous build" is a claim about two builds on the same machine at the same
time, and these shared VMs drift within seconds. So the rows are measured in rounds that alternate
the builds (base, new, then new, base, ...), each round in fresh processes, and each ratio reported
is the median of the rounds' ratios, with every round's ratio shown.

Rows (2 workers, no-op tasks, as in bench_pool.py):
  Executor map, chunksize 1 and 64 (tasks/s); Executor submit -> result latency (median);
  C++ Pool from 1 and 4 service threads, with callbacks (tasks/s), and its latency (median),
  from each tree's own build/benchmarks/bench_pool_cpp.
A ratio is new's speed over base's: > 1 means new is faster (for latency: base's time over new's).

A tree is a source checkout with its extension built in bindings/ringpool/ and its C++ benchmark in
TREE/build/benchmarks/ (or --base-build/--new-build). The base tree can be any older commit: only
the public Executor API and bench_pool_cpp's command line are used. To make one:

    git worktree add --detach /tmp/base REV && (cd /tmp/base && RINGPOOL_BUILD_DIR=$PWD/build ./run build)
    /usr/bin/python3 benchmarks/compare_builds.py --base /tmp/base [--rounds 5] [--budget 1.0] [--quick] [--markdown PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKERS = 2
# Each row: (name, where its number comes from, True if larger is better).
ROWS = (
    ("Executor map, chunksize 1 (tasks/s)", "executor", "chunksize_1", True),
    ("Executor map, chunksize 64 (tasks/s)", "executor", "chunksize_64", True),
    ("Executor latency, median (us)", "executor", "latency_us", False),
    ("C++ Pool, 1 thread (tasks/s)", "cpp", "threads_1", True),
    ("C++ Pool, 4 threads (tasks/s)", "cpp", "threads_4", True),
    ("C++ Pool, callbacks (tasks/s)", "cpp", "callbacks", True),
    ("C++ Pool latency, median (us)", "cpp", "latency_us", False),
)


def noop(x=None):
    return x


def _executor_rows(budget):
    """Run in a child whose PYTHONPATH names one tree's bindings: that tree's Executor, warm."""
    import ringpool  # why: from the tree under test, chosen by the parent through PYTHONPATH

    out = {"ringpool": ringpool.__file__}
    with ringpool.Executor(WORKERS) as ex:
        list(ex.map(noop, range(2000)))  # warm-up
        for c in (1, 64):
            n = 2000
            while True:  # size n so that one map takes about `budget` seconds
                t0 = time.perf_counter()
                list(ex.map(noop, range(n), chunksize=c))
                dt = time.perf_counter() - t0
                if dt >= budget / 4 or n >= 4_000_000:
                    break
                n *= 4
            n = max(1000, int(n * budget / dt))
            t0 = time.perf_counter()
            res = list(ex.map(noop, range(n), chunksize=c))
            assert len(res) == n and res[-1] == n - 1
            out[f"chunksize_{c}"] = n / (time.perf_counter() - t0)
        for i in range(50):
            ex.submit(noop, i).result()
        lat = []
        for i in range(1000):
            t0 = time.perf_counter()
            ex.submit(noop, i).result()
            lat.append(time.perf_counter() - t0)
        out["latency_us"] = statistics.median(lat) * 1e6
    return out


def _measure(tree, build, budget, quick):
    env = dict(os.environ, PYTHONPATH=str(tree / "bindings"))
    py = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(budget)], env=env,
                        capture_output=True, text=True, timeout=600)
    if py.returncode != 0:
        raise SystemExit(f"compare_builds: the Executor rows failed in {tree}:\n{py.stderr}")
    res = {"executor": json.loads(py.stdout.splitlines()[-1])}
    exe = build / "benchmarks" / "bench_pool_cpp"
    if exe.exists():
        cpp = subprocess.run([str(exe), str(tree), *(["--quick"] if quick else [])], capture_output=True, text=True,
                             timeout=600)
        if cpp.returncode != 0:
            raise SystemExit(f"compare_builds: {exe} failed:\n{cpp.stderr}")
        raw = json.loads(cpp.stdout)
        res["cpp"] = {k: raw[k]["tasks_per_s"] for k in ("threads_1", "threads_4", "callbacks")}
        res["cpp"]["latency_us"] = raw["latency"]["median_us"]
    return res


def _speed(row, base, new):
    _, part, key, larger_better = row
    if part not in base or part not in new:
        return None
    b, n = base[part][key], new[part][key]
    return n / b if larger_better else b / n


def markdown(args, rounds, load):
    sys.path[:0] = [str(HERE), str(args.new / "bindings")]  # _machine names the new tree's ringpool
    import _machine  # why: the benchmarks' shared machine description, next to this script

    m = _machine.machine_info()
    lines = [f"# ringpool builds compared: {args.new} (new) against {args.base} (base)", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', os.cpu_count())} cores; "
             f"{len(rounds)} rounds, builds alternating; load average at start {load:.1f}.", "",
             "| row | base (median) | new (median) | new/base speed (median of rounds) | per round |",
             "|---|---|---|---|---|"]
    for row in ROWS:
        name, part, key, _ = row
        speeds = [s for s in (_speed(row, r["base"], r["new"]) for r in rounds) if s is not None]
        if not speeds:
            continue
        b = statistics.median(r["base"][part][key] for r in rounds)
        n = statistics.median(r["new"][part][key] for r in rounds)
        lines.append(f"| {name} | {b:,.1f} | {n:,.1f} | **{statistics.median(speeds):.3f}x** | "
                     + ", ".join(f"{s:.2f}" for s in speeds) + " |")
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_executor_rows(float(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, type=Path, help="the previous build's source tree")
    ap.add_argument("--new", type=Path, default=HERE.parent, help="the new tree (default: this checkout)")
    ap.add_argument("--base-build", type=Path, help="default: BASE/build")
    ap.add_argument("--new-build", type=Path, help="default: NEW/build, or $RINGPOOL_BUILD_DIR")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per Executor map row")
    ap.add_argument("--quick", action="store_true", help="bench_pool_cpp --quick (one 0.3 s run per C++ row, not "
                                                         "the median of three 1 s runs)")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.base, args.new = args.base.resolve(), args.new.resolve()
    builds = {"base": args.base_build or args.base / "build",
              "new": args.new_build or Path(os.environ.get("RINGPOOL_BUILD_DIR", args.new / "build"))}
    trees = {"base": args.base, "new": args.new}
    for name, tree in trees.items():
        if not list((tree / "bindings" / "ringpool").glob("_core*.so")):
            raise SystemExit(f"compare_builds: {name} tree {tree} has no built extension in bindings/ringpool/")
    load, rounds = os.getloadavg()[0], []
    for k in range(args.rounds):
        order = ("base", "new") if k % 2 == 0 else ("new", "base")
        r = {}
        for name in order:
            print(f"round {k + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            r[name] = _measure(trees[name], builds[name], args.budget, args.quick)
        rounds.append(r)
    md = markdown(args, rounds, load)
    print(md)
    if args.markdown:
        args.markdown.write_text(md)
    if args.json:
        args.json.write_text(json.dumps({"base": str(args.base), "new": str(args.new), "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
