"""ringpool.Executor's dispatcher: moves tasks from the backlog into the workers' call rings.

Not a thread: it runs in whichever thread made work or room for it (a caller's submit or map, the
collector after a batch of results, the watcher after starting a worker), always under the pool
lock. It owns the function table (`fn_ids`: a plain function travels once per worker and is then
named by its number, each worker's `known` set saying which it has); everything else it touches is
the pool's _State.
"""
from __future__ import annotations

import collections
import types
from concurrent.futures import Future

from ._executor_tasks import _CALL_FN, _NO_WAIT, _PING, _PING_MARK, _RUN
from .reduction import dumps

# Functions that travel once per worker and are then named by number (hashable, and the same
# object on every call, unlike bound methods or partials).
_TABLED = (types.FunctionType, types.BuiltinFunctionType, str)
_MAX_FUNCTIONS = 4096


def _function_id(fn):
    """The number a call record's fn field names its function by: fn itself once the worker knows
    it, the first item of (number, function) on its first use there; None for a function that
    travels whole every time."""
    if type(fn) is int:
        return fn
    if type(fn) is tuple:
        fid, _ = fn
        return fid
    return None


def _forget_first_use(w, rec):
    """rec, not sent to w after all, carried its function's first use there: w does not learn it."""
    fn = rec[_CALL_FN]
    if type(fn) is tuple:
        fid, _ = fn
        w.known.discard(fid)


def _load(w):
    return w.load


