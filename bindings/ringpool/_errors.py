"""The exceptions a task pool raises: one home that the parent side (ringpool.executor, which
re-exports them as public API) and worker-side code can both import without loading the other.

``WorkerDied`` and ``TaskTimeout`` are made in the parent and pickle by their arguments (a task
may return or raise one it got from a nested pool); ``RemoteTraceback`` carries a worker's
traceback text as the ``__cause__`` of an exception re-raised in the parent.
"""
from __future__ import annotations

import signal
from concurrent.futures.process import BrokenProcessPool

__all__ = ["WorkerDied", "TaskTimeout", "RemoteTraceback"]


class WorkerDied(BrokenProcessPool):
    """The worker running this task died (killed by a signal, or exited) before finishing it."""

    def __init__(self, pid, exitcode):
        self.pid, self.exitcode = pid, exitcode
        super().__init__(f"ringpool worker (pid {pid}) died while running this task: {describe_exit(exitcode)}")

    def __reduce__(self):
        return (WorkerDied, (self.pid, self.exitcode))


class TaskTimeout(TimeoutError):
    """The task ran longer than the pool's ``task_timeout``; its worker was killed and replaced."""

    def __init__(self, pid, timeout):
        self.pid, self.timeout = pid, timeout
        super().__init__(f"task ran longer than {timeout:g} s; ringpool killed its worker (pid {pid})")

    def __reduce__(self):
        return (TaskTimeout, (self.pid, self.timeout))


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception raised in a worker: its traceback there, as text."""

    def __init__(self, tb):
        self.tb = tb

    def __str__(self):
        return self.tb


def describe_exit(code):
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
