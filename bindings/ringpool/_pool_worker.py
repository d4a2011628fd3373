"""The worker loop of the task pools, ``ringpool.Executor``'s and the C++ ``ringpool::Pool``'s.

    call ring (this worker's) ──► serve: take up to WORKER_TAKE records, run each call in order,
                                         put each result at once ──► the pool's result ring

- ``serve_executor``: the target of an Executor's worker ``Process`` (the channels arrive as
  ``ChannelRef`` arguments, their descriptors carried by the process object).
- ``serve_pool``: a worker of the C++ Pool, started by ``ringpool._worker.run`` when the first
  frame on its boot channel is a plain configuration instead of a process object; it only ever
  sees plain data (``plain=True``: results go out through ``put_plain``, in C, and what that
  declines is made plain or refused by ``_checked``; errors travel as ``(type name, message,
  traceback)``).

This is the first task code of every pool worker, so it imports nothing of the parent side
(``executor``, ``context``, ``popen``, ...): a test (tests/python/test_imports.py) holds it to
that. (Python runs ``ringpool/__init__`` before any submodule, and that imports the public API,
the Executor included: in a worker those modules are loaded, though nothing here uses them.)
The records it reads and writes are proto/include/ringpool/proto/task.hpp's, through
``_core.task``.
"""
from __future__ import annotations

import importlib
import pickle
import sys
import time
import traceback
from multiprocessing.reduction import DupFd

from . import _core
from . import modules
from .bundle import _install_environment

__all__ = ["ChannelRef", "serve_executor", "serve_pool", "serve"]

_task = _core.task
_CALL, _CHUNK, _PING, _STOP, _RUN = _task.CALL, _task.CHUNK, _task.PING, _task.STOP, _task.RUN
_OK, _ERR, _STARTED, _PONG, _INIT_FAILED = _task.OK, _task.ERR, _task.STARTED, _task.PONG, _task.INIT_FAILED
_SINGLE = _task.SINGLE
_RESULT_ELAPSED = _task.RESULT_ELAPSED
# Records are read by unpacking and written as tuple displays (an index lookup or an accessor call
# per record would cost more than the rest of a no-op task's bookkeeping), so in task.hpp's field
# order: a header whose order differs fails here, at import (ringpool.executor, which writes and
# reads the same tuples, imports this module).
if (_task.CALL_FIELDS != ("op", "tid", "fn", "args", "kwargs")
        or _task.RESULT_FIELDS != ("wid", "tid", "status", "value", "elapsed")
        or (_task.ERROR_TYPE, _task.ERROR_MESSAGE, _task.ERROR_TRACEBACK) != (0, 1, 2)):
    raise ImportError(f"ringpool._core's task records ({_task.CALL_FIELDS}, {_task.RESULT_FIELDS}) are not "
                      f"the ones ringpool's worker loop writes: rebuild the extension")
# A result that does not fit in the result ring's free space waits for the parent to read; it
# checks again at least this often (seconds), should a wake-up be missed.
_PUT_RETRY = 0.05


class ChannelRef:
    """A channel as a Process argument: its descriptors travel with the process object."""

    __slots__ = ("chan",)

    def __init__(self, chan):
        self.chan = chan

    def __reduce__(self):
        return (_attach_channel, (tuple(DupFd(fd) for fd in self.chan.handles()),))


def _attach_channel(tokens):
    return ChannelRef(_core.Channel.attach(*(t.detach() for t in tokens)))


def _resolve(spec):
    """'package.module:qualname' -> the object."""
    mod, sep, qual = spec.partition(":")
    if not sep or not mod or not qual:
        raise ValueError(f"a task function given as a string must read 'module:qualname', not {spec!r}")
    obj = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _error_payload(exc):
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickle.dumps(exc)
    except Exception as perr:
        exc = RuntimeError(f"{type(exc).__qualname__}: {exc} (the exception itself could not be pickled: {perr})")
    return (exc, tb)


