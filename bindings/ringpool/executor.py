"""ringpool.Executor: a ``concurrent.futures`` process pool over shared-memory rings.

    submit/map ──► dispatcher (in the caller's thread, under the pool lock)
                      │ picks the worker with the fewest tasks in flight, bounded per worker
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

Logging (``ringpool.executor``): a worker started (DEBUG), recycled after ``max_tasks_per_child``
(DEBUG: planned, and one per task at ``max_tasks_per_child=1``), died or killed for its task's
timeout and replaced (WARNING), a replacement that failed to start (WARNING), the pool broken
(ERROR). Events noticed under the pool lock are logged once it is released (``_events``): a
handler's I/O never holds up dispatch.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import pickle
import queue
import sys
import threading
import time
import traceback
import types
import weakref
from concurrent.futures import Executor as _Executor
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import connection as _mp_connection

from . import _core
from . import _pool_worker
from ._errors import RemoteTraceback, TaskTimeout, WorkerDied
from ._errors import describe_exit as _describe_exit
from .context import get_context
from .reduction import dumps, explain_parts

__all__ = ["Executor", "WorkerDied", "TaskTimeout", "RemoteTraceback"]

_log = logging.getLogger(__name__)

# The task records, their kinds, field positions and limits have one home, task.hpp
# (proto/include/ringpool/proto/task.hpp, drawn in docs/design/protocol.md "Task records"),
# shared with the C++ ringpool::Pool and read here through _core.task.
#   call records (parent -> worker): (op, tid, fn, args, kwargs). A _RUN record carries a map's
#     calls to one worker: args is a list of argument tuples, item k has task id tid + k, and each
#     item is answered with its own result record, as a _CALL is. A _RUN or _CHUNK record whose
#     kwargs is _SINGLE carries single arguments instead of tuples (a map over one iterable: no
#     1-tuples to build, pickle and memoize).
#   result records (-> parent): (wid, tid, status, value, elapsed)
_task = _core.task
_CALL, _CHUNK, _PING, _STOP, _RUN = _task.CALL, _task.CHUNK, _task.PING, _task.STOP, _task.RUN
_OK, _ERR, _STARTED, _PONG, _INIT_FAILED, _DIED = (_task.OK, _task.ERR, _task.STARTED, _task.PONG,
                                                   _task.INIT_FAILED, _task.DIED)
_SINGLE = _task.SINGLE
_CALL_FN, _RESULT_ELAPSED = _task.CALL_FN, _task.RESULT_ELAPSED
# The hot paths build records as tuple displays and read them by unpacking, in task.hpp's field
# order: _pool_worker (the worker loop, imported above) checks that order at import.

_CALL_CAPACITY = _task.CALL_CAPACITY
_RESULT_CAPACITY = _task.RESULT_CAPACITY
# The depth bound (unanswered calls per worker) and the moving average of reported task times it
# comes from: task.hpp's "tuning both pools share", one definition for both languages.
_MIN_DEPTH, _MAX_DEPTH = _task.MIN_DEPTH, _task.MAX_DEPTH
_QUEUED_WORK = _task.QUEUED_WORK  # seconds of work to keep queued per worker
_RESULT_COST = _task.RESULT_COST  # the parent's own time per result, counted in the bound
_TASK_TIME_WEIGHT = _task.TASK_TIME_WEIGHT  # of each reported task time in the moving average
_NO_WAIT = _core.NO_BACKPRESSURE
# A caller waiting for a result reads the result ring itself, in steps of _HELP_STEP seconds; the
# collector thread leaves the ring to it while it has read within _HELP_GRACE seconds.
_HELP_STEP = 0.05
_HELP_GRACE = 0.003
_POLL_ITEMS = 256  # a consumer with results in hand reads the ring every this many items
# A replacement worker that fails to start is retried every _SPAWN_RETRY seconds; after
# _SPAWN_ATTEMPTS failures in a row the pool is broken (BrokenProcessPool), never left hanging.
_SPAWN_RETRY = 0.2
_SPAWN_ATTEMPTS = 25
# The watcher looks again at least this often even when nothing wakes it: a pool found short of
# workers is never left so for want of a wake-up (a race between a death's handling and the
# watcher's wait left a pool one worker short forever, about once in five runs of the test).
_WATCH_PERIOD = 1.0
# Workers that exit with an error status before taking a call while no worker has answered (a
# script that makes the pool at module level, without the __main__ guard, kills each worker in its
# start-up): after this many in a row the pool is broken instead of replacing them forever.
_EARLY_DEATHS = 3
# Functions that travel once per worker and are then named by number (hashable, and the same
# object on every call, unlike bound methods or partials).
_TABLED = (types.FunctionType, types.BuiltinFunctionType, str)
_MAX_FUNCTIONS = 4096


# -- the parent side ---------------------------------------------------------------------------

def _function_id(fn):
    """The number a call record's fn field names its function by: fn itself once the worker knows
    it, the first item of (number, function) on its first use there; None for a function that
    travels whole every time."""
    if type(fn) is int:
        return fn
    if type(fn) is tuple:
        fid, _ = fn
        return fid
    return None


def _forget_first_use(w, rec):
    """rec, not sent to w after all, carried its function's first use there: w does not learn it."""
    fn = rec[_CALL_FN]
    if type(fn) is tuple:
        fid, _ = fn
        w.known.discard(fid)


