"""ringpool.Executor: a ``concurrent.futures`` process pool over shared-memory rings.

    submit/map ──► dispatcher (in the caller's thread, under the pool lock)
                      │ the worker with the fewest tasks in flight, bounded per worker: the
                      │ scheduler's rules (_core.Scheduler, the C++ ringpool::Pool's own)
                      ▼
                   per-worker call ring ──► worker: take one call, run it, put its result
                                                                       │
    futures / map ◄── collector thread ◄── one shared result ring ◄────┘
                          ▲
    watcher thread ───────┘ (worker sentinels, task deadlines: posts a DIED record)

- Tasks never share a call queue: each worker has its own ring, so the parent always knows which
  worker holds which task. A worker takes one call at a time, so when it dies, the ring's
  ``consumed`` counter tells which of its tasks it had taken (those fail with ``WorkerDied``) and
  which it had not (those go to other workers): a crash fails only the task that was running.
- The bound on tasks in flight per worker adapts to the task duration the workers report: about
  2 ms of queued work (between 2 and 1024 tasks: task.hpp's kMinDepth and kMaxDepth). Short tasks
  then travel in batches (one ring synchronization per batch), long ones are not stuck behind a
  busy worker while another idles.
- Only the collector thread reads the result ring, so a death is always handled after every
  result the dead worker had published (the watcher posts the DIED record into the same ring).
- ``map`` and ``imap_unordered`` do not make a Future per item.

Deviations from ``concurrent.futures.ProcessPoolExecutor``:
- A dead worker fails only the task it was running (``WorkerDied``, a ``BrokenProcessPool``
  subclass naming the pid and the signal or exit code); the pool replaces it and goes on. Only an
  initializer that fails breaks the pool (``BrokenProcessPool``), as in the stdlib.
- ``task_timeout``: a task that runs longer fails with ``TaskTimeout`` and its worker is killed
  and replaced.
- Arguments that cannot be pickled raise in ``submit``/``map`` (the stdlib raises later, in a
  thread); a result that cannot be pickled fails its future with the pickling error.
- ``map`` takes ``progress=True`` (a tqdm bar); ``imap_unordered`` streams results of a large or
  endless input in completion order, reading the input lazily.
- A function may be given as a string ``"package.module:qualname"`` (resolved in the worker).

The parts (docs/design/pool.md, "The Executor"): this module is the public API and the consumer
side of map/imap; _executor_dispatch (the dispatcher), _executor_collect (the collector),
_executor_watch (the watcher thread), _executor_workers (starts, deaths, a broken pool) and
_executor_tasks (the tasks, workers and pool state they share).

Logging (``ringpool.executor``): a worker started (DEBUG), recycled after ``max_tasks_per_child``
(DEBUG: planned, and one per task at ``max_tasks_per_child=1``), died or killed for its task's
timeout and replaced (WARNING), a replacement that failed to start (WARNING), the pool broken
(ERROR). Events noticed under the pool lock are logged once it is released (``_State.events``): a
handler's I/O never holds up dispatch.
"""
from __future__ import annotations

import collections
import itertools
import os
import threading
import time
import weakref
from concurrent.futures import Executor as _Executor
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FuturesTimeout
from concurrent.futures.process import BrokenProcessPool

from ._errors import RemoteTraceback, TaskTimeout, WorkerDied
from ._executor_collect import _HELP_STEP, _Collector
from ._executor_dispatch import _Dispatcher
from ._executor_tasks import _CALL, _CHUNK, _DIED, _MAX_DEPTH, _RUN, _SINGLE, _Batch, _Group, _State
from ._executor_watch import _Watcher
from ._executor_workers import _Workers
from .context import get_context
from .reduction import explain_parts

__all__ = ["Executor", "WorkerDied", "TaskTimeout", "RemoteTraceback"]

_POLL_ITEMS = 256  # a consumer with results in hand reads the ring every this many items


class _Future(Future):
    """A Future whose ``result``/``exception`` read the result ring themselves while the pool's
    collector thread sleeps: one thread hand-off less on the way back."""

    def __init__(self, pool):
        super().__init__()
        self._pool = pool

    def _wait_helping(self, timeout):
        if self._state != "PENDING" and self._state != "RUNNING":
            return timeout
        if timeout is None:
            self._pool._help(self, None)
            return None
        end = time.monotonic() + timeout
        self._pool._help(self, timeout)
        return max(end - time.monotonic(), 0.0)

    def result(self, timeout=None):
        return super().result(self._wait_helping(timeout))

    def exception(self, timeout=None):
        return super().exception(self._wait_helping(timeout))


