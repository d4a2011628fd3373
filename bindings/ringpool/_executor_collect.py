"""ringpool.Executor's collector: reads the result ring and hands results to their tasks.

Only one thread reads the result ring at a time: the one holding the *reader role* (`reader`, a
lock). That is the collector thread (`run`), or a caller blocked in ``Future.result()`` or
iterating a map whose next result has not arrived (`read_here`, `help`): results then reach it
without a thread hand-off, and the collector thread stays back while callers have read within the
last _HELP_GRACE seconds. The collector owns the reader role, `helped_at` and `lost` (decode errors
of results not yet matched to their task: reader role held); handling a batch takes the pool lock.
"""
from __future__ import annotations

import pickle
import queue
import threading
import time

from ._errors import RemoteTraceback
from ._executor_tasks import (_DIED, _ERR, _INIT_FAILED, _OK, _PING_MARK, _PONG,
                              _QUEUED_WORK, _RESULT_COST, _RUN, _STARTED, _TASK_TIME_WEIGHT, _Batch, _task)

# A caller waiting for a result reads the result ring itself, in steps of _HELP_STEP seconds; the
# collector thread leaves the ring to it while it has read within _HELP_GRACE seconds.
_HELP_STEP = 0.05
_HELP_GRACE = 0.003


class _Collector:
    def __init__(self, state, dispatcher, workers):
        self._s = state
        self._dispatcher = dispatcher
        self._workers = workers
        self.reader = threading.Lock()  # the role of taking and handling result records
        self.helped_at = 0.0            # when a waiting caller last read results itself
        self.lost = []                  # decode errors of results not yet matched to their task

    # -- who reads ------------------------------------------------------------------------------
    def run(self):
        """The collector thread: waits for records without taking them, then takes the reader
        role to handle them (a caller blocked in ``Future.result`` may hold the role instead)."""
        results, reader = self._s.results, self.reader
        monotonic = time.monotonic
        try:
            while True:
                results.poll(1.0)
                # A caller iterating a map (or waiting on a future) reads results itself between
                # its items; leave them to it unless it has not for a while (its loop is slow).
                idle = monotonic() - self.helped_at
                if idle < _HELP_GRACE:
                    time.sleep(_HELP_GRACE - idle)
                    continue
                with reader:
                    if self.drain(0.0):
                        break
        finally:
            self._workers.stop_all()

    def read_here(self, timeout, ready=None):
        """Read and handle results in this thread for up to timeout (until ready() if given), if
        no other thread has the reader role; returns whether it had it. The collector thread
        stays back while callers do this (_HELP_GRACE): results then reach a waiting caller
        without a thread hand-off, and a consumer with results in hand tops the workers up from
        its own thread instead of handing the GIL to the collector."""
        if not self.reader.acquire(False):
            return False
        try:
            if ready is None or not ready():
                self.helped_at = time.monotonic()
                self.drain(timeout)
        finally:
            self.reader.release()
        return True

    def help(self, f, timeout):
        """Wait for f by reading results in this thread (saves the hop through the collector
        thread); returns once another thread has the reader role (the Future's own wait then
        takes over)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not f.done() and not self._s.finished:
            step = _HELP_STEP if end is None else min(_HELP_STEP, end - time.monotonic())
            if step <= 0 or not self.read_here(step, f.done):
                return

    # -- handling (reader role held) ------------------------------------------------------------
    def drain(self, timeout):
        """Take the waiting records (up to timeout for the first) and handle them, in ring order.
        True once the pool has finished: shut down with nothing left."""
        s = self._s
        try:
            recs = s.results.get_objs(_task.RESULT_BATCH, timeout)
        except queue.Empty:
            recs = ()
        except Exception as exc:
            self._decode_failed(exc)
            return False
        done = []
        with s.lock:
            workers, tasks, avg = s.workers, s.tasks, s.avg
            weight = _TASK_TIME_WEIGHT  # (a local: read once per batch, not per result)
            sinks = set()
            for rec in recs:
                # The common case inline: a result for a live worker's oldest call.
                wid, tid, status, value, elapsed = rec
                w = workers.get(wid)
                if status != _OK or w is None or not w.sent or w.sent[0] is _PING_MARK:
                    s.avg = avg
                    self._handle(rec, done)
                    avg = s.avg
                    continue
                t = w.sent[0]
                k = t.k
                if t.tid + k != tid:
                    s.avg = avg
                    self._handle(rec, done)
                    avg = s.avg
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
            s.avg = avg
            for sink in sinks:
                sink.flush()
            if recs:
                s.depth = max(s.min_depth, min(s.max_depth, int(_QUEUED_WORK / (avg + _RESULT_COST))))
                self._dispatcher.dispatch(done)
            self._dispatcher.publish_pending()
            finished = (s.shutdown or s.broken is not None) and not s.tasks
            if finished:
                s.finished = True
            done = s.deliver(done, locked=True)
        s.deliver(done)
        return finished

    def _handle(self, rec, done):
        """Any record but the common case (pool lock held)."""
        s = self._s
        wid, tid, status, value, elapsed = rec
        w = s.workers.get(wid)
        if w is None:
            return
        if status == _OK or status == _ERR:
            head = w.sent[0] if w.sent and w.sent[0] is not _PING_MARK else None
            if tid is not None:
                # Calls in front of this one that have no answer lost their results to a
                # record that did not unpickle (the worker answers in order).
                while w.sent and w.sent[0] is not _PING_MARK and w.sent[0].tid + w.sent[0].k != tid:
                    self._lost_result(w, done)
            elif head is not None:
                # The oldest call did not unpickle in the worker. If it carried its function's
                # first use there, the worker did not learn it: the next call carries it again.
                self._dispatcher.forget_fn(w, head.fn)
                if head.op == _RUN and head.k == 0:
                    # A run that did not unpickle in the worker: its calls go again one at a
                    # time, so that only the one at fault fails.
                    w.sent.popleft()
                    w.answered += 1
                    w.load -= head.n
                    w.running = None
                    head.wid = None
                    s.backlog.extendleft(reversed(self._dispatcher.split_run(head)))
                    return
            t = self._answer(w)
            w.running = None
            if t is None:
                return
            s.avg += (elapsed - s.avg) * _TASK_TIME_WEIGHT
            if status == _OK:
                done.append((t, True, value))
            else:
                exc, tb = value
                exc.__cause__ = RemoteTraceback(tb)
                done.append((t, False, exc))
        elif status == _STARTED:
            if s.task_timeout is not None:
                w.running = (tid, time.monotonic() + s.task_timeout)
                s.wake_watcher()
        elif status == _PONG:
            # Sent after every earlier answer: calls still unanswered in front of the ping lost theirs.
            while w.sent and w.sent[0] is not _PING_MARK:
                self._lost_result(w, done)
            if w.sent:
                w.sent.popleft()  # the ping
            w.answered += 1
        elif status == _DIED:
            self._workers.died(w, done)
        elif status == _INIT_FAILED:
            exc, tb = value
            self._workers.break_pool(f"a worker's initializer raised {type(exc).__name__}: {exc}",
                                     RemoteTraceback(tb), done)

    def _answer(self, w):
        """The oldest call w had not answered; its task if still unfinished (a run's item: a
        task of its own)."""
        tasks = self._s.tasks
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
                    tasks.pop(t.tid, None)
                return item
            w.sent.popleft()
            w.answered += 1
            return t if tasks.pop(t.tid, None) is not None else None
        return None

    def _decode_failed(self, exc):
        # A result that does not unpickle here (say its class exists only in the worker). Which
        # worker sent it is unknown: each worker with calls in flight answers a ping after all
        # its earlier results, and the call left unanswered in front of the ping is the one.
        with self._s.lock:
            self.lost.append(exc)
            self._dispatcher.ping_busy()

    def _lost_result(self, w, done):
        t = self._answer(w)
        if t is None:
            return
        cause = self.lost.pop(0) if self.lost else None
        err = pickle.UnpicklingError(f"the task's result could not be unpickled here: {cause}")
        err.__cause__ = cause
        done.append((t, False, err))