class _Task:
    """A call, a chunk, or a run: n consecutive calls of a map (op _RUN), items index..index+n-1 of
    the argument tuples in args, with task ids tid..tid+n-1, delivered to their batch one by one."""

    __slots__ = ("tid", "op", "fn", "args", "kwargs", "sink", "index", "wid", "payload", "running", "n", "k")

    def __init__(self, tid, op, fn, args, kwargs, sink, index, n=1):
        self.tid, self.op, self.fn, self.args, self.kwargs = tid, op, fn, args, kwargs
        self.sink, self.index, self.wid = sink, index, None
        self.payload = None    # (payload, flags, fds) once pickled ahead of sending
        self.running = False   # its Future was set running (it may still be sent again)
        self.n = n             # results it delivers
        self.k = 0             # of those, answered (a sent run)

    def record(self):
        return (self.op, self.tid, self.fn, self.call_args(), self.kwargs)

    def call_args(self):
        """What the record's args slot carries: a run's slice of the argument list."""
        return self.args[self.index:self.index + self.n] if self.op == _RUN else self.args

    def item(self, j):
        """Item j of a run, as a task of its own."""
        a = self.args[self.index + j]
        t = _Task(self.tid + j, _CALL, self.fn, (a,) if self.kwargs == _SINGLE else a, None, self.sink,
                  self.index + j)
        t.running = True
        return t

    def rest(self, j):
        """Items j.. of a run, as a run of their own."""
        t = _Task(self.tid + j, _RUN, self.fn, self.args, self.kwargs, self.sink, self.index + j, self.n - j)
        t.running = True
        return t


class _Worker:
    __slots__ = ("wid", "proc", "calls", "sent", "load", "answered", "budget", "unpublished", "running", "timed_out",
                 "retiring", "known")

    def __init__(self, wid, proc, calls, budget):
        self.wid, self.proc, self.calls = wid, proc, calls
        self.sent = collections.deque()  # records sent and not answered, in order: _Task or _PING_MARK
        self.load = 0                    # calls sent and not answered (a run counts its items)
        self.answered = 0                # records answered (results and pongs)
        self.budget = budget             # calls it may still be sent (max_tasks_per_child), or None
        self.unpublished = collections.deque()  # Pendings accepted while its ring was full, in order
        self.running = None              # (tid, deadline), with task_timeout
        self.timed_out = None            # tid whose deadline passed (the worker is being killed)
        self.retiring = False            # its budget is spent: it finishes what it has and exits
        self.known = set()               # numbers of the functions it has been sent


class _Batch:
    """Results of one map/imap_unordered call, delivered by the collector without Futures."""

    def __init__(self, ordered):
        self.cond = threading.Condition(threading.Lock())
        self.ordered = ordered
        self.done = {} if ordered else collections.deque()
        self.pending = 0   # tasks not delivered (pool lock)
        self.failed = None  # set when the pool broke

    def deliver(self, index, ok, value):
        if self.ordered:
            self.done[index] = (ok, value)
        else:
            self.done.append((ok, value))

    def flush(self):
        with self.cond:
            self.cond.notify_all()


_PING_MARK = object()


def _load(w):
    return w.load


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


