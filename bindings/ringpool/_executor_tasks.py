"""ringpool.Executor's shared data: the task records' names, the calls and workers as the parent
tracks them, and ``_State``, every field the Executor's threads share (under the pool lock).

The Executor is six parts (docs/design/pool.md, "The Executor"), each in its own module:

    executor.py            Executor: the public API (submit, map, imap, ..., shutdown) and the
                           consumer side of map/imap (reading a batch's results in order)
    _executor_dispatch.py  _Dispatcher: writes the records the scheduler assigns into the
                           workers' call rings (callers' threads, under the pool lock); the
                           function table per worker
    _executor_collect.py   _Collector: the result ring's reader (its thread, or a waiting caller)
    _executor_watch.py     _Watcher: the thread watching sentinels and deadlines
    _executor_workers.py   _Workers: starting workers, a worker's death, a broken pool, stopping
    _executor_tasks.py     this module: what they share
The scheduling rules themselves (which worker gets which calls, the depth bound, in-flight
bookkeeping, deaths, timeouts, max_tasks_per_child budgets) are not here: they are
``_core.Scheduler``, the C++ detail::Scheduler the C++ ringpool::Pool uses too, in `_State.sched`.
It knows a call as (group, index): a submit is a group of one, a map a group of n.

The task records, their kinds, field positions and limits have one home, task.hpp
(proto/include/ringpool/proto/task.hpp, drawn in docs/design/protocol.md "Task records"), shared
with the C++ ringpool::Pool and read here through _core.task.
  call records (parent -> worker): (op, tid, fn, args, kwargs). A RUN record carries a map's calls
    to one worker: args is a list of argument tuples, item k has task id tid + k, and each item is
    answered with its own result record, as a CALL is. A RUN or CHUNK record whose kwargs is
    SINGLE carries single arguments instead of tuples (a map over one iterable: no 1-tuples to
    build, pickle and memoize).
  result records (-> parent): (wid, tid, status, value, elapsed), read by the scheduler at
    task.hpp's field positions (and unpacked here in that order for the few it hands back).
"""
from __future__ import annotations

import collections
import itertools
import logging
import sys
import threading
import traceback

from . import _core

_log = logging.getLogger("ringpool.executor")

_task = _core.task
_CALL, _CHUNK, _PING, _STOP, _RUN = _task.CALL, _task.CHUNK, _task.PING, _task.STOP, _task.RUN
_OK, _ERR, _STARTED, _PONG, _INIT_FAILED, _DIED = (_task.OK, _task.ERR, _task.STARTED, _task.PONG,
                                                   _task.INIT_FAILED, _task.DIED)
_SINGLE = _task.SINGLE
_CALL_CAPACITY = _task.CALL_CAPACITY
_RESULT_CAPACITY = _task.RESULT_CAPACITY
# The depth bound's limits (unanswered calls per worker; the bound itself follows the reported task
# times, in the scheduler: task.hpp's depth_for). A test raises them to see a map go as one record.
_MIN_DEPTH, _MAX_DEPTH = _task.MIN_DEPTH, _task.MAX_DEPTH
_DEPTH_BOUNDS = (_MIN_DEPTH, _MAX_DEPTH)
_NO_WAIT = _core.NO_BACKPRESSURE


class _Group:
    """Calls submitted together, as the scheduler knows them: (group number, index) per call. A
    submit is a group of one CALL; a map a group of n items (RUN: consecutive items may share a RUN
    record; CALL with `each`: one CALL record per item, under max_tasks_per_child) or of n chunks
    (CHUNK, `chunksize` items each). sink: the submit's Future, or the map's _Batch. Pool lock."""

    __slots__ = ("op", "fn", "args", "kwargs", "sink", "each", "chunksize", "left", "running")

    def __init__(self, op, fn, args, kwargs, sink, left, each=False, chunksize=1):
        self.op, self.fn, self.args, self.kwargs, self.sink = op, fn, args, kwargs, sink
        self.each = each            # args is the list of the items' arguments, one CALL per item
        self.chunksize = chunksize  # CHUNK: items per call
        self.left = left            # outcomes still owed (the group is forgotten at 0)
        self.running = False        # a submit's Future was set running (it was sent)

    def call_args(self, index, count):
        """What the record of items index..index+count-1 carries in its args slot (kwargs slot:
        `self.kwargs` except for `each` items, which carry None)."""
        op = self.op
        if op == _RUN:
            return self.args[index:index + count]
        if op == _CHUNK:
            size = self.chunksize
            return self.args[index * size:(index + 1) * size]
        if self.each:
            a = self.args[index]
            return (a,) if self.kwargs == _SINGLE else a
        return self.args


