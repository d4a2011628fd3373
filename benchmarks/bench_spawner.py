#!/usr/bin/python3
"""Spawner benchmark: worker start-up and DataLoader throughput, ringpool against the stdlib.

In one run, on this machine:

(a) Start-up: the time from the first ``start()`` of N = 1, 2, 4 workers whose target imports
    torch until all N have reported ready (each puts its pid on the context's SimpleQueue), for
    fork, spawn, forkserver (``set_forkserver_preload(["torch", "numpy"])``, server already
    running) and ringpool (``get_context(preload=["torch", "numpy"])``, zygote already running
    with its default spares), and ringpool's default context (``ringpool-auto``:
    ``get_context()`` with no preload argument, so its zygote preloads what this process has
    imported), with a bare ``os.fork()`` of the same parent (the child writes one
    byte to a pipe) as the limit. This process has imported torch, as a training script has.
    Median of several repetitions, each after the same 0.3 s pause; the workers are joined outside
    the timed window.

(b) DataLoader: samples/s over whole epochs (median of 3 epochs, each with a fresh iterator, so
    worker start-up is included, as in a real epoch without persistent workers) and the time to
    the first batch, with num_workers 2 and 4, for fork, spawn, forkserver, ringpool and
    ringpool-auto, on three
    map-style datasets whose samples are made in __getitem__:
      small:  torch.randn(64) and an int label, batch 256
      images: uint8 3x224x224 from numpy (torch.from_numpy), batch 32
      numpy:  float32 3x64x64 numpy arrays, batch 64 (collated into tensors)
    The main process reads the last element of every sample, so mapped memory is really touched.

Targets (ratios in the same run): (a) 4 workers ready no slower than fork and >= 20x faster than
spawn, for ringpool and ringpool-auto; (b) time to first batch no worse than fork; throughput
>= 1.5x fork on small and numpy, >= 1.3x fork on images; ringpool-auto never slower than fork.

    /usr/bin/python3 benchmarks/bench_spawner.py [--quick] [--only startup|dataloader]
        [--datasets small,images,numpy] [--workers 2,4] [--startup-workers 1,2,4]
        [--methods fork,spawn,forkserver,ringpool,ringpool-auto] [--epochs N] [--json PATH]
        [--markdown PATH]

--methods applies to both parts (os.fork, the limit, is always in (a)). The default context's
rows alone, quickly:

    bench_spawner.py --only startup --startup-workers 4 --methods fork,forkserver,ringpool-auto
    bench_spawner.py --only dataloader --datasets small --workers 4 --methods fork,ringpool-auto
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

try:
    import ringpool
except ImportError:  # run from a checkout: use the in-tree package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bindings"))
    import ringpool

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine  # noqa: E402
from torch.utils.data import DataLoader, Dataset

METHODS = ("fork", "spawn", "forkserver", "ringpool", "ringpool-auto")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# -- contexts ------------------------------------------------------------------------------------

_contexts = {}


def context(method):
    """The context for a method, warmed up (forkserver running, ringpool zygote preloaded)."""
    if method in _contexts:
        return _contexts[method]
    if method.startswith("ringpool"):
        # ringpool-auto: the default context, as a user who does not know about preload gets it
        # (its zygote preloads what this process has imported: torch, numpy, DataLoader, ...).
        ctx = ringpool.get_context(preload=["torch", "numpy"]) if method == "ringpool" else ringpool.get_context()
        ctx.ensure_running()
    else:
        ctx = mp.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload(["torch", "numpy"])
            p = ctx.Process(target=_noop)
            p.start()
            p.join()
    time.sleep(1.0)  # let the server settle (ringpool: its spare workers are forked by now)
    _contexts[method] = ctx
    return ctx


def _noop():
    pass


# -- (a) start-up --------------------------------------------------------------------------------

def _ready(q):
    import torch  # noqa: F401  (already imported under fork and in the preloaded servers)

    q.put(os.getpid())


def startup_once(method, n):
    if method == "os.fork":
        r, w = os.pipe()
        t0 = time.perf_counter()
        pids = []
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                os.write(w, b"x")
                os._exit(0)
            pids.append(pid)
        got = 0
        while got < n:
            got += len(os.read(r, n))
        dt = time.perf_counter() - t0
        for pid in pids:
            os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
        return dt
    ctx = context(method)
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_ready, args=(q,)) for _ in range(n)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    pids = {q.get() for _ in range(n)}
    dt = time.perf_counter() - t0
    for p in procs:
        p.join(120)
    assert pids == {p.pid for p in procs}
    q.close()
    time.sleep(0.3)  # every method gets the same quiet moment between runs
    return dt


def bench_startup(reps, spawn_reps, counts=(1, 2, 4), methods=METHODS):
    rows = []
    for n in counts:
        for method in ("os.fork", *methods):
            k = spawn_reps if method == "spawn" else reps
            times = [startup_once(method, n) for _ in range(k)]
            rows.append({"method": method, "workers": n, "median_s": statistics.median(times),
                         "min_s": min(times), "max_s": max(times), "runs": times})
            log(f"  startup {method:10s} N={n}: {statistics.median(times) * 1e3:9.1f} ms")
    return rows


# -- (b) DataLoader ------------------------------------------------------------------------------

# Samples are made in __getitem__ (deterministically from the index), so the dataset object is a
# few bytes: under spawn, forkserver and ringpool it is pickled to every worker, and a dataset of
# stored tensors would carry one shared-memory descriptor per sample.

class GeneratedDataset(Dataset):
    """n samples of one kind, made in __getitem__: ``small`` (``torch.randn(64)``, from the worker's
    seeded generator), ``images`` (uint8 3x224x224 from numpy, from the index), ``numpy`` (a float32
    3x64x64 array, from the index); label = index."""

    def __init__(self, kind, n):
        self.kind, self.n = kind, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.kind == "small":
            return torch.randn(64), i
        if self.kind == "images":
            return torch.from_numpy(np.full((3, 224, 224), i % 251, dtype=np.uint8)), i
        return np.full((3, 64, 64), float(i), dtype=np.float32), i


DATASETS = {
    # name: (samples per epoch, quick samples, batch size)
    "small": (256 * 160, 256 * 40, 256),
    "images": (32 * 60, 32 * 16, 32),
    "numpy": (64 * 120, 64 * 30, 64),
}


def epoch(ds, batch, workers, ctx):
    dl = DataLoader(ds, batch_size=batch, num_workers=workers, multiprocessing_context=ctx)
    t0 = time.perf_counter()
    first = None
    seen = 0
    check = 0.0
    for x, y in dl:
        if first is None:
            first = time.perf_counter() - t0
        check += float(x.reshape(len(y), -1)[:, -1].sum())  # read every sample's memory
        seen += len(y)
    dt = time.perf_counter() - t0
    del dl
    assert seen == len(ds)
    return seen / dt, first


def bench_dataloader(quick, epochs, datasets=tuple(DATASETS), worker_counts=(2, 4), methods=METHODS):
    rows = []
    for name in datasets:
        n, nq, batch = DATASETS[name]
        ds = GeneratedDataset(name, nq if quick else n)
        for workers in worker_counts:
            runs = {m: [] for m in methods}
            for _ in range(epochs):  # interleaved: the machine's drift touches every method alike
                for m in methods:
                    runs[m].append(epoch(ds, batch, workers, context(m)))
            for m in methods:
                rates = [r for r, _ in runs[m]]
                firsts = [f for _, f in runs[m]]
                rows.append({"dataset": name, "workers": workers, "method": m, "batch": batch, "samples": len(ds),
                             "samples_per_s": statistics.median(rates), "first_batch_s": statistics.median(firsts),
                             "runs": runs[m]})
                log(f"  dataloader {name:6s} w={workers} {m:10s}: {statistics.median(rates):10.0f} samples/s, "
                    f"first batch {statistics.median(firsts) * 1e3:7.1f} ms")
        del ds
    return rows


# -- report --------------------------------------------------------------------------------------

def machine_info():
    return {**_machine.machine_info(), "torch": torch.__version__}


def _get(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def targets(res):
    out = []

    def add(desc, value, ok, label, fmt):
        out.append({"target": desc, "measured": fmt.format(value), "threshold": label, "passed": bool(ok)})

    st = res.get("startup")
    if st:
        fk, sp = _get(st, method="fork", workers=4), _get(st, method="spawn", workers=4)
        for m in ("ringpool", "ringpool-auto"):
            rp = _get(st, method=m, workers=4)
            if rp is None:  # not measured in this run (--methods/--startup-workers)
                continue
            if fk is not None:
                add(f"start-up, 4 workers: {m} / fork time", rp["median_s"] / fk["median_s"],
                    rp["median_s"] <= fk["median_s"], "<= 1.00x", "{:.2f}x")
            if sp is not None:
                add(f"start-up, 4 workers: spawn / {m} time", sp["median_s"] / rp["median_s"],
                    sp["median_s"] / rp["median_s"] >= 20, ">= 20x", "{:.1f}x")
    dl = res.get("dataloader")
    if dl:
        for name, need in (("small", 1.5), ("numpy", 1.5), ("images", 1.3)):
            for w in (2, 4):
                rp, fk = _get(dl, dataset=name, workers=w, method="ringpool"), _get(dl, dataset=name, workers=w, method="fork")
                if rp is None or fk is None:  # not measured in this run (--datasets/--workers/--methods)
                    continue
                ratio = rp["samples_per_s"] / fk["samples_per_s"]
                add(f"DataLoader {name}, {w} workers: ringpool / fork samples/s", ratio, ratio >= need,
                    f">= {need}x", "{:.2f}x")
                add(f"DataLoader {name}, {w} workers: ringpool / fork time to first batch",
                    rp["first_batch_s"] / fk["first_batch_s"], rp["first_batch_s"] <= fk["first_batch_s"],
                    "<= 1.00x", "{:.2f}x")
        for name in DATASETS:
            for w in (2, 4):
                ra, fk = _get(dl, dataset=name, workers=w, method="ringpool-auto"), _get(dl, dataset=name, workers=w, method="fork")
                if ra is None or fk is None:
                    continue
                ratio = ra["samples_per_s"] / fk["samples_per_s"]
                add(f"DataLoader {name}, {w} workers: ringpool-auto (default context) / fork samples/s", ratio,
                    ratio >= 1.0, ">= 1.0x", "{:.2f}x")
    return out


def markdown(res):
    m = res["machine"]
    lines = [f"### Spawner benchmark ({m['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
             f"Python {m['python']}, torch {m['torch']}; load average at start {m['loadavg_at_start'][0]:.2f}.", ""]
    if res.get("startup"):
        counts = sorted({r["workers"] for r in res["startup"]})
        lines += ["#### (a) Start-up: first start() until N workers that import torch report ready (median ms)", "",
                  "| method | " + " | ".join(f"N={n}" for n in counts) + " |", "|---|" + "---:|" * len(counts)]
        for method in ("os.fork", *METHODS):
            got = [_get(res["startup"], method=method, workers=n) for n in counts]
            if all(r is None for r in got):
                continue
            cells = [f"{r['median_s'] * 1e3:.1f}" if r else "-" for r in got]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if res.get("dataloader"):
        lines += ["#### (b) DataLoader: samples/s over whole epochs (median of 3), time to first batch", "",
                  "| dataset | workers | " + " | ".join(METHODS) + " | ringpool / fork | ringpool-auto / fork |",
                  "|---|---:|" + "---:|" * (len(METHODS) + 2)]
        for name in DATASETS:
            for w in (2, 4):
                rows = {mm: _get(res["dataloader"], dataset=name, workers=w, method=mm) for mm in METHODS}
                if all(r is None for r in rows.values()):
                    continue
                cells = [f"{rows[mm]['samples_per_s']:,.0f} ({rows[mm]['first_batch_s'] * 1e3:.0f} ms)"
                         if rows[mm] else "-" for mm in METHODS]
                ratios = [f"{rows[mm]['samples_per_s'] / rows['fork']['samples_per_s']:.2f}x"
                          if rows[mm] and rows["fork"] else "-" for mm in ("ringpool", "ringpool-auto")]
                lines.append(f"| {name} | {w} | " + " | ".join(cells + ratios) + " |")
        lines.append("")
    lines += ["#### Targets", "", "| target | measured | threshold | |", "|---|---:|---:|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {t['threshold']} | {'PASS' if t['passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller epochs")
    ap.add_argument("--only", choices=["startup", "dataloader"])
    ap.add_argument("--datasets", default=",".join(DATASETS),
                    help="DataLoader datasets, comma-separated (default: all: %(default)s)")
    ap.add_argument("--workers", default="2,4", help="DataLoader num_workers values (default: %(default)s)")
    ap.add_argument("--startup-workers", default="1,2,4", help="start-up worker counts (default: %(default)s)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="start methods, for both parts (default: all: %(default)s)")
    ap.add_argument("--epochs", type=int, help="DataLoader epochs per row (default: 3, 1 with --quick)")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    res = {"machine": machine_info(), "quick": args.quick}
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} (choose from {', '.join(METHODS)})")
    if args.only in (None, "startup"):
        log("(a) start-up")
        res["startup"] = bench_startup(3 if args.quick else 7, 1 if args.quick else 3,
                                       [int(n) for n in args.startup_workers.split(",") if n], methods)
    if args.only in (None, "dataloader"):
        log("(b) DataLoader")
        datasets = [d for d in args.datasets.split(",") if d]
        for d in datasets:
            if d not in DATASETS:
                ap.error(f"unknown dataset {d!r} (choose from {', '.join(DATASETS)})")
        res["dataloader"] = bench_dataloader(args.quick, args.epochs or (1 if args.quick else 3), datasets,
                                             [int(w) for w in args.workers.split(",") if w], methods)
    res["targets"] = targets(res)
    md = markdown(res)
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)
    out = Path(args.json or Path(__file__).parent / "results" / f"bench_spawner{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
