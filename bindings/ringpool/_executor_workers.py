"""ringpool.Executor's workers: starting one, handling one's death, breaking the pool, stopping all.

Not a thread: `start` and `died` run under the pool lock in the thread that needs them (the
constructor, the dispatcher when a max_tasks_per_child budget is spent, the collector handling a
DIED record, the watcher retrying a failed start); `stop_all` runs in the collector thread as it
ends. The workers themselves live in the pool's _State (`workers`); this part owns nothing else.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures.process import BrokenProcessPool

from . import _core
from . import _pool_worker
from ._errors import TaskTimeout, WorkerDied
from ._errors import describe_exit as _describe_exit
from ._executor_tasks import _CALL_CAPACITY, _NO_WAIT, _STOP, _Worker

_task = _core.task
# A replacement worker that fails to start is retried (by the watcher) every _SPAWN_RETRY seconds;
# after _SPAWN_ATTEMPTS failures in a row the pool is broken (BrokenProcessPool), never left hanging.
_SPAWN_RETRY = 0.2
_SPAWN_ATTEMPTS = 25
# Workers that exit with an error status before taking a call while no worker has answered (a
# script that makes the pool at module level, without the __main__ guard, kills each worker in its
# start-up): after this many in a row the pool is broken instead of replacing them forever.
_EARLY_DEATHS = 3
_TIMED_OUT = _core.Scheduler.TIMED_OUT


class _Workers:
    """Worker lifecycle (pool lock held in every method but stop_all)."""

    def __init__(self, state):
        self._s = state

    def start(self, initial=False, watcher=False):
        """Start one worker (True if it started). A replacement that fails to start (its zygote was killed at that
        moment, say) is not an error here: the watcher thread tries again shortly, and breaks the
        pool only after _SPAWN_ATTEMPTS failures in a row. At construction the error raises."""
        s = self._s
        wid = next(s.wids)
        calls = _core.Channel.create(_CALL_CAPACITY)
        proc = s.ctx.Process(
            target=_pool_worker.serve_executor,
            args=(wid, _pool_worker.ChannelRef(calls), _pool_worker.ChannelRef(s.results), s.initializer,
                  s.initargs, s.max_tasks, s.task_timeout is not None),
            name=f"ringpool-executor-{wid}", daemon=True)
        try:
            proc.start()
        except Exception as exc:
            if initial:
                raise
            s.spawn_failures += 1
            s.spawn_error = exc
            s.event(logging.WARNING, "a replacement worker failed to start (attempt %d of %d): %s: %s",
                    s.spawn_failures, _SPAWN_ATTEMPTS, type(exc).__name__, exc, event="spawn_failed", wid=wid)
            if not watcher:
                s.wake_watcher()  # it retries (on its own schedule)
            return False
        s.spawn_failures = 0
        s.workers[wid] = _Worker(wid, proc, calls)
        s.sched.add_worker(wid)
        s.event(logging.DEBUG, "worker %d started (pid %d)", wid, proc.pid,
                event="worker_started" if initial else "worker_replaced", pid=proc.pid, wid=wid)
        s.wake_watcher()
        return True

    def died(self, w, done):
        """w is gone, every result it published handled: the scheduler fails the call it was
        running (if any) and gives the ones it had not started to the other workers."""
        s = self._s
        proc = w.proc
        proc.join(0)
        code = proc.exitcode
        del s.workers[w.wid]
        w.unpublished.clear()
        consumed = w.calls.consumed
        running, timed_out, retiring, failed, _ = s.sched.died(w.wid, consumed)
        for g, i, fate, _why in failed:
            if fate == _TIMED_OUT:
                err = TaskTimeout(proc.pid, s.task_timeout)
            else:
                err = WorkerDied(proc.pid, code)
            s.settle(g, i, False, err, done)
        if code is not None and code > 0 and not consumed:
            s.early_deaths = 0 if s.answered else s.early_deaths + 1
            if s.early_deaths >= _EARLY_DEATHS:
                self.break_pool(_early_death_reason(s.early_deaths, proc.pid, code), None, done)
        else:
            s.early_deaths = 0
        replace = s.short_of_workers()
        if timed_out:
            s.event(logging.WARNING, "worker %d (pid %d) was killed: its task ran longer than %g s%s",
                    w.wid, proc.pid, s.task_timeout, "; replacing it" if replace else "",
                    event="worker_timed_out", pid=proc.pid, code=code or 0, wid=w.wid)
        elif retiring and code == 0:
            s.event(logging.DEBUG, "worker %d (pid %d) retired after max_tasks_per_child=%d tasks%s",
                    w.wid, proc.pid, s.max_tasks, "; replacing it" if replace else "",
                    event="worker_recycled", pid=proc.pid, wid=w.wid)
        elif not s.closed and s.broken is None:  # (a broken pool's workers exit: logged as broken)
            s.event(logging.WARNING, "worker %d (pid %d) died (%s)%s%s", w.wid, proc.pid, _describe_exit(code),
                    " while running a task" if running else "", "; replacing it" if replace else "",
                    event="worker_died", pid=proc.pid, code=code if code is not None else -1, wid=w.wid)
        if replace:
            self.start()
        s.wake_watcher()

    def break_pool(self, reason, cause, done):
        """Fail every call owed with BrokenProcessPool(reason); new submits raise it too."""
        s = self._s
        if s.broken is not None:
            return
        s.broken = reason
        s.event(logging.ERROR, "the pool is broken: %s", reason, event="pool_broken")
        for g, i in s.sched.drain():
            err = BrokenProcessPool(reason)
            err.__cause__ = cause
            s.settle(g, i, False, err, done)
        s.sched.forget_in_flight()
        for w in s.workers.values():
            w.unpublished.clear()

    def stop_all(self):
        """Send every worker STOP, wait up to STOP_GRACE, then SIGKILL (pool lock not held)."""
        s = self._s
        with s.lock:
            workers = list(s.workers.values())
            s.closed = True
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
        s.wake_watcher()


def _early_death_reason(n, pid, code):
    """The broken pool's reason when workers keep dying before their first call."""
    reason = (f"{n} workers in a row exited before taking a task (the last, pid {pid}: "
              f"{_describe_exit(code)}); see their error output above")
    if code == 1:
        reason += (". If the pool is made at the top level of the main script, put that code under "
                   "'if __name__ == \"__main__\":' (workers import the main module, as under spawn)")
    return reason
