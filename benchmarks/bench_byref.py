#!/usr/bin/python3
"""By-reference pickling benchmark: what the hybrid pickler costs for importable code.

Classes and functions that workers import by name are pickled by reference; the hybrid pickler
decides that once per object and pickler (then remembers it), and since hand-imported packages
are shipped, also checks once per top-level module that a worker can import it. This measures the
paths that decision sits on, with a small module written to a temp dir that is on sys.path
(importable: nothing is registered):

- ``dumps Point msg``: ``ringpool.reduction.dumps((i, Point(i, 2.0)))``, the thread's cached
  pickler (the class is a remembered hit);
- ``dumps 64 functions``: ``dumps`` of a list of 64 distinct importable functions;
- ``queue put+get``: one ``ringpool.Queue`` put then get of the Point message, in one process;
- ``fresh pickler``: ``reduction.dump`` of 64 functions and a Point with a new Pickler each time
  (process start's path: every object is a first sight).

Each row: median over ``--rounds`` rounds of the mean time per operation (µs). To compare two
versions of ringpool, run the script under each (``PYTHONPATH=<bindings>``), alternating, and
compare medians; the machine is shared, so use several runs.

    /usr/bin/python3 benchmarks/bench_byref.py [--rounds N] [--json PATH]
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

try:
    import ringpool
except ImportError:  # run from a checkout: use the in-tree package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bindings"))
    import ringpool

from ringpool import reduction  # noqa: E402

NFUNC = 64
SOURCE = "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n\n" + "".join(
    f"def f{i}(x):\n    return x + {i}\n\n" for i in range(NFUNC))


def per_op(fn, n, rounds):
    """Median over rounds of the mean seconds per call of fn() (n calls per round)."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "rp_bench_byref.py").write_text(textwrap.dedent(SOURCE))
        sys.path.insert(0, tmp)
        import rp_bench_byref as m

        funcs = [getattr(m, f"f{i}") for i in range(NFUNC)]
        msg = (7, m.Point(7, 2.0))
        dumps = reduction.dumps
        q = ringpool.Queue()
        put, get = q.put, q.get

        def queue_rt():
            put(msg)
            get(timeout=10)

        def fresh():
            reduction.dump([msg, funcs], io.BytesIO())

        rows = {
            "dumps Point msg": per_op(lambda: dumps(msg), 20000, args.rounds),
            f"dumps {NFUNC} functions": per_op(lambda: dumps(funcs), 5000, args.rounds),
            "queue put+get": per_op(queue_rt, 10000, args.rounds),
            "fresh pickler": per_op(fresh, 1000, args.rounds),
        }
        q.close()
    print(f"| path ({ringpool.__file__}) | µs/op |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v * 1e6:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v * 1e6 for k, v in rows.items()}))


if __name__ == "__main__":
    main()
