#!/usr/bin/python3
"""Task-pool benchmark: ringpool.Executor against the stdlib's pools and joblib, in one run.

With 2 workers each, on this machine:

(a) No-op throughput (tasks/s): ``map(noop, range(N), chunksize=c)`` for c = 1 and 64, results
    consumed in order, for ringpool.Executor, concurrent.futures.ProcessPoolExecutor,
    multiprocessing.Pool and joblib's Parallel (loky backend, ``batch_size=c``). Median of 3 runs
    after a warm-up; N is sized so that each run takes about a second.
(b) Latency: sequential submit -> result of a no-op (``submit(f).result()``; ``Pool.apply``;
    a one-call ``Parallel`` batch), median and p99 over many calls after a warm-up.

(c) The C++ ringpool::Pool (benchmarks/bench_pool_cpp.cpp, built by CMake): no-op throughput
    with 1 and 4 service threads submitting (futures collected after submitting), as one Pool::map
    (one future for the batch), from 1 thread
    with async_submit callbacks (for information: no std::future, whose fulfilment costs a futex
    syscall per task), and its sequential latency; same workers, same task function (shipped as
    a registered package).

(d) The two pools side by side, from 1 thread: the Executor's chunksize-1 map and the C++ Pool's
    Pool::map (a batch, one future for it), and each pool's submit with a future per task (the
    Executor's concurrent.futures.Future, the C++ Pool's std::future; the Executor's turn runs a
    tenth of the tasks, its rate being a tenth). A warm pool of each, runs rotating (the order
    changing every round) so that all see the same machine.

(e) ringpool as a multiprocessing context: the stdlib ProcessPoolExecutor with
    ``mp_context=ringpool.get_context()`` against ``mp_context=multiprocessing.get_context("fork")``,
    a fresh warm pool of each per pair, runs alternating as in (d): the (a) and (b) measurements of
    each. Only the context differs: the result queue (``ctx.SimpleQueue``, a ring whose reader PPE
    waits on with ``multiprocessing.connection.wait``), the worker processes and their sentinels.

Targets (ratios from the same run): ringpool's chunksize-1 throughput >= 5x multiprocessing.Pool's
and >= 15x ProcessPoolExecutor's; at chunksize 64 ahead of every peer; latency median <= 30 us;
the C++ Pool's throughput (1 service thread, a future per task) within 1.5x of the Executor's
chunksize-1 throughput, its Pool::map at least as fast as the Executor's map, and its submit at
least as fast as the Executor's (a future per task in both), from (d): the medians of the rounds'
ratios; PPE with the ringpool context at least as fast as with
fork on all three of (e).

    /usr/bin/python3 benchmarks/bench_pool.py [--quick] [--only pools|ppe] [--build DIR] [--json PATH]
                                              [--markdown PATH]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    import ringpool
except ImportError:  # run from a checkout: use the in-tree package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bindings"))
    import ringpool

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine  # noqa: E402

WORKERS = 2
POOLS = ("ringpool", "ProcessPoolExecutor", "multiprocessing.Pool", "joblib (loky)")


def noop(x=None):
    return x


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Peer:
    """One pool under test: map(chunksize) throughput and one-call latency."""

    def __init__(self, name):
        self.name = name
        # The calls to make: a PPE with a given context is driven as the default-context one.
        self.kind = "ProcessPoolExecutor" if name in PPE_CONTEXTS else name
        if name in PPE_CONTEXTS:
            self.pool = cf.ProcessPoolExecutor(WORKERS, mp_context=PPE_CONTEXTS[name]())
        elif name == "ringpool":
            self.pool = ringpool.Executor(WORKERS)
        elif name == "ProcessPoolExecutor":
            self.pool = cf.ProcessPoolExecutor(WORKERS)
        elif name == "multiprocessing.Pool":
            self.pool = mp.Pool(WORKERS)
        else:
            from joblib import Parallel

            self.pool = Parallel(n_jobs=WORKERS, backend="loky")
            self.pool.__enter__()
            self._batches = {}

    def map(self, n, chunksize):
        if self.kind in ("ringpool", "ProcessPoolExecutor"):
            out = list(self.pool.map(noop, range(n), chunksize=chunksize))
        elif self.kind == "multiprocessing.Pool":
            out = self.pool.map(noop, range(n), chunksize=chunksize)
        else:
            from joblib import Parallel, delayed

            p = self._batches.get(chunksize)
            if p is None:
                p = self._batches[chunksize] = Parallel(n_jobs=WORKERS, backend="loky", batch_size=chunksize)
                p.__enter__()
            out = p(delayed(noop)(i) for i in range(n))
        assert len(out) == n and out[-1] == n - 1
        return out

    def call(self, i):
        if self.kind in ("ringpool", "ProcessPoolExecutor"):
            return self.pool.submit(noop, i).result()
        if self.kind == "multiprocessing.Pool":
            return self.pool.apply(noop, (i,))
        from joblib import delayed

        return self.pool([delayed(noop)(i)])[0]

    def close(self):
        if self.kind in ("ringpool", "ProcessPoolExecutor"):
            self.pool.shutdown()
        elif self.kind == "multiprocessing.Pool":
            self.pool.close()
            self.pool.join()
        else:
            for p in self._batches.values():
                p.__exit__(None, None, None)
            self.pool.__exit__(None, None, None)


def throughput(peer, chunksize, quick):
    # Size N so one run takes about a second (less with --quick).
    n = _size(peer, chunksize, 0.3 if quick else 1.0)
    rates = []
    for _ in range(1 if quick else 3):
        t0 = time.perf_counter()
        peer.map(n, chunksize)
        rates.append(n / (time.perf_counter() - t0))
    return {"tasks": n, "tasks_per_s": statistics.median(rates), "runs": rates}


def latency(peer, quick):
    calls = 300 if quick else 3000
    if peer.name == "joblib (loky)":
        calls //= 5  # a Parallel call is slow; fewer keep the run short
    for i in range(50):
        peer.call(i)
    lat = []
    for i in range(calls):
        t0 = time.perf_counter()
        peer.call(i)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return {"calls": calls, "median_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6}


# (e): PPE under each context; the function makes the context when the peer is built.
PPE_CONTEXTS = {
    "PPE, ringpool ctx": lambda: ringpool.get_context(),
    "PPE, fork ctx": lambda: mp.get_context("fork"),
}


def _size(peer, chunksize, budget):
    """N such that one map of N tasks takes about `budget` seconds."""
    n = 2000
    while True:
        t0 = time.perf_counter()
        peer.map(n, chunksize)
        dt = time.perf_counter() - t0
        if dt >= budget / 4 or n >= 4_000_000:
            break
        n *= 4
    return max(1000, int(n * budget / dt))


def _warm_ppe(peer):
    """A fresh PPE to steady state: workers started and code paths hot, and for fork, the parent's
    copy-on-write faults behind it (after a fork every page the parent writes is copied once)."""
    peer.map(2000, 1)
    peer.map(20000, 64)
    for i in range(50):
        peer.call(i)


def run_ppe(quick):
    """(e): PPE with the ringpool context and with fork, in pairs of turns (the order flipping
    every pair) so that both see the same machine minute, a fresh pool of each per pair. Each
    ratio reported is the median of the pairs' ratios.

    Fresh pools, because where the scheduler puts PPE's five busy threads (the parent's caller,
    manager and queue feeder, two workers) on two cores decides its speed more than anything
    else, and a pool keeps its placement for seconds: pinned to fixed placements, either context
    runs 3-13k tasks/s at chunksize 1 depending on the placement, with the two contexts within a
    few percent of each other in each one (docs/design/queues.md, "SimpleQueue under
    ProcessPoolExecutor"). Pools that live for the whole run draw one placement each, so their
    ratio (0.3x to 2.5x per pair) said which context drew the better one; a pair of new pools
    draws again."""
    log("  ProcessPoolExecutor: ringpool context against fork context (a fresh pool of each per pair)")
    names = list(PPE_CONTEXTS)
    pairs = 3 if quick else 9
    block = 100 if quick else 300  # latency: calls per turn; the turn's median is its sample
    rows = {name: {"pool": name} for name in names}
    rates = {c: {name: [] for name in names} for c in (1, 64)}
    turn_medians = {name: [] for name in names}
    lat = {name: [] for name in names}
    sizes = None
    for k in range(pairs):
        order = names if k % 2 == 0 else names[::-1]
        peers = {}
        try:
            for name in order:
                peers[name] = Peer(name)
                _warm_ppe(peers[name])
            if sizes is None:  # sized once, on the first pair: every pair then runs the same work
                sizes = {c: {name: _size(peers[name], c, 0.15 if quick else 0.4) for name in names}
                         for c in (1, 64)}
            for c in (1, 64):
                for name in order:
                    t0 = time.perf_counter()
                    peers[name].map(sizes[c][name], c)
                    rates[c][name].append(sizes[c][name] / (time.perf_counter() - t0))
            for name in order:
                peer, turn = peers[name], []
                for i in range(block):
                    t0 = time.perf_counter()
                    peer.call(i)
                    turn.append(time.perf_counter() - t0)
                lat[name] += turn
                turn_medians[name].append(statistics.median(turn))
        finally:
            for peer in peers.values():
                peer.close()
    ratios = {}
    for c in (1, 64):
        for name in names:
            rows[name][f"chunksize_{c}"] = {"tasks": sizes[c][name], "tasks_per_s": statistics.median(rates[c][name]),
                                            "runs": rates[c][name]}
        ratios[f"chunksize_{c}"] = [a / b for a, b in zip(*(rates[c][name] for name in names))]
    for name in names:
        v = sorted(lat[name])
        rows[name]["latency"] = {"calls": len(v), "median_us": v[len(v) // 2] * 1e6,
                                 "p99_us": v[int(len(v) * 0.99)] * 1e6}
    # Latency as a speed: fork's time over ringpool's, so > 1 means ringpool is faster.
    ratios["latency"] = [b / a for a, b in zip(*(turn_medians[name] for name in names))]
    return {"rows": [rows[name] for name in names], "pairs": pairs,
            "ratios": {k: {"median": statistics.median(v), "pairs": v} for k, v in ratios.items()}}


def run(quick):
    rows = []
    for name in POOLS:
        log(f"  {name}")
        peer = Peer(name)
        try:
            peer.map(200, 1)  # warm-up: workers started, code paths hot
            row = {"pool": name}
            for c in (1, 64):
                row[f"chunksize_{c}"] = throughput(peer, c, quick)
            row["latency"] = latency(peer, quick)
            rows.append(row)
        finally:
            peer.close()
    return rows


def run_cpp(build, quick):
    exe = Path(build) / "benchmarks" / "bench_pool_cpp"
    if not exe.exists():
        log(f"  C++ Pool: {exe} not built; skipped")
        return None
    log("  ringpool::Pool (C++)")
    src = Path(__file__).resolve().parent.parent
    out = subprocess.run([str(exe), str(src), *(["--quick"] if quick else [])], capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout)


class _CppPaired:
    """bench_pool_cpp --paired: a warm C++ Pool that runs n no-op tasks on request."""

    def __init__(self, exe, src):
        self.proc = subprocess.Popen([str(exe), str(src), "--paired"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        if self._line(120) != "ready":
            raise RuntimeError("bench_pool_cpp --paired did not start")

    def _line(self, timeout):
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.proc.kill()
                raise TimeoutError(f"bench_pool_cpp --paired: no answer within {timeout} s")
        return self.proc.stdout.readline().strip()

    def rate(self, n):
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return float(self._line(300))

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_paired(build, quick):
    """The Executor and the C++ Pool from 1 thread, each as one batch (map, chunksize 1; Pool::map)
    and as a future per task (submit), side by side: runs of the four alternate, the order
    rotating every round, so that all see the same machine (the speed of these shared VMs drifts
    by tens of percent over minutes). The ratios reported are the medians of the rounds' ratios."""
    exe = Path(build) / "benchmarks" / "bench_pool_cpp"
    if not exe.exists():
        return None
    log("  Executor and C++ Pool side by side")
    cpp = _CppPaired(exe, Path(__file__).resolve().parent.parent)
    ex = ringpool.Executor(WORKERS)
    try:
        list(ex.map(noop, range(2000)))
        t0 = time.perf_counter()
        list(ex.map(noop, range(50_000)))
        n = max(2000, int(50_000 / (time.perf_counter() - t0) * (0.2 if quick else 0.5)))

        def executor():
            t0 = time.perf_counter()
            out = list(ex.map(noop, range(n)))
            assert len(out) == n and out[-1] == n - 1
            return n / (time.perf_counter() - t0)

        n_submit = max(2000, n // 10)  # a concurrent.futures.Future per task runs ~10x slower

        def executor_submit():
            t0 = time.perf_counter()
            fs = [ex.submit(noop, i) for i in range(n_submit)]
            out = [f.result() for f in fs]
            assert len(out) == n_submit and out[-1] == n_submit - 1
            return n_submit / (time.perf_counter() - t0)

        turns = {"executor": executor, "cpp": lambda: cpp.rate(str(n)), "cpp_map": lambda: cpp.rate(f"map {n}"),
                 "executor_submit": executor_submit}
        names = list(turns)
        pairs = []
        for k in range(2 if quick else 7):
            order = names[k % len(names):] + names[:k % len(names)]
            if k % 2:
                order.reverse()
            got = {name: turns[name]() for name in order}
            pairs.append({**got, "ratio": got["executor"] / got["cpp"], "map_ratio": got["cpp_map"] / got["executor"],
                          "submit_ratio": got["cpp"] / got["executor_submit"]})
    finally:
        ex.shutdown()
        cpp.close()
    return {"tasks": n, "submit_tasks": n_submit, "pairs": pairs,
            "executor_tasks_per_s": statistics.median(p["executor"] for p in pairs),
            "executor_submit_tasks_per_s": statistics.median(p["executor_submit"] for p in pairs),
            "submit_ratio": statistics.median(p["submit_ratio"] for p in pairs),
            "cpp_tasks_per_s": statistics.median(p["cpp"] for p in pairs),
            "cpp_map_tasks_per_s": statistics.median(p["cpp_map"] for p in pairs),
            "ratio": statistics.median(p["ratio"] for p in pairs),
            "map_ratio": statistics.median(p["map_ratio"] for p in pairs)}


def targets(rows, cpp=None, paired=None, ppe=None):
    out = []

    def add(desc, value, ok, label, fmt):
        out.append({"target": desc, "measured": fmt.format(value), "threshold": label, "passed": bool(ok)})

    if ppe:
        r = ppe["ratios"]
        for c in (1, 64):
            ratio = r[f"chunksize_{c}"]["median"]
            add(f"PPE no-op map, chunksize {c}: ringpool ctx / fork ctx", ratio, ratio >= 1.0, ">= 1.00x", "{:.2f}x")
        ratio = r["latency"]["median"]
        add("PPE submit -> result latency, median: fork ctx / ringpool ctx", ratio, ratio >= 1.0, ">= 1.00x",
            "{:.2f}x")
    if not rows:
        return out
    by = {r["pool"]: r for r in rows}
    rp = by["ringpool"]

    r1 = rp["chunksize_1"]["tasks_per_s"]
    for peer, need in (("multiprocessing.Pool", 5), ("ProcessPoolExecutor", 15)):
        ratio = r1 / by[peer]["chunksize_1"]["tasks_per_s"]
        add(f"no-op map, chunksize 1: ringpool / {peer}", ratio, ratio >= need, f">= {need}x", "{:.1f}x")
    r64 = rp["chunksize_64"]["tasks_per_s"]
    best = max((r for r in rows if r["pool"] != "ringpool"), key=lambda r: r["chunksize_64"]["tasks_per_s"])
    ratio = r64 / best["chunksize_64"]["tasks_per_s"]
    add(f"no-op map, chunksize 64: ringpool / best peer ({best['pool']})", ratio, ratio > 1.0, "> 1.00x", "{:.2f}x")
    med = rp["latency"]["median_us"]
    add("submit -> result latency, median", med, med <= 30, "<= 30 us", "{:.1f} us")
    if paired:
        ratio = paired["ratio"]
        add("no-op throughput: Executor (chunksize 1) / C++ Pool (1 thread, a future per task), side by side", ratio,
            ratio <= 1.5, "<= 1.5x", "{:.2f}x")
        ratio = paired["map_ratio"]
        add("no-op throughput: C++ Pool::map / Executor map (chunksize 1), side by side", ratio, ratio >= 1.0,
            ">= 1.00x", "{:.2f}x")
        ratio = paired["submit_ratio"]
        add("no-op throughput, a future per task: C++ Pool submit / Executor submit, side by side", ratio,
            ratio >= 1.0, ">= 1.00x", "{:.2f}x")
    return out


def markdown(res):
    m = res["machine"]
    lines = [f"### Task-pool benchmark ({m['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
             f"Python {m['python']}; {WORKERS} workers per pool; load average at start "
             f"{m['loadavg_at_start'][0]:.2f}.", "",
             "| pool | no-op map, chunksize 1 (tasks/s) | chunksize 64 (tasks/s) | latency median (us) | p99 (us) |",
             "|---|---:|---:|---:|---:|"]
    for r in res["pools"] + (res["ppe"]["rows"] if res.get("ppe") else []):
        lines.append(f"| {r['pool']} | {r['chunksize_1']['tasks_per_s']:,.0f} | {r['chunksize_64']['tasks_per_s']:,.0f}"
                     f" | {r['latency']['median_us']:.1f} | {r['latency']['p99_us']:.1f} |")
    cpp = res.get("cpp_pool")
    if cpp:
        lines += ["", "C++ `ringpool::Pool` (same workers and task): "
                  f"{cpp['threads_1']['tasks_per_s']:,.0f} tasks/s from 1 service thread, "
                  f"{cpp['threads_4']['tasks_per_s']:,.0f} from 4 (`submit`, a std::future per task); "
                  + (f"{cpp['map']['tasks_per_s']:,.0f} as one `Pool::map` from 1 thread; " if "map" in cpp else "")
                  + (f"{cpp['callbacks']['tasks_per_s']:,.0f} from 1 thread with `async_submit` callbacks; "
                     if "callbacks" in cpp else "")
                  + f"latency median {cpp['latency']['median_us']:.1f} us, p99 {cpp['latency']['p99_us']:.1f} us."]
    paired = res.get("paired")
    if paired:
        ratios = ", ".join(f"{p['ratio']:.2f}" for p in paired["pairs"])
        map_ratios = ", ".join(f"{p['map_ratio']:.2f}" for p in paired["pairs"])
        submit_ratios = ", ".join(f"{p['submit_ratio']:.1f}" for p in paired["pairs"])
        lines += ["", f"Side by side ({len(paired['pairs'])} rounds of {paired['tasks']:,} no-op tasks, "
                  f"{paired['submit_tasks']:,} for the Executor's submit, the order rotating): Executor map "
                  f"(chunksize 1) {paired['executor_tasks_per_s']:,.0f} tasks/s, with a future per task (submit) "
                  f"{paired['executor_submit_tasks_per_s']:,.0f}; C++ Pool from 1 service thread, a future per "
                  f"task, {paired['cpp_tasks_per_s']:,.0f} tasks/s, as one `Pool::map` "
                  f"{paired['cpp_map_tasks_per_s']:,.0f} tasks/s (medians). Executor map / C++ futures per round "
                  f"{ratios}; C++ map / Executor map per round {map_ratios}; C++ submit / Executor submit per round "
                  f"{submit_ratios}."]
    ppe = res.get("ppe")
    if ppe:
        per = "; ".join(f"{k.replace('_', ' ')} " + ", ".join(f"{x:.2f}" for x in v["pairs"])
                        for k, v in ppe["ratios"].items())
        lines += ["", f"PPE rows: `ProcessPoolExecutor(mp_context=...)`, the ringpool and the fork context in "
                  f"{ppe['pairs']} alternating pairs of turns, a fresh pool of each per pair; ringpool / fork per pair "
                  f"(latency: fork / ringpool, > 1 is ringpool faster): {per}."]
    lines += ["", "#### Targets", "", "| target | measured | threshold | |", "|---|---:|---:|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {t['threshold']} | {'PASS' if t['passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--only", choices=("pools", "ppe"),
                    help="only (a)+(b), or only (e) (ProcessPoolExecutor: ringpool context against fork)")
    ap.add_argument("--build", default=os.environ.get("RINGPOOL_BUILD_DIR",
                                                      str(Path(__file__).resolve().parent.parent / "build")))
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    res = {"machine": _machine.machine_info(), "quick": args.quick}
    log("task pools")
    res["only"] = args.only
    res["pools"] = run(args.quick) if args.only in (None, "pools") else []
    res["cpp_pool"] = run_cpp(args.build, args.quick) if args.only is None else None
    res["paired"] = run_paired(args.build, args.quick) if args.only is None else None
    res["ppe"] = run_ppe(args.quick) if args.only in (None, "ppe") else None
    res["targets"] = targets(res["pools"], res["cpp_pool"], res["paired"], res["ppe"])
    md = markdown(res)
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)
    suffix = ("-quick" if args.quick else "") + (f"-{args.only}" if args.only else "")
    out = Path(args.json or Path(__file__).parent / "results" / f"bench_pool{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