class _FunctionTable(dict):
    def __missing__(self, fid):
        raise LookupError(f"task function #{fid} is unknown in this worker: the call that carried it did not "
                          f"unpickle here (see that task's error)")


def serve_executor(wid, calls_ref, results_ref, initializer, initargs, max_tasks, report_start):
    """The target of an Executor's worker Process."""
    calls, results = calls_ref.chan, results_ref.chan
    del calls_ref, results_ref
    serve(wid, calls, results, initializer, initargs, max_tasks, report_start, False)


def serve_pool(config, calls, results):
    """A worker of the C++ ``ringpool::Pool`` (started by ``_worker.run`` when its first frame is a
    plain configuration): calls and results are plain data only. Returns the exit code."""
    undumpable()
    for p in reversed(config.get("sys_path_prepend") or ()):
        if p not in sys.path:
            sys.path.insert(0, p)
    if config.get("bundle_file"):  # a no-op when the zygote installed it already
        with open(config["bundle_file"], "rb") as f:
            _install_environment(config["bundle_file"], f.read())
    for pkg in config.get("packages") or ():
        modules.install(modules.Snapshot(pkg["name"], pkg["root"], pkg["files"]))
    serve(config["wid"], calls, results, None, (), config.get("max_tasks"), bool(config.get("report_start")), True,
          config.get("max_result_bytes") or 0)
    return 0


def undumpable():
    """PR_SET_DUMPABLE 0, before any task runs: another worker (same user) can then neither open
    this one's descriptors through /proc/<pid>/fd (its rings' memfds: forged answers) nor ptrace
    it or write /proc/<pid>/mem (docs/design/security.md, "Same user"). The C++ Pool's zygote
    calls it too, once configured (so its workers are not dumpable from their fork on)."""
    import ctypes  # only here: prctl has no binding, and only C++ Pool workers need it

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")


_PLAIN_SCALARS = (type(None), bool, float, str, bytes)
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _plain_problem(v, depth=0):
    """Why v is not plain data the C++ codec reads (None when it is)."""
    t = type(v)
    if t is int:
        return None if _INT64[0] <= v <= _INT64[1] else f"the int {v} does not fit in 64 bits"
    if t is str:
        if not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return "a str that is not valid UTF-8 (lone surrogates)"
        return None
    if t in _PLAIN_SCALARS:
        return None
    if depth >= 100:
        return "nesting deeper than 100"
    if t is list or t is tuple:
        for x in v:
            why = _plain_problem(x, depth + 1)
            if why:
                return why
        return None
    if t is dict:
        for k, x in v.items():
            if type(k) in (list, dict):
                return "an unhashable dict key"
            why = _plain_problem(k, depth + 1) or _plain_problem(x, depth + 1)
            if why:
                return why
        return None
    return f"a value of type {t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else \
        f"a value of type {t.__qualname__}"


def _checked(rec):
    """A C++ Pool worker's record that the plain encoder declined (put_plain): its value made plain
    (a bytearray or memoryview as bytes) or, if it is not plain data, an ERR record of the
    TypeError saying why. The encoder writes what is plain and shallow, so only values it declines
    pay for this walk (a list shared twice, nesting deeper than it goes, a big int, ...)."""
    wid, tid, status, value, elapsed = rec
    if status != _OK:
        return rec
    if type(value) is bytearray or type(value) is memoryview:
        value = bytes(value)
    why = _plain_problem(value)
    if why:
        return (wid, tid, _ERR, _plain_error(TypeError(
            f"the task returned {why}; a ringpool::Pool task must return plain data (None, bool, int, float, str, "
            f"bytes, list, tuple, dict)")), elapsed)
    return (wid, tid, _OK, value, elapsed)


def _plain_error(exc):
    t = type(exc)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    tb = "".join(traceback.format_exception(t, exc, exc.__traceback__))
    return (name, str(exc), tb)


