"""ringpool.Executor's shared data: the task records' names, the tasks and workers as the parent
tracks them, and ``_State``, every field the Executor's threads share (under the pool lock).

The Executor is five parts (docs/design/pool.md, "The Executor"), each in its own module:

    executor.py            Executor: the public API (submit, map, imap, ..., shutdown) and the
                           consumer side of map/imap (reading a batch's results in order)
    _executor_dispatch.py  _Dispatcher: backlog -> workers' call rings (callers' threads, under
                           the pool lock); the function table per worker
    _executor_collect.py   _Collector: the result ring's reader (its thread, or a waiting caller)
    _executor_watch.py     _Watcher: the thread watching sentinels and deadlines
    _executor_workers.py   _Workers: starting workers, a worker's death, a broken pool, stopping
    _executor_tasks.py     this module: what they share

The task records, their kinds, field positions and limits have one home, task.hpp
(proto/include/ringpool/proto/task.hpp, drawn in docs/design/protocol.md "Task records"), shared
with the C++ ringpool::Pool and read here through _core.task.
  call records (parent -> worker): (op, tid, fn, args, kwargs). A RUN record carries a map's calls
    to one worker: args is a list of argument tuples, item k has task id tid + k, and each item is
    answered with its own result record, as a CALL is. A RUN or CHUNK record whose kwargs is
    SINGLE carries single arguments instead of tuples (a map over one iterable: no 1-tuples to
    build, pickle and memoize).
  result records (-> parent): (wid, tid, status, value, elapsed)
The hot paths build records as tuple displays and read them by unpacking, in task.hpp's field
order: _pool_worker (the worker loop) checks that order at import.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading

from . import _core

_log = logging.getLogger("ringpool.executor")

_task = _core.task
_CALL, _CHUNK, _PING, _STOP, _RUN = _task.CALL, _task.CHUNK, _task.PING, _task.STOP, _task.RUN
_OK, _ERR, _STARTED, _PONG, _INIT_FAILED, _DIED = (_task.OK, _task.ERR, _task.STARTED, _task.PONG,
                                                   _task.INIT_FAILED, _task.DIED)
_SINGLE = _task.SINGLE
_CALL_FN, _RESULT_ELAPSED = _task.CALL_FN, _task.RESULT_ELAPSED
_CALL_CAPACITY = _task.CALL_CAPACITY
_RESULT_CAPACITY = _task.RESULT_CAPACITY
# The depth bound (unanswered calls per worker) and the moving average of reported task times it
# comes from: task.hpp's "tuning both pools share", one definition for both languages.
_MIN_DEPTH, _MAX_DEPTH = _task.MIN_DEPTH, _task.MAX_DEPTH
_QUEUED_WORK = _task.QUEUED_WORK  # seconds of work to keep queued per worker
_RESULT_COST = _task.RESULT_COST  # the parent's own time per result, counted in the bound
_TASK_TIME_WEIGHT = _task.TASK_TIME_WEIGHT  # of each reported task time in the moving average
# The bound's limits a pool is made with (a test raises them to see a map go as one record).
_DEPTH_BOUNDS = (_MIN_DEPTH, _MAX_DEPTH)
_NO_WAIT = _core.NO_BACKPRESSURE


class _Task:
    """A call, a chunk, or a run: n consecutive calls of a map (op RUN), items index..index+n-1 of
    the argument tuples in args, with task ids tid..tid+n-1, delivered to their batch one by one.
    sink: the task's Future, or the _Batch of its map."""

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


# In a worker's `sent` queue: a PING record sent (its PONG answers it).
_PING_MARK = object()


class _Worker:
    """One worker process as the parent tracks it (every field under the pool lock)."""

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
    """Results of one map/imap_unordered call, delivered by the collector without Futures.
    `done` and `pending` are written under the pool lock; the consumer reads `done` without it
    (a dict's pop and a deque's popleft are atomic under the GIL) and waits on `cond`."""

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


class _State:
    """What the Executor's parts share. Every field is read and written under `lock` (the pool
    lock), except where its comment says otherwise. Threads: callers (submit, map, iterating
    results, shutdown), the collector thread (or a caller holding the reader role), the watcher
    thread; each part's module says which of these run it."""

    def __init__(self, max_workers, initializer, initargs, max_tasks, task_timeout, ctx):
        self.lock = threading.Lock()
        # Set at construction, then only read (no lock needed):
        self.max_workers = max_workers
        self.initializer, self.initargs = initializer, initargs
        self.max_tasks = max_tasks          # max_tasks_per_child, or None
        self.task_timeout = task_timeout    # seconds, or None
        self.ctx = ctx                      # starts the workers' processes
        self.results = _core.Channel.create(_RESULT_CAPACITY)  # every worker's results (and DIED posts)
        # The scheduling state:
        self.workers = {}                   # wid -> _Worker
        self.tasks = {}                     # tid -> _Task, every task not finished
        self.backlog = collections.deque()  # tasks waiting for room in a worker
        self.next_tid = 1                   # task ids; a run takes one per item
        self.wids = itertools.count(1)
        self.avg = _task.INITIAL_TASK_TIME  # moving average of the task time the workers report
        self.min_depth, self.max_depth = _DEPTH_BOUNDS
        self.depth = self.min_depth         # unanswered calls per worker at most
        # The pool's life:
        self.broken = None                  # the reason, once broken
        self.shutdown = False
        self.closed = False                 # workers stopped
        self.finished = False               # shut down (or broken) with nothing left: read without lock
        self.spawn_failures = 0             # replacement starts that failed in a row
        self.spawn_error = None             # the last of them
        self.early_deaths = 0               # workers dead before their first call, in a row
        # (level, message, args) to log once the lock is released: appended under the lock, taken
        # by any thread without it (deque operations are atomic).
        self.events = collections.deque()
        self.wake_watcher = None            # set by the _Watcher: wakes its thread (any thread)

    def event(self, level, msg, *args):
        """Log msg once the pool lock is released (pool lock held): see flush_events."""
        if _log.isEnabledFor(level):
            self.events.append((level, msg, args))

    def flush_events(self):
        """Log the events queued under the pool lock (pool lock not held; any thread)."""
        events = self.events
        while events:
            try:
                level, msg, args = events.popleft()
            except IndexError:  # another thread took the last one
                return
            _log.log(level, msg, *args)

    def open_workers(self):
        return [w for w in self.workers.values() if not w.retiring]

    def short_of_workers(self):
        """Fewer open workers than asked for, with work to do or to come (pool lock held)."""
        return (self.broken is None and not self.closed and len(self.open_workers()) < self.max_workers
                and (self.tasks or not self.shutdown))

    def deliver(self, done, locked=False):
        """Hand results to their futures and batches: done holds (task, ok, value). Batches are
        filled under the pool lock (held if locked); futures are set after it is released (they
        run callbacks), so call again with locked=False for those: returns what is left."""
        if not locked and self.events:
            self.flush_events()
        if not done:
            return []
        futures = []
        sinks = set()
        if not locked and all(type(item[0].sink) is not _Batch for item in done):
            futures = done  # only futures: no batch to fill under the pool lock
        else:
            if not locked:
                self.lock.acquire()
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
                    self.lock.release()
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

    def post(self, rec):
        """A record from the parent itself into the result ring (it must not be lost)."""
        p = self.results.put_obj(rec, _NO_WAIT)
        while p is not None and not self.results.publish(p):
            self.results.wait_writable(p.record_bytes, 0.05)
