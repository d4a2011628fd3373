"""ringpool.Executor's watcher thread: notices deaths and deadlines, retries failed starts.

It blocks on the workers' sentinels (pidfds) and a wake-up pipe, with a timeout at the earliest
task deadline. For a worker that ended it posts a DIED record into the result ring, so that the
collector handles the death after every result the worker published before it (ring order); it
kills a worker whose task ran past its deadline; while the pool is short of workers (a replacement
failed to start) it tries again every _SPAWN_RETRY seconds and breaks the pool after
_SPAWN_ATTEMPTS failures. It owns the wake-up pipe's read end and `posted` (the workers whose DIED
it posted); it reads and changes the pool's _State under the pool lock.

Any thread that changes what the watcher waits for (a worker started or gone, a STARTED record
with a task timeout, the pool closed) calls `wake()` after the change, under the pool lock; the
watcher reads what it acts on (short of workers, sentinels, the next deadline) under the lock
as plain values, and waits with no timeout when none is due: nothing else makes it look again.
"""
from __future__ import annotations

import os
import time
import weakref
from multiprocessing import connection as _mp_connection

from ._executor_tasks import _DIED
from ._executor_workers import _SPAWN_ATTEMPTS, _SPAWN_RETRY


def _close_fds(*fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _Watcher:
    """The watcher thread (`run`) and its wake-up pipe (`wake`, any thread)."""

    def __init__(self, state, dispatcher, workers):
        self._s = state
        self._dispatcher = dispatcher
        self._workers = workers
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self.posted = set()  # wids whose DIED record was posted (watcher thread only)

    def wake(self):
        """Make the watcher look again (any thread)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: it will wake anyway

    def run(self):
        s = self._s
        wake = self._wake_r
        posted = self.posted
        while True:
            done = []
            with s.lock:
                if s.closed:
                    return
                if s.short_of_workers():
                    if s.spawn_failures >= _SPAWN_ATTEMPTS:
                        err = s.spawn_error
                        self._workers.break_pool(f"no worker could be started ({_SPAWN_ATTEMPTS} attempts): "
                                                 f"{type(err).__name__}: {err}", err, done)
                    else:
                        self._workers.start(watcher=True)
                        self._dispatcher.dispatch(done)  # the backlog waited for it
                        self._dispatcher.publish_pending()
                short = s.short_of_workers()
                sentinels = {w.proc.sentinel: w for w in s.workers.values() if w.wid not in posted}
                deadline = None
                if s.task_timeout is not None:  # kill the workers whose task ran out of time
                    kill, deadline = s.sched.expire()
                    for wid in kill:
                        s.workers[wid].proc.kill()
            s.deliver(done)  # and the events logged under the lock
            if done and s.broken is not None:
                s.post((0, None, _DIED, None, 0.0))  # the collector notices the pool broke
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if short:  # a replacement failed to start: try again soon
                timeout = _SPAWN_RETRY if timeout is None else min(timeout, _SPAWN_RETRY)
            ready = _mp_connection.wait([wake, *sentinels], timeout)
            if wake in ready:
                try:
                    os.read(wake, 4096)
                except BlockingIOError:
                    pass
            ended = [sentinels[fd] for fd in ready if fd in sentinels]
            if ended:
                with s.lock:
                    for w in ended:
                        s.sched.exited(w.wid)  # no more calls go to it
                for w in ended:
                    posted.add(w.wid)
                    s.post((w.wid, None, _DIED, None, 0.0))
