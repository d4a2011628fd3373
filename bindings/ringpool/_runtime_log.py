"""The C++ runtime's lifecycle events in ``logging`` (runtime/include/ringpool/log.hpp).

::

    supervisor thread (C++) ── queue + eventfd (no GIL) ──► "ringpool-log" thread ──► logging
                                                 └── flush() (any thread, e.g. shutdown()) ──┘

- The runtime's threads only queue a record and signal an eventfd (bindings/src/log_bindings.cpp):
  they never wait for the GIL, so a thread holding it while it waits on the runtime (a
  supervisor's destructor joins its thread) cannot deadlock with them.
- The "ringpool-log" daemon thread, started with the first supervisor attached here, sleeps in
  ``os.read`` on the eventfd and logs what is queued. ``flush()`` does the same at once in the
  calling thread; a lock makes taking and logging one step, so records keep their order.
- A record goes to ``ringpool.spawner`` (the zygote's events) or ``ringpool.pool`` (the rest) at the
  runtime's level, with its fields as the ``LogRecord`` attributes ``event`` ("zygote_died", ...),
  ``ringpool_pid``, ``exit_code`` and ``worker_id``. An exception from a handler or filter is
  reported as logging reports its own (``logging.raiseExceptions``) and never stops the thread.
- In a forked child the parent's queue and thread are gone: the child starts over.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import traceback
import weakref
from typing import Any, Callable, Optional

from . import _core

__all__ = ["attach", "flush"]

_SPAWNER = logging.getLogger("ringpool.spawner")
_POOL = logging.getLogger("ringpool.pool")

_lock = threading.RLock()  # re-entrant: a handler that logs a ringpool event flushes in its turn
_owners: dict[int, Callable[[], Any]] = {}  # tag -> weakref to what the records are about
_tags = itertools.count(1)
_thread: Optional[threading.Thread] = None


def attach(supervisor: Any, owner: Any) -> None:
    """Route ``supervisor``'s events (a ``_core.Supervisor``) to logging, each message naming
    ``owner`` (kept through a weak reference); starts the logging thread on first use."""
    global _thread
    tag = next(_tags)
    with _lock:
        _owners[tag] = weakref.ref(owner, lambda _ref, tag=tag: _owners.pop(tag, None))
        if _thread is None:
            _thread = threading.Thread(target=_drain, args=(_core.log_fd(),), name="ringpool-log", daemon=True)
            _thread.start()
    supervisor.log_to_python(tag)


def flush() -> None:
    """Log every queued runtime record now, in this thread."""
    with _lock:
        records, dropped = _core.log_take()
        for rec in records:
            _emit(*rec)
        if dropped:
            _emit(0, "dropped", logging.WARNING, f"{dropped} runtime log records were dropped: nothing "
                  "read the queue for too long", -1, 0, 0)


def _emit(tag: int, event: str, level: int, message: str, pid: int, exit_code: int, worker: int) -> None:
    logger = _SPAWNER if event.startswith("zygote_") else _POOL
    if not logger.isEnabledFor(level):
        return
    ref = _owners.get(tag)
    owner = ref() if ref is not None else None
    extra = {"event": event, "ringpool_pid": pid, "exit_code": exit_code, "worker_id": worker}
    try:
        if owner is None:
            logger.log(level, "%s", message, extra=extra)
        else:
            logger.log(level, "%s for %r", message, owner, extra=extra)
    except Exception:
        # A filter or handler that raises: reported the way logging reports a failing handler,
        # and the next record is logged as usual.
        if logging.raiseExceptions and sys.stderr is not None:
            traceback.print_exc()


def _drain(fd: int) -> None:
    while True:
        try:
            os.read(fd, 8)  # blocks (without the GIL) until records are queued
        except OSError:
            return  # the descriptor was closed (a forked child's reset)
        try:
            flush()
        except Exception:
            if logging.raiseExceptions and sys.stderr is not None:
                traceback.print_exc()


def _after_fork_in_child() -> None:
    global _thread, _lock
    _core.log_reset_after_fork()
    _lock = threading.RLock()
    _thread = None
    _owners.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
