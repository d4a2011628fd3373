"""ringpool.Executor's collector: reads the result ring and hands results to their tasks.

Only one thread reads the result ring at a time: the one holding the *reader role* (`reader`, a
lock). That is the collector thread (`run`), or a caller blocked in ``Future.result()`` or
iterating a map whose next result has not arrived (`read_here`, `help`): results then reach it
without a thread hand-off, and the collector thread stays back while callers have read within the
last _HELP_GRACE seconds. The collector owns the reader role, `helped_at` and `lost` (decode errors
of results not yet matched to their task, in order: pool lock); handling a batch takes the pool
lock. Matching results to calls, finding lost ones and the depth bound are the scheduler's
(`_State.sched.answers`, once per batch); this part hands the outcomes to futures and batches and
handles the records about processes (DIED, INIT_FAILED).
"""
from __future__ import annotations

import pickle
import queue
import threading
import time

from ._errors import RemoteTraceback
from ._executor_tasks import _DIED, _OK, _Batch, _task

# A caller waiting for a result reads the result ring itself, in steps of _HELP_STEP seconds; the
# collector thread leaves the ring to it while it has read within _HELP_GRACE seconds.
_HELP_STEP = 0.05
_HELP_GRACE = 0.003


class _Collector:
    """The result ring's reader (reader role held in drain and below; pool lock while handling)."""

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
            recs = []
        except Exception as exc:
            self._decode_failed(exc)
            return False
        done = []
        with s.lock:
            if recs:
                self._handle(recs, done)
                self._dispatcher.dispatch(done)
            self._dispatcher.publish_pending()
            finished = (s.shutdown or s.broken is not None) and not s.sched.outstanding
            if finished:
                s.finished = True
            done = s.deliver(done, locked=True)
        s.deliver(done)
        return finished

    def _handle(self, recs, done):
        """A batch of result records, in order (pool lock held). The scheduler reads them (by
        task.hpp's field positions) up to each DIED or INIT_FAILED, which are handled here."""
        s = self._s
        sched, groups = s.sched, s.groups
        start, n = 0, len(recs)
        while True:
            stop, answered, failed, unread, started = sched.answers(recs, start)
            if answered:
                s.answered = True
                sinks = set()
                for g, i, status, value in answered:
                    gr = groups[g]
                    gr.left -= 1
                    if not gr.left:
                        del groups[g]
                    sink = gr.sink
                    if status == _OK:
                        if type(sink) is _Batch:
                            sink.pending -= 1
                            sink.deliver(i, True, value)
                            sinks.add(sink)
                        else:
                            done.append((gr, i, True, value))
                    else:
                        exc, tb = value
                        exc.__cause__ = RemoteTraceback(tb)
                        done.append((gr, i, False, exc))
                for sink in sinks:
                    sink.flush()
            if unread:
                for wid, g in unread:
                    # The worker could not unpickle the record: if it carried its function's first
                    # use there, the worker did not learn it, and the next record carries it again.
                    w = s.workers.get(wid)
                    gr = groups.get(g)
                    if w is not None and gr is not None:
                        self._dispatcher.forget_fn(w, gr.fn)
            if failed:
                for g, i, _fate, _why in failed:  # results that did not unpickle here (LOST)
                    cause = self.lost.pop(0) if self.lost else None
                    err = pickle.UnpicklingError(f"the task's result could not be unpickled here: {cause}")
                    err.__cause__ = cause
                    s.settle(g, i, False, err, done)
            if started:
                s.wake_watcher()  # a new deadline
            if stop == n:
                return
            wid, _, status, value, _ = recs[stop]
            w = s.workers.get(wid)
            if w is not None:
                if status == _DIED:
                    self._workers.died(w, done)
                else:  # INIT_FAILED
                    exc, tb = value
                    self._workers.break_pool(f"a worker's initializer raised {type(exc).__name__}: {exc}",
                                             RemoteTraceback(tb), done)
            start = stop + 1

    def _decode_failed(self, exc):
        # A result that does not unpickle here (say its class exists only in the worker). Which
        # worker sent it is unknown: each worker with calls in flight answers a ping after all
        # its earlier results, and the call left unanswered in front of the ping is the one.
        s = self._s
        with s.lock:
            self.lost.append(exc)
            self._dispatcher.ping(s.sched.result_gap(f"{type(exc).__name__}: {exc}"))
