"""joblib's Parallel on ringpool workers (audience: joblib and scikit-learn style code).

Run: python examples/python/joblib_backend.py

`import ringpool.joblib` registers the backend "ringpool"; everything else is plain joblib.
"""
import math

from joblib import Parallel, delayed, parallel_backend

import ringpool.joblib  # noqa: F401  (registers the "ringpool" backend)


def collatz_steps(n):
    steps = 0
    while n != 1:
        n = 3 * n + 1 if n % 2 else n // 2
        steps += 1
    return steps


def checked_sqrt(x):
    if x < 0:
        raise ValueError(f"negative input {x}")
    return math.sqrt(x)


def main():
    steps = Parallel(n_jobs=2, backend="ringpool")(delayed(collatz_steps)(n) for n in range(1, 20_001))
    best = max(range(len(steps)), key=steps.__getitem__) + 1
    print(f"longest Collatz chain below 20001: {best} ({steps[best - 1]} steps)")

    # Executor options through parallel_backend: here a per-task time limit
    with parallel_backend("ringpool", n_jobs=2, task_timeout=60):
        roots = Parallel()(delayed(checked_sqrt)(x) for x in (1, 4, 9))
    print("roots:", roots)

    try:
        Parallel(n_jobs=2, backend="ringpool")(delayed(checked_sqrt)(x) for x in (1, -4, 9))
    except ValueError as e:
        print("error from a worker:", e)


if __name__ == "__main__":
    main()