class _Worker:
    """One worker process as the parent knows it (the scheduler keeps its calls). Pool lock."""

    __slots__ = ("wid", "proc", "calls", "unpublished", "known")

    def __init__(self, wid, proc, calls):
        self.wid, self.proc, self.calls = wid, proc, calls
        self.unpublished = collections.deque()  # Pendings accepted while its ring was full, in order
        self.known = set()                      # numbers of the functions it has been sent


class _Batch:
    """Results of one map/imap_unordered call, delivered by the collector without Futures.
    `done` and `pending` are written under the pool lock; the consumer reads `done` without it
    (a dict's pop and a deque's popleft are atomic under the GIL) and waits on `cond`."""

    def __init__(self, ordered):
        self.groups = []    # its groups' numbers (to cancel what is left when its consumer stops)
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
        # The scheduling rules and their state (backlog, calls in flight per worker, depth bound,
        # deadlines, budgets): detail::Scheduler, shared with the C++ ringpool::Pool.
        min_depth, max_depth = _DEPTH_BOUNDS
        self.sched = _core.Scheduler(max_workers, max_tasks or 0, task_timeout, min_depth, max_depth)
        self.workers = {}                   # wid -> _Worker
        self.groups = {}                    # group number -> _Group, every group with outcomes owed
        self.next_group = 1
        self.wids = itertools.count(1)
        # The pool's life:
        self.broken = None                  # the reason, once broken
        self.shutdown = False
        self.closed = False                 # workers stopped
        self.finished = False               # shut down (or broken) with nothing left: read without lock
        self.answered = False               # some worker has answered a call (the early-death rule)
        self.spawn_failures = 0             # replacement starts that failed in a row
        self.spawn_error = None             # the last of them
        self.early_deaths = 0               # workers dead before their first call, in a row
        # (level, message, args) to log once the lock is released: appended under the lock, taken
        # by any thread without it (deque operations are atomic).
        self.events = collections.deque()
        self.wake_watcher = None            # set by the _Watcher: wakes its thread (any thread)

    def settle(self, g, index, ok, value, done):
        """Call (g, index) ended: its outcome goes to `done` (delivered by `deliver`)."""
        gr = self.groups[g]
        gr.left -= 1
        if not gr.left:
            del self.groups[g]
        done.append((gr, index, ok, value))

    def event(self, level, msg, *args, event, pid=-1, code=0, wid=0):
        """Log msg once the pool lock is released (pool lock held): see flush_events. The record
        gets the attributes the C++ runtime's records have (docs/design/logging.md): ``event``
        (its name in runtime/include/ringpool/log.hpp), ``ringpool_pid``, ``exit_code``, ``worker_id``."""
        if _log.isEnabledFor(level):
            self.events.append((level, msg, args, {"event": event, "ringpool_pid": pid, "exit_code": code,
                                                   "worker_id": wid}))

    def flush_events(self):
        """Log the events queued under the pool lock (pool lock not held; any thread)."""
        events = self.events
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

    def short_of_workers(self):
        """Fewer open workers than asked for (a death, a retirement), with work to do or to come
        (pool lock held). A bool, never one of the operands: the watcher acts on the verdict after
        releasing the lock, and a live object (the task dict it once returned) could change its
        truth meanwhile (pool.md, "Watcher")."""
        return bool(self.broken is None and not self.closed and self.sched.shortfall() > 0
                    and (self.sched.outstanding > 0 or not self.shutdown))

    def deliver(self, done, locked=False):
        """Hand outcomes to their futures and batches: done holds (group, index, ok, value).
        Batches are filled under the pool lock (held if locked); futures are set after it is
        released (they run callbacks), so call again with locked=False for those: returns what is
        left."""
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
                        _, index, ok, value = item
                        sink.pending -= 1
                        sink.deliver(index, ok, value)
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
        for gr, _, ok, value in futures:
            sink = gr.sink
            if not gr.running and not sink.set_running_or_notify_cancel():
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
