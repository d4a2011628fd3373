"""The stdlib's pools on ringpool workers (audience: ProcessPoolExecutor / multiprocessing users).

Run: python examples/python/process_pool.py

ringpool.get_context() is a multiprocessing context: pass it where the stdlib takes one and
nothing else in the program changes. Workers are forked from a preloaded zygote, so they start
fast like fork's, but from this process's state at start() like spawn's (no inherited threads or
locks).
"""
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import ringpool


def is_prime(n):
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def count_primes(lo, hi):
    return sum(map(is_prime, range(lo, hi)))


def main():
    ctx = ringpool.get_context()

    # concurrent.futures: the same code as with mp_context=multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        chunks = [(lo, lo + 10_000) for lo in range(0, 100_000, 10_000)]
        counts = list(pool.map(count_primes, *zip(*chunks)))
    print(f"ProcessPoolExecutor: {sum(counts)} primes below 100000")

    # multiprocessing.Pool, and a plain Process with a Queue, from the same context
    with ctx.Pool(2) as pool:
        print("Pool.map:", pool.map(is_prime, [2, 15, 17, 21, 23]))
    q = ctx.Queue()  # ringpool's shared-memory queue
    p = ctx.Process(target=q.put, args=(("from a worker", count_primes(0, 1000)),))
    p.start()
    print("Process + Queue:", q.get(timeout=60))
    p.join()
    print("exit code:", p.exitcode)

    # or, process-wide: multiprocessing.set_start_method("ringpool")
    print("start method:", multiprocessing.get_context("ringpool").get_start_method())


if __name__ == "__main__":
    ringpool.register_start_method()  # needed only from a checkout: an installed ringpool has it
    main()