def _close_fds(*fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


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
        self._ctx = mp_context
        self._max_workers = int(max_workers)
        self._initializer, self._initargs = initializer, tuple(initargs)
        self._max_tasks = max_tasks_per_child
        self._task_timeout = task_timeout

        self._lock = threading.Lock()
        self._reader = threading.Lock()  # the role of taking and handling result records
        self._helped_at = 0.0            # when a waiting caller last read results itself
        self._finished_flag = False
        self._results = _core.Channel.create(_RESULT_CAPACITY)
        self._workers = {}             # wid -> _Worker
        self._tasks = {}               # tid -> _Task, every task not finished
        self._backlog = collections.deque()  # tasks waiting for room in a worker
        self._next_tid = 1             # task ids (pool lock); a run takes one per item
        self._wids = itertools.count(1)
        self._avg = _task.INITIAL_TASK_TIME  # moving average of the task time the workers report
        self._depth = _MIN_DEPTH
        self._broken = None            # the reason, once broken
        self._shutdown = False
        self._closed = False           # workers stopped
        self._fn_ids = {}              # function -> number (holds the function)
        self._lost = []                # decode errors of results not yet matched to their task
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)

        self._spawn_failures = 0        # replacement starts that failed in a row
        self._early_deaths = 0          # workers dead before their first call, in a row (_EARLY_DEATHS)
        self._events = collections.deque()  # (level, message, args) to log once the lock is released
        with self._lock:
            for _ in range(self._max_workers):
                self._start_worker(initial=True)
        self._flush_events()
        self._collector = threading.Thread(target=self._collect, name="ringpool-executor-collector", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name="ringpool-executor-watcher", daemon=True)
        self._collector.start()
        self._watcher.start()
        # As the stdlib's pools do: at interpreter exit, finish submitted work, then stop.
        ref = weakref.ref(self)
        threading._register_atexit(lambda: ref() is not None and ref().shutdown(wait=True))

    def __repr__(self):
        state = "broken" if self._broken else "shut down" if self._shutdown else "running"
        return f"<ringpool.Executor {state}, {self._max_workers} workers>"

    def worker_pids(self):
        """The pids of the pool's current workers (a snapshot: a worker may die, or be replaced,
        right after). Any thread may call it. A pid is only safe to signal while the process is
        known to be alive: signal through ``os.pidfd_open`` after checking it is still a child."""
        with self._lock:
            return [w.proc.pid for w in self._workers.values() if w.proc.pid is not None]

    # -- workers (pool lock held) ---------------------------------------------------------------
    def _start_worker(self, initial=False, watcher=False):
        """Start one worker. A replacement that fails to start (its zygote was killed at that
        moment, say) is not an error here: the watcher thread tries again shortly, and breaks the
        pool only after _SPAWN_ATTEMPTS failures in a row. At construction the error raises."""
        wid = next(self._wids)
        calls = _core.Channel.create(_CALL_CAPACITY)
        proc = self._ctx.Process(
            target=_pool_worker.serve_executor,
            args=(wid, _pool_worker.ChannelRef(calls), _pool_worker.ChannelRef(self._results), self._initializer,
                  self._initargs,
                  self._max_tasks, self._task_timeout is not None),
            name=f"ringpool-executor-{wid}", daemon=True)
        try:
            proc.start()
        except Exception as exc:
            if initial:
                raise
            self._spawn_failures += 1
            self._spawn_error = exc
            self._event(logging.WARNING, "a replacement worker failed to start (attempt %d of %d): %s: %s",
                        self._spawn_failures, _SPAWN_ATTEMPTS, type(exc).__name__, exc, event="spawn_failed", wid=wid)
            if not watcher:
                self._wake_watcher()  # it retries (on its own schedule)
            return
        self._spawn_failures = 0
        self._workers[wid] = _Worker(wid, proc, calls, self._max_tasks)
        self._event(logging.DEBUG, "worker %d started (pid %d)", wid, proc.pid,
                    event="worker_started" if initial else "worker_replaced", pid=proc.pid, wid=wid)
        self._wake_watcher()

    def _event(self, level, msg, *args, event, pid=-1, code=0, wid=0):
        """Log msg once the pool lock is released (pool lock held): see _flush_events. The record
        gets the attributes the C++ runtime's records have (docs/design/logging.md): ``event``
        (its name in runtime/include/ringpool/log.hpp), ``ringpool_pid``, ``exit_code``, ``worker_id``."""
        if _log.isEnabledFor(level):
            self._events.append((level, msg, args, {"event": event, "ringpool_pid": pid, "exit_code": code,
                                                    "worker_id": wid}))

    def _flush_events(self):
        """Log the events queued under the pool lock (pool lock not held; any thread)."""
        events = self._events
        while events:
            try:
                level, msg, args, extra = events.popleft()
            except IndexError:  # another thread took the last one
                return
            try:
                _log.log(level, msg, *args, extra=extra)
            except Exception:
                # A filter or handler that raises must not stop the thread that logs (the
                # watcher, or a caller's): reported as logging reports its own handler errors.
                if logging.raiseExceptions and sys.stderr is not None:
                    traceback.print_exc()

    def _short_of_workers(self):
        """Fewer open workers than asked for, with work to do or to come (pool lock held)."""
        return (self._broken is None and not self._closed and len(self._open_workers()) < self._max_workers
                and (self._tasks or not self._shutdown))

    def _wake_watcher(self):
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _open_workers(self):
        return [w for w in self._workers.values() if not w.retiring]

    def _spend(self, w, n):
        if w.budget is not None:
            w.budget -= n
            if w.budget == 0:
                w.retiring = True
                if not self._shutdown and self._broken is None:
                    self._start_worker()

    # -- dispatch (pool lock held) ----------------------------------------------------------------
    def _dispatch(self, done):
        """Move backlog tasks to the least busy workers, up to the depth bound."""
        backlog = self._backlog
        depth = self._depth
        while backlog:
            workers = self._open_workers()
            if not workers:
                return
            w = min(workers, key=_load)
            room = depth - w.load
            if room <= 0:
                return
            if w.budget is not None:
                room = min(room, w.budget)
            batch = []
            while backlog and room > 0:
                t = backlog[0]
                if t.op == _RUN:
                    if t.n > room:  # the worker takes the run's first items; the rest wait
                        head = t.rest(0)
                        head.n = room
                        self._tasks[head.tid] = head  # in t's place
                        t.tid += room
                        t.index += room
                        t.n -= room
                        self._tasks[t.tid] = t
                        t = head
                    else:
                        backlog.popleft()
                    batch.append(t)
                    room -= t.n
                    continue
                backlog.popleft()
                if isinstance(t.sink, Future) and not t.running:
                    if not t.sink.set_running_or_notify_cancel():
                        self._tasks.pop(t.tid, None)  # cancelled while waiting
                        continue
                    t.running = True
                batch.append(t)
                room -= 1
            if batch:
                self._send(w, batch, done)

    def _send(self, w, batch, done):
        chan = w.calls
        i, n = 0, len(batch)
        fast = True
        while i < n:
            if fast and not w.unpublished and batch[i].payload is None:
                # The fast path: plain records, pickled and published in batches.
                records = self._records(batch, i, w)
                before = chan.committed  # we are this ring's only producer
                try:
                    k = chan.put_objs(records, 0, _NO_WAIT)
                except Exception:
                    # One of them does not pickle: the rest go one at a time, failing only it.
                    k = chan.committed - before
                    fast = False
                for r in records[k:]:  # not sent: the worker does not learn their functions
                    _forget_first_use(w, r)
                self._record_sent(w, batch[i:i + k])
                i += k
                if i == n:
                    return
            t = batch[i]
            try:
                if t.payload is not None:
                    payload, flags, fds = t.payload
                else:
                    rec = self._record(t, w)
                    try:
                        payload, flags, fds = dumps(rec)
                    except Exception:
                        _forget_first_use(w, rec)
                        raise
                p = (chan.stage(payload, flags, fds, 0) if w.unpublished
                     else chan.put_payload(payload, flags, fds, _NO_WAIT))
            except Exception as exc:
                if t.op == _RUN:
                    # One of its items does not pickle: they go one call at a time, failing only it.
                    self._send(w, self._split_run(t), done)
                else:
                    self._fail_unsent(t, exc, done)
                i += 1
                continue
            t.payload = None
            self._record_sent(w, (t,))
            if p is not None:
                w.unpublished.append(p)
            i += 1

    def _record(self, t, w):
        """t's call record for w. A plain function travels once per worker; later calls carry its
        number (pickling a function by reference costs more than the rest of the call)."""
        fn = t.fn
        if type(fn) in _TABLED:
            fid = self._fn_ids.get(fn)
            if fid is None and len(self._fn_ids) < _MAX_FUNCTIONS:
                fid = self._fn_ids[fn] = len(self._fn_ids) + 1
            if fid is not None:
                if fid in w.known:
                    fn = fid
                else:
                    w.known.add(fid)
                    fn = (fid, fn)
        return (t.op, t.tid, fn, t.call_args(), t.kwargs)

    def _records(self, batch, start, w):
        """Call records for batch[start:] on w; a map's calls share their function, so its
        number is looked up once for the run of calls that follows the first."""
        out = []
        fn = fid = None
        for t in batch[start:]:
            if t.fn is fn and fid is not None:
                out.append((t.op, t.tid, fid, t.call_args(), t.kwargs))
                continue
            rec = self._record(t, w)
            out.append(rec)
            fn = t.fn
            fid = _function_id(rec[_CALL_FN])
        return out

    def _record_sent(self, w, tasks):
        n = 0
        for t in tasks:
            t.wid = w.wid
            w.sent.append(t)
            n += t.n
        w.load += n
        self._spend(w, n)

    def _split_run(self, t):
        """A run not yet sent, as one task per item (each registered in its place)."""
        del self._tasks[t.tid]
        items = [t.item(j) for j in range(t.n)]
        for it in items:
            self._tasks[it.tid] = it
        return items

    def _fail_unsent(self, t, exc, done):
        if self._tasks.pop(t.tid, None) is not None:
            done.append((t, False, exc))

    def _publish_pending(self):
        for w in self._workers.values():
            q = w.unpublished
            while q and w.calls.publish(q[0]):
                q.popleft()

    # -- the caller's side ------------------------------------------------------------------------
    def _check_open(self):
        if self._broken is not None:
            raise BrokenProcessPool(self._broken)
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def submit(self, fn, /, *args, **kwargs):
        """Schedule fn(*args, **kwargs); returns a Future. An argument that cannot be pickled
        raises here and nothing is queued."""
        f = _Future(self)
        t = _Task(0, _CALL, fn, args, kwargs or None, f, 0)
        with self._lock:
            self._check_open()
            t.tid = self._next_tid
            w = None
            for x in self._workers.values():  # the least busy open worker
                if not x.retiring and (w is None or x.load < w.load):
                    w = x
            if w is None or self._backlog or w.unpublished or w.load >= self._depth:
                try:
                    t.payload = dumps(t.record())  # pickle now: errors raise here
                except Exception as exc:
                    _raise_call_error(fn, args, kwargs, exc)
                self._next_tid += 1
                self._tasks[t.tid] = t
                self._backlog.append(t)
                done = []
                self._dispatch(done)
            else:
                rec = self._record(t, w)
                try:
                    p = w.calls.put_obj(rec, _NO_WAIT)  # raises before anything is recorded
                except Exception as exc:
                    _forget_first_use(w, rec)
                    _raise_call_error(fn, args, kwargs, exc)
                self._next_tid += 1
                f.set_running_or_notify_cancel()
                t.running = True
                self._tasks[t.tid] = t
                self._record_sent(w, (t,))
                if p is not None:
                    w.unpublished.append(p)
                return f
        self._deliver(done)
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
        flag = _SINGLE if single else None
        if chunksize == 1 and self._max_tasks is None:
            # One run for all of them: the dispatcher cuts it into pieces as workers have room.
            # (With max_tasks_per_child, one task per call keeps each worker's count exact.)
            tasks = [_Task(0, _RUN, fn, items, flag, batch, 0, len(items))] if items else []
        elif chunksize == 1:
            tasks = [_Task(0, _CALL, fn, (a,) if single else a, None, batch, i) for i, a in enumerate(items)]
        else:
            tasks = [_Task(0, _CHUNK, fn, items[i:i + chunksize], flag, batch, i // chunksize)
                     for i in range(0, len(items), chunksize)]
        n = 0
        done = []
        with self._lock:
            self._check_open()
            for t in tasks:
                t.tid = self._next_tid
                self._next_tid += t.n
                self._tasks[t.tid] = t
                n += t.n
            batch.pending += n
            self._backlog.extend(tasks)
            self._dispatch(done)
        self._deliver(done)
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

    def _read_here(self, timeout, ready=None):
        """Read and handle results in this thread for up to timeout (until ready() if given), if
        no other thread has the reader role; returns whether it had it. The collector thread
        stays back while callers do this (_HELP_GRACE): results then reach a waiting caller
        without a thread hand-off, and a consumer with results in hand (every _POLL_ITEMS items)
        tops the workers up from its own thread instead of handing the GIL to the collector."""
        if not self._reader.acquire(False):
            return False
        try:
            if ready is None or not ready():
                self._helped_at = time.monotonic()
                self._drain(timeout)
        finally:
            self._reader.release()
        return True

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
        with self._lock:
            if batch.pending == 0:
                return
            keep = collections.deque()
            for t in self._backlog:
                if t.sink is batch:
                    self._tasks.pop(t.tid, None)
                    batch.pending -= t.n
                else:
                    keep.append(t)
            self._backlog = keep

    def shutdown(self, wait=True, *, cancel_futures=False):
        with self._lock:
            first = not self._shutdown
            self._shutdown = True
            if cancel_futures:
                keep = collections.deque()
                for t in self._backlog:
                    if isinstance(t.sink, Future) and not t.running and t.sink.cancel():
                        self._tasks.pop(t.tid, None)
                    else:
                        keep.append(t)
                self._backlog = keep
        if first:
            self._post((0, None, _DIED, None, 0.0))  # the collector notices shutdown
        if wait:
            self._collector.join()
            self._watcher.join()

    def _post(self, rec):
        """A record from the parent itself into the result ring (it must not be lost)."""
        p = self._results.put_obj(rec, _NO_WAIT)
        while p is not None and not self._results.publish(p):
            self._results.wait_writable(p.record_bytes, 0.05)

    # -- delivery (pool lock not held: futures run callbacks) --------------------------------------
    def _deliver(self, done, locked=False):
        """Hand results to their futures and batches. Batches are filled under the pool lock
        (held if locked); futures are set after it is released (they run callbacks), so call
        again with locked=False for those: returns what is left."""
        if not locked and self._events:
            self._flush_events()
        if not done:
            return []
        futures = []
        sinks = set()
        if not locked and all(type(item[0].sink) is not _Batch for item in done):
            futures = done  # only futures: no batch to fill under the pool lock
        else:
            if not locked:
                self._lock.acquire()
            try:
                for item in done:
                    sink = item[0].sink
                    if type(sink) is _Batch:
                        t, ok, value = item
                        sink.pending -= 1
                        sink.deliver(t.index, ok, value)
                        sinks.add(sink)
                    else:
                        futures.append(item)
            finally:
                if not locked:
                    self._lock.release()
            for s in sinks:
                s.flush()
        if locked:
            return futures
        for t, ok, value in futures:
            sink = t.sink
            if not t.running and not sink.set_running_or_notify_cancel():
                continue
            if ok:
                sink.set_result(value)
            else:
                sink.set_exception(value)
        return []

    # -- the collector thread -----------------------------------------------------------------------
    def _collect(self):
        """The collector thread: waits for records without taking them, then takes the reader
        role to handle them (a caller blocked in ``Future.result`` may hold the role instead)."""
        results, reader = self._results, self._reader
        monotonic = time.monotonic
        try:
            while True:
                results.poll(1.0)
                # A caller iterating a map (or waiting on a future) reads results itself between
                # its items; leave them to it unless it has not for a while (its loop is slow).
                idle = monotonic() - self._helped_at
                if idle < _HELP_GRACE:
                    time.sleep(_HELP_GRACE - idle)
                    continue
                with reader:
                    if self._drain(0.0):
                        break
        finally:
            self._stop_workers()

    def _help(self, f, timeout):
        """Wait for f by reading results in this thread (saves the hop through the collector
        thread); returns once another thread has the reader role (the Future's own wait then
        takes over)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not f.done() and not self._finished_flag:
            step = _HELP_STEP if end is None else min(_HELP_STEP, end - time.monotonic())
            if step <= 0 or not self._read_here(step, f.done):
                return

    def _drain(self, timeout):
        """Take the waiting records (up to timeout for the first) and handle them, in ring order
        (reader role held). True once the pool has finished: shut down with nothing left."""
        try:
            recs = self._results.get_objs(_task.RESULT_BATCH, timeout)
        except queue.Empty:
            recs = ()
        except Exception as exc:
            self._result_decode_failed(exc)
            return False
        done = []
        with self._lock:
            workers, tasks, avg = self._workers, self._tasks, self._avg
            weight = _TASK_TIME_WEIGHT  # (a local: read once per batch, not per result)
            sinks = set()
            for rec in recs:
                # The common case inline: a result for a live worker's oldest call.
                wid, tid, status, value, elapsed = rec
                w = workers.get(wid)
                if status != _OK or w is None or not w.sent or w.sent[0] is _PING_MARK:
                    self._avg = avg
                    self._handle(rec, done)
                    avg = self._avg
                    continue
                t = w.sent[0]
                k = t.k
                if t.tid + k != tid:
                    self._avg = avg
                    self._handle(rec, done)
                    avg = self._avg
                    continue
                w.load -= 1
                w.running = None
                avg += (elapsed - avg) * weight
                if t.op == _RUN:  # one of a run's items: the run stays until its last
                    t.k = k = k + 1
                    if k == t.n:
                        w.sent.popleft()
                        w.answered += 1
                        tasks.pop(t.tid, None)
                    sink = t.sink
                    sink.pending -= 1
                    sink.deliver(t.index + k - 1, True, value)
                    sinks.add(sink)
                    continue
                w.sent.popleft()
                w.answered += 1
                if tasks.pop(tid, None) is None:
                    continue
                sink = t.sink
                if type(sink) is _Batch:
                    sink.pending -= 1
                    sink.deliver(t.index, True, value)
                    sinks.add(sink)
                else:
                    done.append((t, True, value))
            self._avg = avg
            for sink in sinks:
                sink.flush()
            if recs:
                self._depth = max(_MIN_DEPTH, min(_MAX_DEPTH, int(_QUEUED_WORK / (avg + _RESULT_COST))))
                self._dispatch(done)
            self._publish_pending()
            finished = (self._shutdown or self._broken is not None) and not self._tasks
            if finished:
                self._finished_flag = True
            done = self._deliver(done, locked=True)
        self._deliver(done)
        return finished

    def _handle(self, rec, done):
        wid, tid, status, value, elapsed = rec
        w = self._workers.get(wid)
        if w is None:
            return
        if status == _OK or status == _ERR:
            if tid is not None:
                # Calls in front of this one that have no answer lost their results to a
                # record that did not unpickle (the worker answers in order).
                while w.sent and w.sent[0] is not _PING_MARK and w.sent[0].tid + w.sent[0].k != tid:
                    self._lost_result(w, done)
            elif w.sent and w.sent[0] is not _PING_MARK:
                # The oldest call did not unpickle in the worker. If it carried its function's
                # first use there, the worker did not learn it: the next call carries it again.
                fn = w.sent[0].fn
                if type(fn) in _TABLED and fn in self._fn_ids:
                    w.known.discard(self._fn_ids[fn])
            if tid is None and w.sent and w.sent[0] is not _PING_MARK and w.sent[0].op == _RUN \
                    and w.sent[0].k == 0:
                # A run that did not unpickle in the worker: its calls go again one at a time, so
                # that only the one at fault fails.
                t = w.sent.popleft()
                w.answered += 1
                w.load -= t.n
                w.running = None
                t.wid = None
                self._backlog.extendleft(reversed(self._split_run(t)))
                return
            t = self._answer(w)
            w.running = None
            if t is None:
                return
            self._avg += (elapsed - self._avg) * _TASK_TIME_WEIGHT
            if status == _OK:
                done.append((t, True, value))
            else:
                exc, tb = value
                exc.__cause__ = RemoteTraceback(tb)
                done.append((t, False, exc))
        elif status == _STARTED:
            if self._task_timeout is not None:
                w.running = (tid, time.monotonic() + self._task_timeout)
                self._wake_watcher()
        elif status == _PONG:
            self._pong(w, done)
        elif status == _DIED:
            self._died(w, done)
        elif status == _INIT_FAILED:
            exc, tb = value
            self._break(f"a worker's initializer raised {type(exc).__name__}: {exc}", RemoteTraceback(tb), done)

    def _answer(self, w):
        """The oldest call w had not answered; its task if still unfinished (a run's item: a
        task of its own)."""
        while w.sent:
            t = w.sent[0]
            if t is _PING_MARK:
                w.sent.popleft()
                w.answered += 1
                continue
            w.load -= 1
            if t.op == _RUN:
                item = t.item(t.k)
                t.k += 1
                if t.k == t.n:
                    w.sent.popleft()
                    w.answered += 1
                    self._tasks.pop(t.tid, None)
                return item
            w.sent.popleft()
            w.answered += 1
            return t if self._tasks.pop(t.tid, None) is not None else None
        return None

    def _result_decode_failed(self, exc):
        # A result that does not unpickle here (say its class exists only in the worker). Which
        # worker sent it is unknown: each worker with calls in flight answers a ping after all
        # its earlier results, and the call left unanswered in front of the ping is the one.
        with self._lock:
            self._lost.append(exc)
            for w in self._workers.values():
                if w.sent:
                    w.sent.append(_PING_MARK)
                    rec = (_PING, None, None, None, None)
                    p = (w.calls.stage(*dumps(rec), 0) if w.unpublished else w.calls.put_obj(rec, _NO_WAIT))
                    if p is not None:
                        w.unpublished.append(p)

    def _lost_result(self, w, done):
        t = self._answer(w)
        if t is None:
            return
        cause = self._lost.pop(0) if self._lost else None
        err = pickle.UnpicklingError(f"the task's result could not be unpickled here: {cause}")
        err.__cause__ = cause
        done.append((t, False, err))

    def _pong(self, w, done):
        # Sent after every earlier answer: calls still unanswered in front of the ping lost theirs.
        while w.sent and w.sent[0] is not _PING_MARK:
            self._lost_result(w, done)
        if w.sent:
            w.sent.popleft()  # the ping
        w.answered += 1

    def _died(self, w, done):
        """w is gone: fail what it had taken, give what it had not to the other workers."""
        proc = w.proc
        proc.join(0)
        code = proc.exitcode
        del self._workers[w.wid]
        # The worker takes a few calls at a time and runs them in order, answering each before the
        # next: if it took any call it did not answer, the oldest unanswered one was running, and
        # the others had not started. Those go to other workers.
        running = w.calls.consumed > w.answered
        retry = []
        for i, t in enumerate(w.sent):
            if t is _PING_MARK:
                continue
            if i == 0 and running:
                if self._tasks.pop(t.tid, None) is not None:
                    if t.op == _RUN:  # its item k was running; the ones after it had not started
                        if t.k + 1 < t.n:
                            rest = t.rest(t.k + 1)
                            self._tasks[rest.tid] = rest
                            retry.append(rest)
                        t = t.item(t.k)
                    if w.timed_out == t.tid:
                        err = TaskTimeout(proc.pid, self._task_timeout)
                    else:
                        err = WorkerDied(proc.pid, code)
                    done.append((t, False, err))
            else:
                t.wid = None
                retry.append(t)
        w.sent.clear()
        w.load = 0
        w.unpublished.clear()
        self._backlog.extendleft(reversed(retry))
        if code is not None and code > 0 and not w.answered and not w.calls.consumed:
            self._early_deaths = 0 if any(o.answered for o in self._workers.values()) else self._early_deaths + 1
            if self._early_deaths >= _EARLY_DEATHS:
                self._break(_early_death_reason(self._early_deaths, proc.pid, code), None, done)
        else:
            self._early_deaths = 0
        busy = self._tasks or not self._shutdown
        replace = self._broken is None and busy and len(self._open_workers()) < self._max_workers
        if w.timed_out is not None:
            self._event(logging.WARNING, "worker %d (pid %d) was killed: its task ran longer than %g s%s",
                        w.wid, proc.pid, self._task_timeout, "; replacing it" if replace else "",
                        event="worker_timed_out", pid=proc.pid, code=code or 0, wid=w.wid)
        elif w.retiring and code == 0:
            self._event(logging.DEBUG, "worker %d (pid %d) retired after max_tasks_per_child=%d tasks%s",
                        w.wid, proc.pid, self._max_tasks, "; replacing it" if replace else "",
                        event="worker_recycled", pid=proc.pid, wid=w.wid)
        elif not self._closed and self._broken is None:  # (a broken pool's workers exit: logged as broken)
            self._event(logging.WARNING, "worker %d (pid %d) died (%s)%s%s", w.wid, proc.pid, _describe_exit(code),
                        " while running a task" if running else "", "; replacing it" if replace else "",
                        event="worker_died", pid=proc.pid, code=code if code is not None else -1, wid=w.wid)
        if replace:
            self._start_worker()
        self._wake_watcher()

    def _break(self, reason, cause, done):
        if self._broken is not None:
            return
        self._broken = reason
        self._event(logging.ERROR, "the pool is broken: %s", reason, event="pool_broken")
        for t in self._tasks.values():
            for item in (t.item(j) for j in range(t.k, t.n)) if t.op == _RUN else (t,):
                err = BrokenProcessPool(reason)
                err.__cause__ = cause
                done.append((item, False, err))
        self._tasks.clear()
        self._backlog.clear()
        for w in self._workers.values():
            w.sent.clear()
            w.load = 0
            w.unpublished.clear()

    def _stop_workers(self):
        with self._lock:
            workers = list(self._workers.values())
            self._closed = True
        for w in workers:
            if w.proc.exitcode is None:
                try:
                    w.calls.put_obj((_STOP, None, None, None, None), _NO_WAIT)
                except Exception:
                    pass
        deadline = time.monotonic() + _task.STOP_GRACE
        for w in workers:
            w.proc.join(max(deadline - time.monotonic(), 0.0))
            if w.proc.exitcode is None:
                w.proc.kill()
                w.proc.join(1.0)
        self._wake_watcher()

    # -- the watcher thread ---------------------------------------------------------------------------
    def _watch(self):
        wake = self._wake_r
        posted = set()
        while True:
            done = []
            with self._lock:
                if self._closed:
                    return
                if self._short_of_workers():
                    if self._spawn_failures >= _SPAWN_ATTEMPTS:
                        err = self._spawn_error
                        self._break(f"no worker could be started ({_SPAWN_ATTEMPTS} attempts): "
                                    f"{type(err).__name__}: {err}", err, done)
                    else:
                        self._start_worker(watcher=True)
                        self._dispatch(done)  # the backlog waited for it
                        self._publish_pending()
                short = self._short_of_workers()
                sentinels = {w.proc.sentinel: w for w in self._workers.values() if w.wid not in posted}
                deadline = min((w.running[1] for w in self._workers.values()
                                if w.running is not None and w.timed_out is None), default=None)
            self._deliver(done)  # and the events logged under the lock
            if done:
                if self._broken is not None:
                    self._post((0, None, _DIED, None, 0.0))  # the collector notices the pool broke
            timeout = _WATCH_PERIOD if deadline is None else min(max(deadline - time.monotonic(), 0.0), _WATCH_PERIOD)
            if short:  # a replacement failed to start: try again soon
                timeout = min(timeout, _SPAWN_RETRY)
            ready = _mp_connection.wait([wake, *sentinels], timeout)
            if wake in ready:
                try:
                    os.read(wake, 4096)
                except BlockingIOError:
                    pass
            if deadline is not None:
                now = time.monotonic()
                with self._lock:
                    for w in self._workers.values():
                        if w.running is not None and w.timed_out is None and w.running[1] <= now:
                            w.timed_out = w.running[0]
                            w.proc.kill()
            for s in ready:
                w = sentinels.get(s)
                if w is not None:
                    posted.add(w.wid)
                    self._post((w.wid, None, _DIED, None, 0.0))


def _early_death_reason(n, pid, code):
    """The broken pool's reason when workers keep dying before their first call."""
    reason = (f"{n} workers in a row exited before taking a task (the last, pid {pid}: "
              f"{_describe_exit(code)}); see their error output above")
    if code == 1:
        reason += (". If the pool is made at the top level of the main script, put that code under "
                   "'if __name__ == \"__main__\":' (workers import the main module, as under spawn)")
    return reason


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
