"""ringpool.Executor: a concurrent.futures pool over shared-memory rings (audience: task pools).

Run: python examples/python/executor_map.py [--progress]

Tiny tasks are where process pools usually lose to their own overhead; ringpool.Executor sends
them many to a record and reads results without a thread hand-off. A worker that dies fails only
the task it was running.
"""
import os
import sys
import time

import ringpool


def score(x):
    return (x * 2654435761) % 1000


def crash():
    os._exit(3)  # as a segfault in a C extension would: the worker is gone


def main():
    progress = "--progress" in sys.argv  # a tqdm bar (needs tqdm)
    with ringpool.Executor(max_workers=2) as ex:
        t0 = time.perf_counter()
        scores = list(ex.map(score, range(200_000), progress=progress))
        dt = time.perf_counter() - t0
        print(f"map: {len(scores)} tasks, sum {sum(scores)}, {len(scores) / dt:,.0f} tasks/s")

        print("submit:", ex.submit(pow, 2, 10).result(timeout=60))

        # imap_unordered reads its input lazily (a bounded number of tasks in flight), so the
        # input may be a generator far larger than memory; results come in completion order
        lines = (f"line {i}" for i in range(50_000))
        total = sum(ex.imap_unordered(len, lines, chunksize=64))
        print("imap_unordered: total length", total)

        try:
            ex.submit(crash).result(timeout=60)
        except ringpool.WorkerDied as e:
            print("a worker died:", type(e).__name__)
        print("the pool goes on:", ex.submit(score, 7).result(timeout=60))


if __name__ == "__main__":
    main()
