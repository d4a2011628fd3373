"""ringpool.Executor's dispatcher: writes the records the scheduler assigns into the workers'
call rings.

Not a thread: it runs in whichever thread made work or room for it (a caller's submit or map, the
collector after a batch of results, the watcher after starting a worker), always under the pool
lock. Which worker gets which calls, how many and which share a record is the scheduler's
(`_State.sched.assign()`, once per round); this part turns each assigned (tid, group, index,
count) into a record, pickles and publishes them, and tells the scheduler about records that could
not be sent (`split`, `unsend`). It owns the function table (`fn_ids`: a plain function travels
once per worker and is then named by its number, each worker's `known` set saying which it has).
"""
from __future__ import annotations

import types

from ._executor_tasks import _CALL, _NO_WAIT, _PING, _RUN
from .reduction import dumps

# Functions that travel once per worker and are then named by number (hashable, and the same
# object on every call, unlike bound methods or partials).
_TABLED = (types.FunctionType, types.BuiltinFunctionType, str)
_MAX_FUNCTIONS = 4096


class _Dispatcher:
    """The assigned calls' way into the rings (every method: pool lock held)."""

    def __init__(self, state, workers):
        self._s = state
        self._workers = workers  # _Workers: a spent max_tasks_per_child budget starts a replacement
        self.fn_ids = {}         # function -> number (holds the function)
        self._fns = []           # number - 1 -> function
        self._submitting = None  # the group a submit is sending: its errors raise in the caller
        self._submit_error = None

    # -- entry points ---------------------------------------------------------------------------
    def submit(self, gr):
        """Queue and send a submit's group. Raises, with nothing queued, if its record does not
        pickle. Returns what to deliver."""
        s = self._s
        g = s.next_group
        s.next_group += 1
        s.groups[g] = gr
        done = []
        if s.max_tasks is None:
            assigned = s.sched.submit_one(g)  # one call instead of two; (wid, tid) if it went alone
            if type(assigned) is tuple:
                wid, tid = assigned
                w = s.workers[wid]
                if w.unpublished:  # its ring is full: sent as any assignment is, after the others
                    assigned = [(wid, [(tid, g, 0, 1)])]
                else:
                    # The common case, inline: it alone went to a worker with room in its ring.
                    fn = gr.fn
                    code = self._function(fn, w) if type(fn) in _TABLED else fn
                    try:
                        p = w.calls.put_obj((_CALL, tid, code, gr.args, gr.kwargs), _NO_WAIT)
                    except Exception:
                        if type(code) is tuple:
                            w.known.discard(code[0])
                        s.sched.unsend(wid, tid)
                        del s.groups[g]
                        raise
                    gr.sink.set_running_or_notify_cancel()  # (it cannot be cancelled yet)
                    gr.running = True
                    if p is not None:
                        w.unpublished.append(p)
                    return done
        else:
            assigned = None
        self._submitting, self._submit_error = g, None
        try:
            if assigned is not None:
                self.dispatch(done, assigned)
            else:
                s.sched.submit(g, 1, False)
                self.dispatch(done)
        finally:
            self._submitting = None
        if self._submit_error is not None:
            err, self._submit_error = self._submit_error, None
            raise err
        if not gr.running and g in s.groups:  # still in the backlog: pickle it now, so errors raise here
            try:
                dumps((_CALL, 0, gr.fn, gr.args, gr.kwargs))
            except Exception:
                s.sched.cancel([g])
                del s.groups[g]
                raise
        return done

    def enqueue(self, gr, n, batch):
        """Queue a map's n calls (results to batch); returns what to deliver."""
        s = self._s
        g = s.next_group
        s.next_group += 1
        s.groups[g] = gr
        batch.groups.append(g)
        batch.pending += n
        s.sched.submit(g, n, gr.op == _RUN)
        done = []
        self.dispatch(done)
        return done

    def cancel(self, groups):
        """Cancel these groups' calls still in the backlog: returns them as [(group, index)]."""
        s = self._s
        dropped = s.sched.cancel(groups)
        for g, _ in dropped:
            gr = s.groups[g]
            gr.left -= 1
            if not gr.left:
                del s.groups[g]
        return dropped

    def ping(self, wids):
        """Send a PING to these workers (a result did not unpickle)."""
        rec = (_PING, None, None, None, None)
        for wid in wids:
            w = self._s.workers[wid]
            p = (w.calls.stage(*dumps(rec), 0) if w.unpublished else w.calls.put_obj(rec, _NO_WAIT))
            if p is not None:
                w.unpublished.append(p)

    def forget_fn(self, w, fn):
        """w did not unpickle a call of fn: if it carried fn's first use, the next carries it again."""
        if type(fn) in _TABLED and fn in self.fn_ids:
            w.known.discard(self.fn_ids[fn])

    # -- sending what the scheduler assigns -------------------------------------------------------
    def dispatch(self, done, assigned=None):
        """Send what the scheduler assigns (or has just assigned); start the replacements of
        workers it retired."""
        s = self._s
        sched = s.sched
        budgets = s.max_tasks is not None  # (then `assigned` is None: the count before is needed)
        if budgets:
            short = sched.shortfall()
        for wid, recs in sched.assign() if assigned is None else assigned:
            self._send(s.workers[wid], recs, done)
        if budgets and not s.shutdown and s.broken is None:
            for _ in range(sched.shortfall() - short):  # budgets spent: replacements start at once
                if not self._workers.start():
                    break

    def _send(self, w, recs, done):
        """Write recs [(tid, group, index, count)] into w's ring: as one put_objs while they all
        pickle and fit, then one by one."""
        groups = self._s.groups
        records = []
        fn = num = None
        for tid, g, i, n in recs:
            gr = groups[g]
            if gr.op == _CALL and not gr.each and not gr.running:
                # A submit: its Future runs from now, unless it was cancelled while it waited.
                if not gr.sink.set_running_or_notify_cancel():
                    self._s.sched.unsend(w.wid, tid)
                    del groups[g]
                    continue
                gr.running = True
            f = gr.fn
            if f is fn and num is not None:
                code = num
            else:
                fn, code = f, self._function(f, w)
                num = code if type(code) is int else code[0] if type(code) is tuple else None
            if gr.each:
                records.append((_CALL, tid, code, gr.call_args(i, n), None))
            else:
                records.append((gr.op, tid, code, gr.call_args(i, n), gr.kwargs))
        chan = w.calls
        i, n = 0, len(records)
        if n == 1:  # a submit's call, mostly: straight in
            self._send_one(w, records[0], done)
            return
        batches = True
        while i < n:
            if batches and not w.unpublished:
                # Plain records in batches (one ring critical section each); put_objs stops before
                # one that carries handles or buffers, and raises at one that does not pickle.
                before = chan.committed  # we are this ring's only producer
                try:
                    i = chan.put_objs(records, i, _NO_WAIT)
                except Exception:
                    i += chan.committed - before
                if i == n:
                    return
            if self._send_one(w, records[i], done):
                batches = False  # a function's first use there did not go: the next records carry it
            i += 1

    def _send_one(self, w, rec, done):
        """Send one record (put_obj, or staged behind unpublished ones); one that does not pickle
        fails alone (a RUN: split, then only its bad item). True if the record carried its
        function's first use on w and did not go."""
        op, tid, code, args, kwargs = rec
        if type(code) is int and code not in w.known:  # its first use there did not go
            w.known.add(code)
            code = (code, self._fns[code - 1])
            rec = (op, tid, code, args, kwargs)
        try:
            if w.unpublished:  # behind records waiting for room: staged, to be published in order
                p = w.calls.stage(*dumps(rec), 0)
            else:
                p = w.calls.put_obj(rec, _NO_WAIT)
        except Exception as exc:
            lost = type(code) is tuple
            if lost:  # not sent: the worker does not learn the function
                w.known.discard(code[0])
                code = code[0]
            s = self._s
            if op == _RUN and len(args) > 1:
                # One of its items does not pickle: they go one call each, failing only it.
                s.sched.split(w.wid, tid)
                for j, a in enumerate(args):
                    self._send_one(w, (_RUN, tid + j, code, [a], kwargs), done)
                return lost and code not in w.known
            ref = s.sched.unsend(w.wid, tid)
            if ref is not None:
                g, i = ref
                if g == self._submitting:
                    self._submit_error = exc  # raised in submit: nothing was queued
                    del s.groups[g]
                else:
                    s.settle(g, i, False, exc, done)
            return lost
        if p is not None:
            w.unpublished.append(p)
        return False

    def _function(self, fn, w):
        """What a record for w carries as its function: a plain function travels once per worker
        as (number, function), later records carry the number (pickling a function by reference
        costs more than the rest of the call); other callables travel whole."""
        if type(fn) not in _TABLED:
            return fn
        fn_ids = self.fn_ids
        fid = fn_ids.get(fn)
        if fid is None:
            if len(fn_ids) >= _MAX_FUNCTIONS:
                return fn
            fid = fn_ids[fn] = len(fn_ids) + 1
            self._fns.append(fn)
        if fid in w.known:
            return fid
        w.known.add(fid)
        return (fid, fn)

    def publish_pending(self):
        """Publish the records that waited for room in their workers' rings."""
        for w in self._s.workers.values():
            q = w.unpublished
            while q and w.calls.publish(q[0]):
                q.popleft()
