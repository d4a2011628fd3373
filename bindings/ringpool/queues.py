"""ringpool.Queue, JoinableQueue and SimpleQueue: the stdlib's queues over a shared-memory ring.

Deviations from ``multiprocessing.queues`` (everything else behaves the same):

- Objects are pickled in the caller, so an unpicklable object raises in ``put`` (the stdlib
  raises in its feeder thread and loses the item).
- ``put`` publishes directly into the ring; only when the ring is full does the item wait in a
  local buffer drained by a feeder thread (started on demand), so ``close``, ``join_thread`` and
  ``cancel_join_thread`` keep their stdlib meaning. A process that fills its own queue before
  reading it never deadlocks.
- Handles (fds, Connections, sockets, torch tensors' shared storages, stdlib queues) inside
  items travel with the item; see ``ringpool.reduction``.
- ``put_many`` / ``get_many`` move batches with one synchronization each.
- ``qsize()`` is exact up to races (a shared counter), on every platform.
- ``SimpleQueue`` keeps the stdlib's ``_reader``, ``_writer``, ``_rlock`` and ``_wlock``
  attributes for the stdlib Pool and ProcessPoolExecutor; its ``put`` is synchronous (it waits
  for ring space, as the stdlib's waits for pipe space). ``_rlock``/``_wlock`` are per-process
  locks (the ring needs none), so no named semaphore is created.
- Backpressure: a ``put`` that finds the ring full waits while consumers keep taking items, and
  buffers locally (as the stdlib always does) only once they have taken nothing for 5 ms. So a
  producer never waits on a stalled consumer, and a fast producer does not steal the CPU of the
  consumer it is waiting for. ``Queue(backpressure=False)`` buffers at once, as the stdlib does.
"""
from __future__ import annotations

import collections
import os
import queue
import threading
import time
import weakref
from typing import Any, Iterable
from multiprocessing import context as _mp_context
from multiprocessing import util as _mp_util
from multiprocessing.reduction import DupFd

from . import _core
from .reduction import dumps, payload_bytes

__all__ = ["Queue", "JoinableQueue", "SimpleQueue", "DEFAULT_CAPACITY"]

# Ring bytes per queue. Larger absorbs bigger bursts before put() has to buffer locally; only the
# first 64 KiB are pre-faulted at creation, the rest on first use (docs/design/ring.md).
DEFAULT_CAPACITY = 1 << 20

_COUNT_ITEM = _core.COUNT_ITEM
_COUNT_TASK = _core.COUNT_TASK

_live = weakref.WeakSet()


def _after_fork_in_child():
    # A forked child inherits the parent's locally buffered items and feeder state; they are the
    # parent's to deliver, not the child's.
    for q in list(_live):
        q._reset_local()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _timeout(block, timeout):
    if not block:
        return 0.0
    if timeout is None:
        return -1.0
    return max(float(timeout), 0.0)


def reduce_channel(chan):
    """Pickle helper: the channel's descriptors as DupFd tokens (needs a spawning popen)."""
    return tuple(DupFd(fd) for fd in chan.handles())


def rebuild_channel(tokens):
    fds = [t.detach() for t in tokens]
    return _core.Channel.attach(*fds)


class _Feeder:
    """Publishes a producer's buffered frames, in order, once the ring has room.

    Shared by the queue and its thread so the data still flows if the queue object is dropped.
    Publishing happens under ``lock`` (it never blocks), so the thread and producers that help
    drain (``drain``) never publish the same frame twice or out of order.
    """

    def __init__(self, chan):
        self.chan = chan
        self.pending = collections.deque()
        self.lock = threading.Lock()
        self.thread = None
        self.finalizer = None
        self.cancelled = False

    def drain(self):
        """Publish what fits now, oldest first; True if nothing is left waiting."""
        pending, publish = self.pending, self.chan.publish
        with self.lock:
            while pending and publish(pending[0]):
                pending.popleft()
            return not pending

    def add(self, p):
        with self.lock:
            self.pending.append(p)
            if self.thread is None:
                t = threading.Thread(target=self._run, name="ringpool-feeder", daemon=True)
                self.thread = t
                if not self.cancelled:
                    # Like the stdlib: at exit, wait for the buffered items to reach the ring
                    # unless cancel_join_thread() was called.
                    self.finalizer = _mp_util.Finalize(t, _join_thread, [weakref.ref(t)], exitpriority=-5)
                t.start()

    def _run(self):
        pending, chan = self.pending, self.chan
        while True:
            with self.lock:
                while pending and chan.publish(pending[0]):
                    pending.popleft()
                if not pending:
                    self.thread = None
                    return
                need = pending[0].record_bytes
            if chan.wait_writable(need, 0.1):
                # Room in the ring, yet the publish failed: the handle socket is full. Rare; back off.
                with self.lock:
                    if pending and not chan.publish(pending[0]):
                        time.sleep(0.001)
                        continue
                    if pending:
                        pending.popleft()

    def cancel(self):
        self.cancelled = True
        if self.finalizer is not None:
            self.finalizer.cancel()

    def join(self):
        t = self.thread
        if t is not None:
            t.join()