class Executor(_Executor):
    """A process pool whose tasks and results travel over shared-memory rings.

    max_workers: number of workers (default: the CPUs this process may use).
    preload: modules the zygote imports once before forking workers (e.g. ``("torch",)``).
    initializer, initargs: run in each worker before its first task; if it raises, the pool is
        broken (``BrokenProcessPool``), as in the stdlib.
    max_tasks_per_child: a worker exits after this many tasks and a fresh one replaces it.
    mp_context: the context that starts workers (default ``ringpool.get_context(preload, zygote)``).
    zygote: False to start each worker as a fresh interpreter (exec mode).
    task_timeout: seconds a task may run before its worker is killed (``TaskTimeout``).
    """

    # Its parts (each module says which threads run it and what it owns): _state, the data they
    # share under the pool lock; _dispatcher; _workers; _collector (its thread: _collector_thread);
    # _watcher (its thread: _watcher_thread). The Executor itself runs in callers' threads.

    def __init__(self, max_workers=None, preload=(), initializer=None, initargs=(), max_tasks_per_child=None, *,
                 mp_context=None, zygote=True, task_timeout=None):
        if max_workers is None:
            max_workers = len(os.sched_getaffinity(0)) or 1
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int) or max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be a positive int")
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError("task_timeout must be positive")
        if mp_context is None:
            mp_context = get_context(preload, zygote)
        self._max_workers = int(max_workers)
        self._max_tasks = max_tasks_per_child
        s = self._state = _State(self._max_workers, initializer, tuple(initargs), max_tasks_per_child,
                                 task_timeout, mp_context)
        self._workers = _Workers(s)
        self._dispatcher = _Dispatcher(s, self._workers)
        self._collector = _Collector(s, self._dispatcher, self._workers)
        self._watcher = _Watcher(s, self._dispatcher, self._workers)
        s.wake_watcher = self._watcher.wake
        self._read_here = self._collector.read_here
        with s.lock:
            for _ in range(self._max_workers):
                self._workers.start(initial=True)
        s.flush_events()
        self._collector_thread = threading.Thread(target=self._collector.run, name="ringpool-executor-collector",
                                                  daemon=True)
        self._watcher_thread = threading.Thread(target=self._watcher.run, name="ringpool-executor-watcher",
                                                daemon=True)
        self._collector_thread.start()
        self._watcher_thread.start()
        # As the stdlib's pools do: at interpreter exit, finish submitted work, then stop.
        ref = weakref.ref(self)
        threading._register_atexit(lambda: ref() is not None and ref().shutdown(wait=True))

    def __repr__(self):
        s = self._state
        state = "broken" if s.broken else "shut down" if s.shutdown else "running"
        return f"<ringpool.Executor {state}, {self._max_workers} workers>"

    @property
    def _shutdown(self):
        """shutdown() was called (ringpool.joblib reads it to retire a shared pool)."""
        return self._state.shutdown

    @property
    def _broken(self):
        """Why the pool broke, or None (the stdlib's pools have the same attribute; a
        ClusterExecutor host drops a broken node-local pool by it)."""
        return self._state.broken

    def worker_pids(self):
        """The pids of the pool's current workers (a snapshot: a worker may die, or be replaced,
        right after). Any thread may call it. A pid is only safe to signal while the process is
        known to be alive: signal through ``os.pidfd_open`` after checking it is still a child."""
        with self._state.lock:
            return [w.proc.pid for w in self._state.workers.values() if w.proc.pid is not None]

    # -- the caller's side ------------------------------------------------------------------------
    def _check_open(self):
        s = self._state
        if s.broken is not None:
            raise BrokenProcessPool(s.broken)
        if s.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def submit(self, fn, /, *args, **kwargs):
        """Schedule fn(*args, **kwargs); returns a Future. An argument that cannot be pickled
        raises here and nothing is queued."""
        f = _Future(self)
        gr = _Group(_CALL, fn, args, kwargs or None, f, 1)
        s = self._state
        with s.lock:
            self._check_open()
            try:
                done = self._dispatcher.submit(gr)
            except Exception as exc:
                _raise_call_error(fn, args, kwargs, exc)
            if not done:
                return f
        s.deliver(done)
        return f

    def map(self, fn, *iterables, timeout=None, chunksize=1, progress=False):
        """Like ``Executor.map``: results in order, ``chunksize`` items per task; the iterables are
        read at once. ``progress=True`` shows a tqdm bar."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        _check_progress(progress)
        end = None if timeout is None else time.monotonic() + timeout
        single = len(iterables) == 1
        items = list(iterables[0]) if single else list(zip(*iterables))
        batch = _Batch(ordered=True)
        n = self._enqueue(fn, items, chunksize, batch, single)
        return self._ordered_results(batch, n, chunksize, end, len(items), progress)

    def starmap(self, fn, iterable, timeout=None, chunksize=1, progress=False):
        """fn(*args) for each args tuple of ``iterable``, results in order (``multiprocessing.Pool``'s
        starmap); the iterable is read at once, as in ``map``."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        _check_progress(progress)
        end = None if timeout is None else time.monotonic() + timeout
        items = [tuple(a) for a in iterable]
        batch = _Batch(ordered=True)
        n = self._enqueue(fn, items, chunksize, batch, False)
        return self._ordered_results(batch, n, chunksize, end, len(items), progress)

    def imap(self, fn, iterable, chunksize=1, progress=False, total=None):
        """fn(item) for each item, results in input order. ``iterable`` is read lazily, with a
        bounded number of tasks outstanding (as ``imap_unordered``), so it may be large or endless;
        closing the iterator early cancels what was queued."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        _check_progress(progress)
        return self._lazy_ordered_results(fn, iter(iterable), chunksize, progress, total)

    def imap_unordered(self, fn, iterable, chunksize=1, progress=False, total=None):
        """fn(item) for each item, in completion order. ``iterable`` is read lazily, with a bounded
        number of tasks outstanding, so it may be large or endless."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        _check_progress(progress)
        return self._unordered_results(fn, iter(iterable), chunksize, progress, total)

    def _enqueue(self, fn, items, chunksize, batch, single):
        """Queue fn over items (argument tuples; single arguments if single), each result
        delivered to batch at its position (a chunk's at the chunk's). Returns the number of
        results to come."""
        if not items:
            return 0
        flag = _SINGLE if single else None
        if chunksize == 1 and self._max_tasks is None:
            # One group of n calls, consecutive ones sharing RUN records as the scheduler cuts it.
            n = len(items)
            gr = _Group(_RUN, fn, items, flag, batch, n)
        elif chunksize == 1:
            # With max_tasks_per_child, one record per call keeps each worker's count exact.
            n = len(items)
            gr = _Group(_CALL, fn, items, flag, batch, n, each=True)
        else:
            n = -(-len(items) // chunksize)
            gr = _Group(_CHUNK, fn, items, flag, batch, n, chunksize=chunksize)
        s = self._state
        with s.lock:
            self._check_open()
            done = self._dispatcher.enqueue(gr, n, batch)
        s.deliver(done)
        return n

    def _ordered_results(self, batch, n, chunksize, end, total, progress):
        bar = _progress_bar(progress, total)
        try:
            yield from self._in_order(batch, n, chunksize, end, bar)
        finally:
            if bar is not None:
                bar.close()
            self._cancel_batch(batch)

    def _in_order(self, batch, n, chunksize, end, bar):
        """The n results of an ordered batch, in order (a chunk's items one by one)."""
        done = batch.done
        every = max(1, _POLL_ITEMS // chunksize)
        for i in range(n):
            item = done.pop(i, None)  # results are inserted under the GIL: no lock to look
            if item is None:
                item = self._wait_item(batch, i, end)
            elif i % every == 0:
                self._read_here(0.0)
            if item[0] and bar is None:
                if chunksize == 1:
                    yield item[1]
                else:
                    yield from item[1]
            else:
                yield from _emit(item[0], item[1], chunksize, bar)

    def _lazy_ordered_results(self, fn, it, chunksize, progress, total):
        """imap: the input is cut into slices of 256 tasks, each an ordered batch of its own;
        slices are queued while fewer than the window's tasks are outstanding, and their results
        come out slice after slice."""
        bar = _progress_bar(progress, total)
        window = max(2 * self._max_workers * _MAX_DEPTH, 64)  # tasks outstanding at most
        slices = collections.deque()  # (batch, tasks) in input order, not yet read
        outstanding = 0
        exhausted = False
        try:
            while True:
                while not exhausted and outstanding < window:
                    chunk = list(itertools.islice(it, chunksize * 256))
                    if not chunk:
                        exhausted = True
                        break
                    batch = _Batch(ordered=True)
                    n = self._enqueue(fn, chunk, chunksize, batch, True)
                    slices.append((batch, n))
                    outstanding += n
                if not slices:
                    return
                batch, n = slices[0]
                yield from self._in_order(batch, n, chunksize, None, bar)
                slices.popleft()
                outstanding -= n
        finally:
            if bar is not None:
                bar.close()
            for batch, _ in slices:
                self._cancel_batch(batch)

    def _wait_item(self, batch, i, end):
        done = batch.done
        while True:
            item = done.pop(i, None)
            if item is not None:
                return item
            step = _HELP_STEP
            if end is not None:
                step = min(step, end - time.monotonic())
                if step <= 0:
                    raise _FuturesTimeout()
            self._await(batch, lambda: i in done, step)

    def _await(self, batch, ready, step):
        """One step of waiting for batch's results: read them here, or be handed them."""
        if self._read_here(step, ready):
            return
        with batch.cond:
            if not ready():
                batch.cond.wait(step)

    def _unordered_results(self, fn, it, chunksize, progress, total):
        batch = _Batch(ordered=False)
        bar = _progress_bar(progress, total)
        window = max(2 * self._max_workers * _MAX_DEPTH, 64)  # tasks outstanding at most
        exhausted = False
        try:
            while True:
                while not exhausted and batch.pending < window:
                    chunk = list(itertools.islice(it, chunksize * 256))
                    if not chunk:
                        exhausted = True
                        break
                    self._enqueue(fn, chunk, chunksize, batch, True)
                done = batch.done  # appended to by the reader (deque operations are atomic)
                while not done:
                    if exhausted and batch.pending == 0:
                        return
                    self._await(batch, lambda: done or (exhausted and batch.pending == 0), _HELP_STEP)
                every = max(1, _POLL_ITEMS // chunksize)
                k = 0
                while done:
                    ok, value = done.popleft()
                    k += 1
                    if k % every == 0:
                        self._read_here(0.0)
                    if ok and bar is None:
                        if chunksize == 1:
                            yield value
                        else:
                            yield from value
                    else:
                        yield from _emit(ok, value, chunksize, bar)
        finally:
            if bar is not None:
                bar.close()
            self._cancel_batch(batch)

    def _cancel_batch(self, batch):
        """Drop the batch's tasks still in the backlog (the caller stopped iterating)."""
        with self._state.lock:
            if batch.pending:
                batch.pending -= len(self._dispatcher.cancel(batch.groups))

    def shutdown(self, wait=True, *, cancel_futures=False):
        s = self._state
        with s.lock:
            first = not s.shutdown
            s.shutdown = True
            if cancel_futures:  # the futures still in the backlog
                waiting = {g: gr.sink for g, gr in s.groups.items() if type(gr.sink) is _Future and not gr.running}
                for g, _ in self._dispatcher.cancel(list(waiting)):
                    waiting[g].cancel()
        if first:
            s.post((0, None, _DIED, None, 0.0))  # the collector notices shutdown
        if wait:
            self._collector_thread.join()
            self._watcher_thread.join()

    def _help(self, f, timeout):
        """Wait for f by reading results in this thread (a _Future's wait)."""
        self._collector.help(f, timeout)


def _emit(ok, value, chunksize, bar):
    """The results one map task delivered: its value, or a chunk's values; its error raised."""
    if not ok:
        raise value
    if chunksize == 1:
        if bar is not None:
            bar.update(1)
        yield value
    else:
        if bar is not None:
            bar.update(len(value))
        yield from value


def _raise_call_error(fn, args, kwargs, exc):
    """Re-raise a call's pickling error naming the argument path that failed (args[1].conf.lock)."""
    parts = [("fn", fn), *((f"args[{i}]", a) for i, a in enumerate(args)),
             *((f"kwargs[{k!r}]", v) for k, v in (kwargs or {}).items())]
    better = explain_parts(parts, getattr(exc, "__cause__", None) or exc)
    if better is exc or better is getattr(exc, "__cause__", None):
        raise exc
    raise better from exc


def _check_progress(progress):
    if not (isinstance(progress, (bool, dict)) or progress is None):
        raise TypeError(f"progress must be a bool or a dict of tqdm options, not {type(progress).__name__}")


def _progress_bar(progress, total):
    """progress: False, True (a tqdm bar), or a dict of tqdm options (desc, leave, file, ...)."""
    _check_progress(progress)
    if not progress:
        return None
    options = {"total": total, "unit": "task", **(progress if isinstance(progress, dict) else {})}
    from tqdm import tqdm  # optional dependency (the [progress] extra): only when a bar is asked for

    return tqdm(**options)