def serve(wid, calls, results, initializer, initargs, max_tasks, report_start, plain, max_result=0):
    """A worker's loop: one call at a time, each result published before the next call is taken.
    plain: the C++ Pool's worker (errors as (type, message, traceback), results plain data).
    max_result: the C++ Pool's max_result_bytes (0: none): a longer record fails its call with
    OverflowError here, rather than break the protocol (the pool kills a worker that sends one)."""
    error_payload = _plain_error if plain else _error_payload
    put_obj, put_plain = results.put_obj, results.put_plain
    if max_result:
        results.limit_puts(max_result)  # a longer record raises OverflowError (run() sends that instead)

    def put(rec):
        p = put_obj(rec, 0)
        while p is not None and not results.publish(p):
            results.wait_writable(p.record_bytes, _PUT_RETRY)

    if plain:
        def put(rec):  # noqa: F811 (the C++ Pool's: plain data only, checked in C as it is written)
            p = put_plain(rec, 0)
            if p is NotImplemented:
                p = put_obj(_checked(rec), 0)
            while p is not None and not results.publish(p):
                results.wait_writable(p.record_bytes, _PUT_RETRY)

    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:
            put((wid, None, _INIT_FAILED, error_payload(exc), 0.0))
            return
    done = 0
    clock = time.perf_counter
    functions = _FunctionTable()
    resolved = {}  # "module:qualname" -> function; forgotten when a package version is installed
    modules.add_listener(resolved.clear)
    get_objs = calls.get_objs

    def run(tid, fn, args, kwargs, op):
        """One call (or chunk), its result published. Returns fn resolved, for a run's next item."""
        if report_start:
            put((wid, tid, _STARTED, None, 0.0))
        t0 = clock()
        try:
            if type(fn) is int:
                fn = functions[fn]
            elif type(fn) is tuple:  # first use here: (id, function)
                fid, f = fn
                if type(f) is str:
                    f = _resolve(f)
                fn = functions[fid] = f
            elif type(fn) is str:  # the C++ Pool names its functions
                f = resolved.get(fn)
                if f is None:
                    f = resolved[fn] = _resolve(fn)
                fn = f
            if op == _CHUNK:
                value = [fn(a) for a in args] if kwargs == _SINGLE else [fn(*a) for a in args]
            else:
                value = fn(*args, **kwargs) if kwargs else fn(*args)
            # (plain: put() checks the value, in C for what the plain encoder writes.)
            rec = (wid, tid, _OK, value, clock() - t0)
        except BaseException as exc:
            rec = (wid, tid, _ERR, error_payload(exc), clock() - t0)
        value = None
        try:
            put(rec)
        except Exception as exc:
            if type(exc) is not OverflowError:  # (OverflowError: over max_result, said as it is)
                err = pickle.PicklingError(f"the task's result could not be pickled: {exc}")
                err.__cause__ = exc
                exc = err
            put((wid, tid, _ERR, error_payload(exc), rec[_RESULT_ELAPSED]))
        return fn

    while True:
        try:
            batch = get_objs(_task.WORKER_TAKE, None)
        except Exception as exc:
            # A call that does not unpickle here (its function or an argument's class does not
            # exist in the worker); it is the oldest call the parent has not had an answer for.
            # (The parent sends a run that fails so again one call at a time.)
            put((wid, None, _ERR, error_payload(exc), 0.0))
            done += 1
            if max_tasks and done >= max_tasks:
                return
            continue
        for op, tid, fn, args, kwargs in batch:
            if op == _STOP:
                return
            if op == _PING:
                put((wid, tid, _PONG, None, 0.0))
                continue
            if op == _RUN:  # a map's calls: item k has task id tid + k (never cut by max_tasks)
                single = kwargs == _SINGLE
                for a in args:
                    fn = run(tid, fn, (a,) if single else a, None, _CALL)
                    tid += 1
                done += len(args)
            else:
                run(tid, fn, args, kwargs, op)
                done += 1
            fn = args = kwargs = None
            if max_tasks and done >= max_tasks:
                return
        batch = None