class _Dispatcher:
    """The backlog's way to the workers (every method: pool lock held)."""

    def __init__(self, state, workers):
        self._s = state
        self._workers = workers  # _Workers: a spent max_tasks_per_child budget starts a replacement
        self.fn_ids = {}         # function -> number (holds the function)

    # -- entry points ---------------------------------------------------------------------------
    def submit(self, t):
        """Queue or send task t (its tid not yet given). Raises, with nothing queued, if its
        record does not pickle. Returns what to deliver (the backlog moved)."""
        s = self._s
        t.tid = s.next_tid
        w = None
        for x in s.workers.values():  # the least busy open worker
            if not x.retiring and (w is None or x.load < w.load):
                w = x
        if w is None or s.backlog or w.unpublished or w.load >= s.depth:
            t.payload = dumps(t.record())  # pickle now: errors raise here
            s.next_tid += 1
            s.tasks[t.tid] = t
            s.backlog.append(t)
            done = []
            self.dispatch(done)
            return done
        rec = self.record(t, w)
        try:
            p = w.calls.put_obj(rec, _NO_WAIT)  # raises before anything is recorded
        except Exception:
            _forget_first_use(w, rec)
            raise
        s.next_tid += 1
        t.sink.set_running_or_notify_cancel()
        t.running = True
        s.tasks[t.tid] = t
        self.record_sent(w, (t,))
        if p is not None:
            w.unpublished.append(p)
        return []

    def enqueue(self, tasks, batch):
        """Queue a map's tasks (results to batch); returns the results to come and what to deliver."""
        s = self._s
        n = 0
        for t in tasks:
            t.tid = s.next_tid
            s.next_tid += t.n
            s.tasks[t.tid] = t
            n += t.n
        batch.pending += n
        s.backlog.extend(tasks)
        done = []
        self.dispatch(done)
        return n, done

    def cancel_batch(self, batch):
        """Drop the batch's tasks still in the backlog (its consumer stopped iterating)."""
        s = self._s
        keep = collections.deque()
        for t in s.backlog:
            if t.sink is batch:
                s.tasks.pop(t.tid, None)
                batch.pending -= t.n
            else:
                keep.append(t)
        s.backlog = keep

    def cancel_futures(self):
        """Cancel the futures still in the backlog (shutdown(cancel_futures=True))."""
        s = self._s
        keep = collections.deque()
        for t in s.backlog:
            if isinstance(t.sink, Future) and not t.running and t.sink.cancel():
                s.tasks.pop(t.tid, None)
            else:
                keep.append(t)
        s.backlog = keep

    def ping_busy(self):
        """Send a PING to every worker with calls in flight (a result did not unpickle)."""
        for w in self._s.workers.values():
            if w.sent:
                w.sent.append(_PING_MARK)
                rec = (_PING, None, None, None, None)
                p = (w.calls.stage(*dumps(rec), 0) if w.unpublished else w.calls.put_obj(rec, _NO_WAIT))
                if p is not None:
                    w.unpublished.append(p)

    def forget_fn(self, w, fn):
        """w did not unpickle a call of fn: if it carried fn's first use, the next carries it again."""
        if type(fn) in _TABLED and fn in self.fn_ids:
            w.known.discard(self.fn_ids[fn])

    # -- moving the backlog ---------------------------------------------------------------------
    def dispatch(self, done):
        """Move backlog tasks to the least busy workers, up to the depth bound."""
        s = self._s
        backlog = s.backlog
        depth = s.depth
        while backlog:
            workers = s.open_workers()
            if not workers:
                return
            w = min(workers, key=_load)
            room = depth - w.load
            if room <= 0:
                return
            if w.budget is not None:
                room = min(room, w.budget)
            batch = []
            while backlog and room > 0:
                t = backlog[0]
                if t.op == _RUN:
                    if t.n > room:  # the worker takes the run's first items; the rest wait
                        head = t.rest(0)
                        head.n = room
                        s.tasks[head.tid] = head  # in t's place
                        t.tid += room
                        t.index += room
                        t.n -= room
                        s.tasks[t.tid] = t
                        t = head
                    else:
                        backlog.popleft()
                    batch.append(t)
                    room -= t.n
                    continue
                backlog.popleft()
                if isinstance(t.sink, Future) and not t.running:
                    if not t.sink.set_running_or_notify_cancel():
                        s.tasks.pop(t.tid, None)  # cancelled while waiting
                        continue
                    t.running = True
                batch.append(t)
                room -= 1
            if batch:
                self.send(w, batch, done)

    def send(self, w, batch, done):
        chan = w.calls
        i, n = 0, len(batch)
        fast = True
        while i < n:
            if fast and not w.unpublished and batch[i].payload is None:
                # The fast path: plain records, pickled and published in batches.
                records = self.records(batch, i, w)
                before = chan.committed  # we are this ring's only producer
                try:
                    k = chan.put_objs(records, 0, _NO_WAIT)
                except Exception:
                    # One of them does not pickle: the rest go one at a time, failing only it.
                    k = chan.committed - before
                    fast = False
                for r in records[k:]:  # not sent: the worker does not learn their functions
                    _forget_first_use(w, r)
                self.record_sent(w, batch[i:i + k])
                i += k
                if i == n:
                    return
            t = batch[i]
            try:
                if t.payload is not None:
                    payload, flags, fds = t.payload
                else:
                    rec = self.record(t, w)
                    try:
                        payload, flags, fds = dumps(rec)
                    except Exception:
                        _forget_first_use(w, rec)
                        raise
                p = (chan.stage(payload, flags, fds, 0) if w.unpublished
                     else chan.put_payload(payload, flags, fds, _NO_WAIT))
            except Exception as exc:
                if t.op == _RUN:
                    # One of its items does not pickle: they go one call at a time, failing only it.
                    self.send(w, self.split_run(t), done)
                else:
                    self._fail_unsent(t, exc, done)
                i += 1
                continue
            t.payload = None
            self.record_sent(w, (t,))
            if p is not None:
                w.unpublished.append(p)
            i += 1

    def record(self, t, w):
        """t's call record for w. A plain function travels once per worker; later calls carry its
        number (pickling a function by reference costs more than the rest of the call)."""
        fn = t.fn
        if type(fn) in _TABLED:
            fn_ids = self.fn_ids
            fid = fn_ids.get(fn)
            if fid is None and len(fn_ids) < _MAX_FUNCTIONS:
                fid = fn_ids[fn] = len(fn_ids) + 1
            if fid is not None:
                if fid in w.known:
                    fn = fid
                else:
                    w.known.add(fid)
                    fn = (fid, fn)
        return (t.op, t.tid, fn, t.call_args(), t.kwargs)

    def records(self, batch, start, w):
        """Call records for batch[start:] on w; a map's calls share their function, so its
        number is looked up once for the run of calls that follows the first."""
        out = []
        fn = fid = None
        for t in batch[start:]:
            if t.fn is fn and fid is not None:
                out.append((t.op, t.tid, fid, t.call_args(), t.kwargs))
                continue
            rec = self.record(t, w)
            out.append(rec)
            fn = t.fn
            fid = _function_id(rec[_CALL_FN])
        return out

    def record_sent(self, w, tasks):
        n = 0
        for t in tasks:
            t.wid = w.wid
            w.sent.append(t)
            n += t.n
        w.load += n
        if w.budget is not None:
            self._spend(w, n)

    def _spend(self, w, n):
        w.budget -= n
        if w.budget == 0:
            w.retiring = True
            s = self._s
            if not s.shutdown and s.broken is None:
                self._workers.start()

    def split_run(self, t):
        """A run not yet sent, as one task per item (each registered in its place)."""
        tasks = self._s.tasks
        del tasks[t.tid]
        items = [t.item(j) for j in range(t.n)]
        for it in items:
            tasks[it.tid] = it
        return items

    def _fail_unsent(self, t, exc, done):
        if self._s.tasks.pop(t.tid, None) is not None:
            done.append((t, False, exc))

    def publish_pending(self):
        """Publish the records that waited for room in their workers' rings."""
        for w in self._s.workers.values():
            q = w.unpublished
            while q and w.calls.publish(q[0]):
                q.popleft()