def _join_thread(twr):
    t = twr()
    if t is not None:
        t.join()


class Queue:
    """A process-safe FIFO queue (stdlib ``multiprocessing.Queue`` API) over a shared-memory ring.

    ``put``/``get`` may be called from any thread of any process holding the queue; FIFO order
    holds per producing thread.
    """

    _accounting = _COUNT_ITEM

    def __init__(self, maxsize: int = 0, *, ctx: object = None, capacity: int | None = None,
                 backpressure: bool = True) -> None:
        self._maxsize = int(maxsize) if maxsize and maxsize > 0 else 0
        # Only a bounded queue keeps an exact shared item count (one more atomic per message).
        self._chan = _core.Channel.create(DEFAULT_CAPACITY if capacity is None else capacity, 0, bool(self._maxsize))
        if not backpressure:
            self._accounting = type(self)._accounting | _core.NO_BACKPRESSURE
        self._reset_local()

    def _reset_local(self):
        self._closed = False
        self._feeder = _Feeder(self._chan)
        _live.add(self)

    # -- pickling: only while spawning a process (or inside a ringpool message), like the stdlib
    def __getstate__(self):
        _mp_context.assert_spawning(self)
        return (reduce_channel(self._chan), self._maxsize, self._accounting)

    def __setstate__(self, state):
        tokens, self._maxsize, self._accounting = state
        self._chan = rebuild_channel(tokens)
        self._reset_local()

    def __repr__(self):
        return f"<{type(self).__module__}.{type(self).__qualname__} maxsize={self._maxsize} items={self._chan.items}>"

    def _check_closed(self):
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    # -- producer ----------------------------------------------------------------------------
    def put(self, obj: object, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj`` (``multiprocessing.Queue.put``), pickled in the caller; ``queue.Full`` if a
        bounded queue stays full past ``timeout``. Raises ValueError once closed."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        acct = self._accounting
        if self._maxsize:
            payload = dumps(obj)  # before taking a slot: a pickling error loses nothing
            if not self._chan.acquire_item(self._maxsize, _timeout(block, timeout)):
                raise queue.Full
            self._send(payload, acct & ~_COUNT_ITEM)
        elif self._feeder.pending and not self._feeder.drain():
            self._send(dumps(obj), acct)
        else:
            p = self._chan.put_obj(obj, acct)  # pickles in C, then publishes
            if p is not None:
                self._feeder.add(p)

    def _send(self, dumped, acct):
        payload, flags, fds = dumped
        feeder = self._feeder
        if feeder.pending and not feeder.drain():  # keep this producer's order
            feeder.add(self._chan.stage(payload, flags, fds, acct))
            return
        p = self._chan.put_payload(payload, flags, fds, acct)
        if p is not None:
            feeder.add(p)

    def put_nowait(self, obj: object) -> None:
        """``put(obj, block=False)``."""
        return self.put(obj, False)

    def put_many(self, objs: Iterable[object], block: bool = True, timeout: float | None = None) -> None:
        """Put every object of a sequence (or iterable), in order. Runs of small plain objects are
        pickled in C and published in batches, one synchronization each."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if not isinstance(objs, (list, tuple)):
            objs = list(objs)
        if self._maxsize:
            for o in objs:
                self.put(o, block, timeout)
            return
        acct, chan, feeder, n, i = self._accounting, self._chan, self._feeder, len(objs), 0
        while i < n:
            if feeder.pending and not feeder.drain():
                for o in objs[i:]:
                    self._send(dumps(o), acct)
                return
            i = chan.put_objs(objs, i, acct)
            if i < n:  # not plain, or the ring is full: this one goes through the general path
                self._send(dumps(objs[i]), acct)
                i += 1

    # -- consumer ----------------------------------------------------------------------------
    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The oldest item; blocks up to ``timeout`` (None: forever), then raises ``queue.Empty``.
        Signals interrupt the wait."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        return self._chan.get_obj(-1.0 if block and timeout is None else _timeout(block, timeout))

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(False)

    def get_many(self, max_items: int, block: bool = True, timeout: float | None = None) -> list[Any]:
        """Between 1 and max_items items, oldest first; raises queue.Empty like get()."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        return self._chan.get_objs(int(max_items), _timeout(block, timeout))

    # -- state -------------------------------------------------------------------------------
    def qsize(self) -> int:
        """The approximate number of items (exact only for a bounded queue)."""
        return max(self._chan.items, 0)

    def empty(self) -> bool:
        """True if no item is ready now (approximate: another process may put or get meanwhile)."""
        return not self._chan.readable()

    def full(self) -> bool:
        """True if a bounded queue holds ``maxsize`` items now (approximate); always False when unbounded."""
        return bool(self._maxsize) and self._chan.items >= self._maxsize

    def close(self) -> None:
        """No more puts from this process; buffered items are still delivered."""
        self._closed = True

    def join_thread(self) -> None:
        """Wait until this process's buffered puts are in the ring (after ``close()``, as in the stdlib)."""
        if not self._closed:
            raise AssertionError(f"Queue {self!r} not closed")
        self._feeder.join()

    def cancel_join_thread(self) -> None:
        """Do not wait for buffered puts at exit (they may be lost), as in the stdlib."""
        self._feeder.cancel()



class JoinableQueue(Queue):
    """``multiprocessing.JoinableQueue``: task_done()/join() via a shared counter and futex."""

    _accounting = _COUNT_ITEM | _COUNT_TASK

    def task_done(self) -> None:
        """Mark one item taken with ``get`` as processed; ValueError if called more times than items were put."""
        if not self._chan.task_done():
            raise ValueError("task_done() called too many times")

    def join(self) -> None:
        """Block until every item put has been marked with ``task_done``."""
        self._chan.join(-1.0)


class _ConnectionEnd:
    """The stdlib ``Connection`` subset that Pool and ProcessPoolExecutor use on SimpleQueue's
    ``_reader``/``_writer``; same framing as put/get."""

    def __init__(self, owner, readable, writable):
        self._owner = owner
        self.readable = readable
        self.writable = writable

    @property
    def closed(self):
        return self._owner._closed

    def fileno(self):
        return self._owner._chan.fileno()

    def send(self, obj):
        self._owner.put(obj)

    def send_bytes(self, buf, offset=0, size=None):
        self._owner._put_raw(bytes(memoryview(buf)[offset:None if size is None else offset + size]))

    def recv(self):
        return self._owner.get()

    def recv_bytes(self, maxlength=None):
        data = payload_bytes(self._owner._get_item())
        if maxlength is not None and len(data) > maxlength:
            raise OSError("bad message length")
        return data

    def poll(self, timeout=0.0):
        return self._owner._chan.poll(_timeout(True, timeout))

    def close(self):
        pass


class SimpleQueue:
    """``multiprocessing.SimpleQueue`` over a ring: put is synchronous, get blocks."""

    def __init__(self, *, ctx: object = None, capacity: int | None = None) -> None:
        self._chan = _core.Channel.create(DEFAULT_CAPACITY if capacity is None else capacity)
        self._setup()

    def _setup(self):
        self._closed = False
        self._reader = _ConnectionEnd(self, True, False)
        self._writer = _ConnectionEnd(self, False, True)
        self._locks = None

    # The stdlib's SimpleQueue serializes readers and writers with two SemLocks, and stdlib code
    # takes _rlock directly (Pool._help_stuff_finish). The ring needs no lock, so these are plain
    # per-process locks made on first use: nothing is ever named in /dev/shm for them.
    @property
    def _rlock(self):
        return self._lock_pair()[0]

    @property
    def _wlock(self):
        return self._lock_pair()[1]

    def _lock_pair(self):
        if self._locks is None:
            self._locks = (threading.Lock(), threading.Lock())
        return self._locks

    def __getstate__(self):
        _mp_context.assert_spawning(self)
        return reduce_channel(self._chan)

    def __setstate__(self, tokens):
        self._chan = rebuild_channel(tokens)
        self._setup()

    def close(self) -> None:
        """No more ``put``/``get`` from this process."""
        self._closed = True

    def empty(self) -> bool:
        """True if no item is ready now (approximate)."""
        return not self._chan.readable()

    def put(self, obj: object) -> None:
        """Put ``obj``, synchronously (it is in the ring when ``put`` returns, as a pipe write would be)."""
        if self._closed:
            raise ValueError("SimpleQueue is closed")
        self._publish_sync(self._chan.put_obj(obj, _COUNT_ITEM))

    def _put_raw(self, data):
        if self._closed:
            raise ValueError("SimpleQueue is closed")
        self._publish_sync(self._chan.put(data, _core.FLAG_RAW, None))

    def _publish_sync(self, p):
        # Synchronous, as a pipe write is: wait for room rather than buffer.
        while p is not None and not self._chan.publish(p):
            self._chan.wait_writable(p.record_bytes, -1.0)

    def _get_item(self):
        if self._closed:
            raise ValueError("SimpleQueue is closed")
        return self._chan.get(-1.0)

    def get(self) -> Any:
        """The oldest item, waiting as long as it takes (signals interrupt the wait)."""
        if self._closed:
            raise ValueError("SimpleQueue is closed")
        return self._chan.get_obj(-1.0)

    def get_many(self, max_items: int) -> list[Any]:
        """Between 1 and ``max_items`` items, oldest first, waiting for the first."""
        if self._closed:
            raise ValueError("SimpleQueue is closed")
        return self._chan.get_objs(int(max_items), -1.0)
