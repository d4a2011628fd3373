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


def forge_error(payload):
    """Answers its own task with an ERR record whose value is `payload` instead of the
    (type, message, traceback) strs a C++ Pool worker sends (a broken worker), then returns 0,
    whose record the pool must find answering nothing. Finds the worker loop's own `put` and the
    task's id in its caller's frame."""
    import sys

    err = sys.modules["ringpool._core"].task.ERR  # (not imported by name: a bundle of rp_tasks has no ringpool)
    f = sys._getframe(1)
    while f is not None and not ("put" in f.f_locals and "tid" in f.f_locals and "wid" in f.f_locals):
        f = f.f_back
    if f is None:
        raise RuntimeError("forge_error: the worker loop's frame was not found")
    loc = f.f_locals
    loc["put"]((loc["wid"], loc["tid"], err, payload, 0.0))
    return 0


def big_bytes(n):
    """n bytes of b"z": a result large enough to travel out of band (a memfd) from a small call."""
    return b"z" * n


def map_probe(x):
    """For Pool::map's error order: "fail-slow" fails after 0.3 s, "fail" at once, else x."""
    if x == "fail-slow":
        time.sleep(0.3)
        raise ValueError(x)
    if x == "fail":
        raise ValueError(x)
    return x


def shape(kind):
    """Results the worker's plain encoder declines (put_plain), plain or not: see test_pool.cpp."""
    if kind == "shared":
        x = [1, 2]
        return [x, x, {"k": x}]
    if kind == "deep":
        v = 0
        for _ in range(20):
            v = [v]
        return v
    if kind == "many":
        return [[i] for i in range(200)]
    if kind == "bytearray":
        return bytearray(b"ab")
    if kind == "memoryview":
        return memoryview(b"cd")
    if kind == "surrogate":
        return "\udc80"
    if kind == "nested-object":
        return [1, {"k": (2, object())}]
    raise ValueError(kind)
