"""``python -m ringpool bench``: a short benchmark of ringpool against the stdlib on this machine.

Three measures, each ringpool against the standard library in the same run (ratios matter; absolute
numbers move with the machine's load):

- queue throughput by message size: one producer process puts messages of 64 B to 1 MiB
  (``bytes``, then numpy uint8 arrays when numpy is installed), this process gets them; ``ringpool.Queue`` against ``multiprocessing.Queue`` (both producers are
  fork children);
- task pools: no-op tasks per second through ``map(chunksize=1)`` with 2 workers,
  ``ringpool.Executor`` against ``ProcessPoolExecutor`` and ``multiprocessing.Pool`` (fork);
- worker start-up: from the first ``start()`` until 2 workers answer, ringpool's zygote (running
  already, as after ``ensure_running()``) against fork and spawn.

``--quick`` takes well under a minute (one run of each, smaller counts); the default takes the
median of 3 runs. The report is Markdown on stdout, naming the machine; ``--json PATH`` writes every
number, ``--chart PATH.png`` draws the three measures (needs matplotlib). The full suite, with
DataLoader and the C++ pool, is ``./run bench`` in a checkout (benchmarks/).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

from . import __version__
from .context import get_context
from .executor import Executor
from .queues import Queue

__all__ = ["add_arguments", "draw_chart", "machine_info", "main", "run", "to_markdown"]

SIZES = (64, 4096, 65536, 1 << 20)
# Messages per size in a full run, about a second for the slower queue; --quick divides by 4.
COUNTS = {64: 100_000, 4096: 40_000, 65536: 8_000, 1 << 20: 800}
WORKERS = 2


def add_arguments(p):
    """The ``bench`` command's options."""
    p.add_argument("--quick", action="store_true", help="one short run of each (under a minute)")
    p.add_argument("--json", metavar="PATH", help="also write every number as JSON here")
    p.add_argument("--chart", metavar="PNG", help="draw the results into this PNG file (needs matplotlib)")


def machine_info():
    """What a benchmark report names: CPU, cores, memory, kernel, Python, ringpool, load average and
    date (also benchmarks/_machine.py's, for the bench_*.py scripts)."""
    cpu, mem_kib = "?", 0
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
        with open("/proc/meminfo") as f:
            mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "ringpool": __version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


# -- children (module-level: workers import them by name) ---------------------------------------
def _noop(x):
    return x


def _payload(kind, size):
    if kind == "bytes":
        return b"x" * size
    import numpy

    return numpy.full(size, 7, dtype=numpy.uint8)


def _produce(q, ready, go, kind, size, count):
    payload = _payload(kind, size)
    ready.set()
    go.wait()
    for _ in range(count):
        q.put(payload)
    q.put(None)


def _report_ready(q):
    q.put(os.getpid())


# -- measures ------------------------------------------------------------------------------------
def _queue_rate(make_queue, kind, size, count):
    """Messages per second from a fork child's puts to this process's gets (ends at the last get)."""
    import multiprocessing as mp

    fork = mp.get_context("fork")
    q = make_queue()
    ready, go = fork.Event(), fork.Event()
    p = fork.Process(target=_produce, args=(q, ready, go, kind, size, count), daemon=True)
    p.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the producer did not start within 60 s")
        t0 = time.perf_counter()
        go.set()
        n = 0
        while q.get(timeout=120) is not None:  # (an array is never None: `is not`, not `!=`)
            n += 1
        dt = time.perf_counter() - t0
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
    if n != count:
        raise RuntimeError(f"{count} messages sent, {n} received")
    return count / dt


