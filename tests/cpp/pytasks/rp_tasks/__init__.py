"""Task functions the C++ Pool tests call (shipped to the workers as a registered package)."""
import os
import signal
import time


def echo(x):
    return x


def add(a, b=0, *, c=0):
    return a + b + c


def pid():
    return os.getpid()


def sleep_pid(t):
    time.sleep(t)
    return os.getpid()


def boom(msg):
    raise ValueError(msg)


def die(how="kill"):
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


def not_plain():
    return object()


def upper(payload):
    return bytes(payload).upper()


def deferred():
    from rp_tasks import helpers  # imported inside the worker, from the shipped sources

    return helpers.where()


def die_at(i, k):
    """Returns i, unless i == k: then the worker running it is SIGKILLed."""
    if i == k:
        os.kill(os.getpid(), signal.SIGKILL)
    return i
