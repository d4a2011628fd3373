"""ringpool as a multiprocessing context: ``ringpool.get_context()``.

A ``multiprocessing.context.BaseContext`` subclass that overrides only what differs; everything
else (Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event, Barrier, Value, Array, Manager,
Pool, ...) comes from BaseContext unchanged and works with ringpool workers.

Deviations from the stdlib contexts:
- ``get_start_method()`` is ``"ringpool"``, never ``"fork"`` (SemLocks keep their names, so they
  work in workers that are not forked from this process).
- ``Queue``, ``JoinableQueue``, ``SimpleQueue`` and ``Pipe`` are ringpool's shared-memory ones.
- ``Process._start_method`` is None: the worker's ``_bootstrap`` must not look "ringpool" up in
  the stdlib's table of concrete contexts.
- Workers are started in exec mode for now (a fresh interpreter each, as spawn does, through the
  C++ launcher); the zygote mode of docs/design/spawner.md is still to come.
"""
from __future__ import annotations

from multiprocessing import context as _mp_context
from multiprocessing import process as _mp_process

__all__ = ["RingpoolContext", "RingpoolProcess", "get_context", "register_start_method"]


class RingpoolProcess(_mp_process.BaseProcess):
    _start_method = None

    @staticmethod
    def _Popen(process_obj):
        from .popen import Popen

        return Popen(process_obj)


class RingpoolContext(_mp_context.BaseContext):
    _name = "ringpool"
    Process = RingpoolProcess

    def Queue(self, maxsize=0):
        from .queues import Queue

        return Queue(maxsize)

    def JoinableQueue(self, maxsize=0):
        from .queues import JoinableQueue

        return JoinableQueue(maxsize)

    def SimpleQueue(self):
        from .queues import SimpleQueue

        return SimpleQueue()

    def Pipe(self, duplex=True):
        from .connection import Pipe

        return Pipe(duplex)

    def get_start_method(self, allow_none=False):
        return self._name

    def set_start_method(self, method, force=False):
        raise ValueError("set the start method on the default context (multiprocessing.set_start_method)")


_context = RingpoolContext()


def get_context():
    """The ringpool multiprocessing context (one per process)."""
    return _context


def register_start_method():
    """Make ``multiprocessing.get_context("ringpool")`` and ``set_start_method("ringpool")`` work.

    Opt-in, never done on import: it adds an entry to the stdlib's table of concrete contexts.
    """
    _mp_context._concrete_contexts.setdefault("ringpool", _context)
    return _context