def _pool_rate(kind, tasks):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor


    fork = mp.get_context("fork")
    if kind == "ringpool.Executor":
        pool = Executor(max_workers=WORKERS, preload=())
        run, close = (lambda n: list(pool.map(_noop, range(n)))), pool.shutdown
    elif kind == "ProcessPoolExecutor":
        pool = ProcessPoolExecutor(max_workers=WORKERS, mp_context=fork)
        run, close = (lambda n: list(pool.map(_noop, range(n)))), pool.shutdown
    else:
        pool = fork.Pool(WORKERS)
        run, close = (lambda n: pool.map(_noop, range(n), chunksize=1)), (lambda: (pool.close(), pool.join()))
    try:
        run(max(tasks // 10, 20))  # warm-up: workers started
        t0 = time.perf_counter()
        run(tasks)
        return tasks / (time.perf_counter() - t0)
    finally:
        close()


def _startup_seconds(ctx):
    q = ctx.SimpleQueue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_report_ready, args=(q,), daemon=True) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    pids = {q.get() for _ in procs}
    dt = time.perf_counter() - t0
    for p in procs:
        p.join(30)
    if pids != {p.pid for p in procs}:
        raise RuntimeError("start-up: the workers' answers do not match their pids")
    return dt


def _median(fn, runs):
    return statistics.median(fn() for _ in range(runs))


def run(quick=False, progress=None):
    """Run the three measures; returns a dict (``machine``, ``queues``, ``pools``, ``startup``)."""
    import multiprocessing as mp


    runs = 1 if quick else 3
    scale = 4 if quick else 1
    say = progress or (lambda msg: None)
    res = {"machine": machine_info(), "quick": quick, "runs": runs, "workers": WORKERS,
           "queues": [], "pools": [], "startup": []}
    fork = mp.get_context("fork")
    try:
        import numpy  # noqa: F401
        kinds = ("bytes", "numpy")
    except ImportError:
        kinds = ("bytes",)
    for kind in kinds:
        for size in SIZES:
            # numpy arrays pickle slower when small: fewer of them, for a similar time
            count = max(COUNTS[size] // scale // (4 if kind == "numpy" and size < 65536 else 1), 50)
            row = {"payload": kind, "size": size, "messages": count}
            for name, make in (("ringpool.Queue", Queue), ("multiprocessing.Queue", fork.Queue)):
                say(f"queue {name}, {kind} of {size} B x {count}")
                row[name] = _median(lambda: _queue_rate(make, kind, size, count), runs)
            res["queues"].append(row)
    for kind, tasks in (("ringpool.Executor", 200_000), ("multiprocessing.Pool", 20_000),
                        ("ProcessPoolExecutor", 4_000)):
        n = max(tasks // scale, 100)
        say(f"pool {kind}, {n} tasks")
        res["pools"].append({"pool": kind, "tasks": n, "tasks_per_s": _median(lambda: _pool_rate(kind, n), runs)})
    ctx = get_context(preload=())
    ctx.ensure_running()
    for name, c in (("ringpool", ctx), ("fork", fork), ("spawn", mp.get_context("spawn"))):
        say(f"start-up {name}")
        _startup_seconds(c)  # warm-up (the first spawn also pays for the resource tracker)
        res["startup"].append({"method": name, "seconds": _median(lambda: _startup_seconds(c), runs)})
    return res


# -- report --------------------------------------------------------------------------------------
def _size(n):
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1024 else f"{n} B"


def to_markdown(res):
    """The report: the machine, then one table per measure with ringpool's ratio to the stdlib."""
    m = res["machine"]
    out = [f"ringpool {m['ringpool']} bench{' --quick' if res['quick'] else ''}, {m['date']}: {m['cpu']}, "
           f"{m['usable_cores']} usable cores, {m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}, "
           f"load average {m['loadavg_at_start'][0]} at start; median of {res['runs']} run(s)", ""]
    out += ["| queue, 1 producer -> 1 consumer | ringpool.Queue msgs/s | multiprocessing.Queue msgs/s | ratio |",
            "|---|---:|---:|---:|"]
    for r in res["queues"]:
        a, b = r["ringpool.Queue"], r["multiprocessing.Queue"]
        what = "`bytes`" if r["payload"] == "bytes" else "numpy arrays"
        out.append(f"| {what} of {_size(r['size'])} | {a:,.0f} | {b:,.0f} | {a / b:.1f}x |")
    best = res["pools"][0]["tasks_per_s"]
    out += ["", f"| pool, {res['workers']} workers, no-op `map(chunksize=1)` | tasks/s | ringpool.Executor / this |",
            "|---|---:|---:|"]
    for r in res["pools"]:
        out.append(f"| {r['pool']} | {r['tasks_per_s']:,.0f} | {best / r['tasks_per_s']:.1f}x |")
    rp = res["startup"][0]["seconds"]
    out += ["", f"| start-up: first `start()` until {res['workers']} workers answer | ms | this / ringpool |",
            "|---|---:|---:|"]
    for r in res["startup"]:
        out.append(f"| {r['method']} | {r['seconds'] * 1e3:.1f} | {r['seconds'] / rp:.1f}x |")
    return "\n".join(out) + "\n"


def draw_chart(res, path):
    """Write the three measures as one PNG (matplotlib's Agg backend; ImportError without it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.6))
    sizes = sorted({r["size"] for r in res["queues"]})
    for kind, marker in (("bytes", "o"), ("numpy", "s")):
        rows = [r for r in res["queues"] if r["payload"] == kind]
        for name, color, line in (("ringpool.Queue", "tab:blue", "-"), ("multiprocessing.Queue", "tab:orange", "--")):
            if rows:
                ax1.plot([r["size"] for r in rows], [r[name] * r["size"] / 1e6 for r in rows], marker + line,
                         color=color, label=f"{name}, {'bytes' if kind == 'bytes' else 'numpy arrays'}",
                         alpha=1.0 if kind == "bytes" else 0.6)
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xticks(sizes, [_size(s) for s in sizes])
    ax1.set_xlabel("message size")
    ax1.set_ylabel("MB/s (log)")
    ax1.set_title("Queue throughput, 1 producer -> 1 consumer")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)

    names = [r["pool"] for r in res["pools"]]
    rates = [r["tasks_per_s"] for r in res["pools"]]
    bars = ax2.bar(range(len(names)), rates, color=["tab:blue"] + ["tab:gray"] * (len(names) - 1))
    ax2.set_xticks(range(len(names)), [n.replace(".", ".\n", 1) for n in names])
    ax2.set_yscale("log")
    ax2.set_ylabel("tasks/s (log)")
    ax2.set_title(f"No-op tasks, map(chunksize=1), {res['workers']} workers")
    ax2.bar_label(bars, [f"{r:,.0f}" for r in rates])

    methods = [r["method"] for r in res["startup"]]
    ms = [r["seconds"] * 1e3 for r in res["startup"]]
    bars = ax3.bar(methods, ms, color=["tab:blue"] + ["tab:gray"] * (len(methods) - 1))
    ax3.set_ylabel("ms")
    ax3.set_title(f"Start-up of {res['workers']} workers")
    ax3.bar_label(bars, [f"{v:.1f}" for v in ms])

    m = res["machine"]
    fig.suptitle(f"ringpool bench{' --quick' if res['quick'] else ''}, {m['date']}: {m['cpu']}, "
                 f"{m['usable_cores']} cores, Linux {m['kernel']}, Python {m['python']}, "
                 f"load average {m['loadavg_at_start'][0]} at start", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args):
    """Run the benchmark, print the report, write the JSON and chart if asked; exit code 0."""
    def progress(msg):
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    if args.chart:
        try:
            import matplotlib  # noqa: F401  (fail before the run, not after it)
        except ImportError:
            print("--chart needs matplotlib (Debian: apt-get install python3-matplotlib)", file=sys.stderr)
            return 2
    t0 = time.monotonic()
    res = run(quick=args.quick, progress=progress)
    res["wall_seconds"] = round(time.monotonic() - t0, 1)
    print(to_markdown(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.chart:
        draw_chart(res, args.chart)
        progress(f"chart written to {args.chart}")
    return 0
