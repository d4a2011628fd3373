"""Functions the example JSON service dispatches (a package shipped to the workers by the pool)."""
import os
import time


def word_count(text):
    from textjobs.counting import count  # a deferred import, served from the shipped sources

    return count(text)


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def slow(seconds):
    time.sleep(seconds)
    return os.getpid()


def size(items, seconds=0):
    """len(items), after `seconds`: a request that carries data and holds a worker a while."""
    time.sleep(seconds)
    return len(items)


def pid():
    return os.getpid()


def fail(message):
    raise ValueError(message)
