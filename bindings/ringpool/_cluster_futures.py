"""The dask tasks of one ``ringpool.ClusterExecutor`` and the ``concurrent.futures.Future`` each one
resolves (client side).

::

    ClusterExecutor ──submit(header, calls)──► client.submit / client.map (one scheduler message)
                                                  │ dask future done (dask's callback thread)
                                                  ▼
    concurrent Futures ◄── collector thread: one gather per batch of finished dask futures
    monitor thread: pings the scheduler while futures are pending; no answer for
                    scheduler_timeout (or dask cancelled everything) -> every future fails

- ``_DaskTasks`` owns the pending map (dask key -> Future), the two threads and the broken state.
- The functions dask runs for us (the task, the probes) are built by value (cloudpickle ships
  their code: their module need not exist where they run, the scheduler included), and the task
  imports ringpool on the worker itself, so a host without ringpool answers "ringpool is not
  importable on the dask worker on host ..." instead of an unpickling traceback.
"""
from __future__ import annotations

import logging
import pickle
import queue
import threading
import time
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures.process import BrokenProcessPool

import distributed

from ._errors import RemoteTraceback, WorkerDied

__all__ = ["ClusterWorkerDied", "SchedulerLost"]

_log = logging.getLogger("ringpool.cluster")

_MONITOR_STEP = 0.5  # seconds between the monitor's pings while futures are pending
# Out-of-band buffers (numpy arrays) at least this large are scattered to a worker ahead of the
# task instead of riding in the task's message through the scheduler.
_SCATTER_BYTES = 1 << 20
_GATHER_BATCH = 256  # finished tasks fetched by one gather at most

_TASK_SOURCE = '''
def ringpool_cluster_chunk(header, payload, buffers):
    try:
        from ringpool import _cluster_worker
    except ImportError as exc:
        import os, socket
        raise RuntimeError("ringpool is not importable on the dask worker on host " + socket.gethostname()
                           + " (pid " + str(os.getpid()) + "): " + repr(exc)
                           + "; install ringpool (with its compiled extension) on every host of the cluster") from None
    return _cluster_worker.run(header, payload, buffers)


def ringpool_cluster_probe():
    import os, socket
    try:
        import ringpool
    except ImportError as exc:
        return (None, socket.gethostname(), repr(exc))
    return (ringpool.__version__, socket.gethostname(), None)


def ringpool_cluster_warm(config, needs):
    # Returns at once: the node-local pool starts in a thread of the dask worker.
    from ringpool import _cluster_worker
    _cluster_worker.warm(config, needs)


def ringpool_cluster_stats():
    from ringpool import _cluster_worker
    return _cluster_worker.stats()


def ringpool_scheduler_plugins(dask_scheduler):
    # On the scheduler (client.run_on_scheduler), which needs no ringpool: its ringpool plugins.
    return [n for n in dask_scheduler.worker_plugins if n.startswith("ringpool-")]
'''
_ns = {"__name__": "ringpool_cluster_by_value"}
exec(compile(_TASK_SOURCE, "<ringpool.cluster task>", "exec"), _ns)
chunk_task = _ns["ringpool_cluster_chunk"]
probe = _ns["ringpool_cluster_probe"]
stats = _ns["ringpool_cluster_stats"]
warm = _ns["ringpool_cluster_warm"]
scheduler_plugins = _ns["ringpool_scheduler_plugins"]
del _ns


class ClusterWorkerDied(WorkerDied):
    """A chunk's dask worker died while running it, and dask had no retry left for it."""

    __module__ = "ringpool.cluster"

    def __init__(self, host, detail=""):
        self.host, self.detail = host, detail
        BrokenProcessPool.__init__(self, f"dask worker {host} died while running this task and no retry was left"
                                         + (f" ({detail})" if detail else ""))
        self.pid, self.exitcode = None, None

    def __reduce__(self):
        return (ClusterWorkerDied, (self.host, self.detail))


class SchedulerLost(BrokenProcessPool):
    """The client lost its dask scheduler for longer than the executor's scheduler_timeout."""

    __module__ = "ringpool.cluster"


def decode(raw):
    """A task's answer -> (values, error or None, seconds the worker spent on it)."""
    blob, bufs, seconds = raw
    values, err = pickle.loads(blob, buffers=bufs)
    if err is not None:
        exc, tb = err
        exc.__cause__ = RemoteTraceback(tb)
        err = exc
    return values, err, seconds


def _translate(exc):
    """A dask-level failure of a task -> the exception its Future gets."""
    if type(exc).__name__ == "KilledWorker":
        last = exc.args[1] if len(exc.args) > 1 else None
        host = getattr(last, "address", None) or str(last)
        return ClusterWorkerDied(host, f"it ran on {exc.args[2] if len(exc.args) > 2 else '?'} workers, all died")
    return exc


class _DaskTasks:
    """One executor's dask tasks: submits them, resolves a Future per task, fails them all when
    the scheduler is lost. Any thread may call submit/cancel/close."""

    _NO_RAW = object()

    def __init__(self, client, scheduler_timeout, retries):
        self._client = client
        self._address = client.scheduler.address
        self._scheduler_timeout = float(scheduler_timeout)
        self._retries = int(retries)
        self.lock = threading.RLock()
        self._pending = {}   # dask key -> (dask future, Future, op, buffers held)
        self.broken = None   # the exception every later call raises, once the scheduler is lost
        self._closing = False
        self._stop = threading.Event()
        self._done = queue.SimpleQueue()  # finished dask futures, for the collector
        self._collector = threading.Thread(target=self._collect, name="ringpool-cluster-collector", daemon=True)
        self._monitor = threading.Thread(target=self._watch_scheduler, name="ringpool-cluster-monitor", daemon=True)
        self._collector.start()
        self._monitor.start()

    def submit(self, header, prepared, op, check):
        """One dask task per (payload, buffers) of ``prepared``, in one scheduler message; returns
        [(dask future, Future)]. ``check()`` runs under the lock (raises if the executor closed).
        For op "call" the Future gets the call's result or exception, for "map" the task's raw
        answer (see ``decode``)."""
        for _, bufs in prepared:
            big = [i for i, b in enumerate(bufs) if memoryview(b).nbytes >= _SCATTER_BYTES]
            if big:
                # Straight to a worker, not inside the task message through the scheduler (the
                # task then depends on them: dask moves them to wherever it runs).
                for i, fut in zip(big, self._client.scatter([bufs[i] for i in big], hash=False)):
                    bufs[i] = fut
        with self.lock:
            check()
            if len(prepared) == 1:
                dfs = [self._client.submit(chunk_task, header, *prepared[0], pure=False, retries=self._retries)]
            else:
                dfs = self._client.map(chunk_task, [header] * len(prepared), [p for p, _ in prepared],
                                       [b for _, b in prepared], pure=False, retries=self._retries)
            out = []
            for df, (_, bufs) in zip(dfs, prepared):
                cf = Future()
                self._pending[df.key] = (df, cf, op, bufs)
                out.append((df, cf))
        for df, cf in out:
            cf.add_done_callback(lambda cf, df=df: cf.cancelled() and self.cancel([df]))
            df.add_done_callback(self._done.put)  # dask's callback thread: hand it to the collector
        return out

    def pending_futures(self):
        with self.lock:
            return [e[1] for e in self._pending.values()]

    def _collect(self):
        """The collector thread: takes finished dask futures in batches and fetches the results
        of a batch with one gather (one round trip through the scheduler, where a result() per
        future would make one each: measured, it halved chunksize-1 throughput), then resolves
        their Futures."""
        while True:
            df = self._done.get()
            if df is None:
                return
            batch = [df]
            while len(batch) < _GATHER_BATCH:
                try:
                    df = self._done.get_nowait()
                except queue.Empty:
                    break
                if df is None:
                    self._done.put(None)  # after this batch
                    break
                batch.append(df)
            with self.lock:
                entries = [e for e in (self._pending.pop(df.key, None) for df in batch) if e is not None]
            finished = [e for e in entries if e[0].status == "finished" and not e[1].done()]
            if finished:
                try:
                    raws = self._client.gather([e[0] for e in finished])
                except Exception:
                    pass  # one of them went missing meanwhile: each on its own below
                else:
                    for e, raw in zip(finished, raws):
                        self._resolve(e, raw)
            for e in entries:
                if not e[1].done():
                    self._resolve(e)

    def _resolve(self, entry, raw=_NO_RAW):
        df, cf, op, _ = entry
        if cf.done():
            return
        try:
            if raw is self._NO_RAW:
                raw = df.result()
            if op == "call":
                values, err, _ = decode(raw)
                if err is not None:
                    cf.set_exception(err)
                else:
                    cf.set_result(values[0])
            else:
                cf.set_result(raw)
        except InvalidStateError:
            pass  # cancelled meanwhile
        except CancelledError:
            # Not by us (our cancels forget the future first): dask cancels every future of a client
            # that lost its scheduler, at once.
            if self._client.status != "running":
                self._fail_all(self._lost(f"client status {self._client.status!r}"))
                try:
                    cf.set_exception(self.broken)
                except InvalidStateError:
                    pass
            else:
                cf.cancel()
        except BaseException as exc:
            try:
                cf.set_exception(_translate(exc))
            except InvalidStateError:
                pass

    def cancel(self, dfs):
        if not dfs:
            return
        with self.lock:
            for df in dfs:
                self._pending.pop(df.key, None)
        try:
            self._client.cancel(dfs)
        except Exception:
            pass  # the client is closing or lost its scheduler: nothing runs for us anyway

    # -- failures ---------------------------------------------------------------------------------
    def _watch_scheduler(self):
        """While futures are pending, ask the scheduler for its identity every _MONITOR_STEP
        seconds: a scheduler that neither answers (frozen, or its host unreachable without a
        reset) nor is reconnected within scheduler_timeout fails every pending future. (A closed
        connection needs no timeout: dask cancels the client's futures at once; _resolve.)"""
        answered = time.monotonic()
        while not self._stop.wait(_MONITOR_STEP):
            if self._closing and not self._pending:
                return
            if not self._pending or self._ping():
                answered = time.monotonic()
                continue
            if time.monotonic() - answered >= self._scheduler_timeout:
                self._fail_all(self._lost(f"no answer for {self._scheduler_timeout:g} s, client status "
                                          f"{self._client.status!r}"))
                return

    def _ping(self):
        if self._client.status != "running":
            return False
        try:
            distributed.utils.sync(self._client.loop, self._client.scheduler.identity,
                                   callback_timeout=max(1.0, min(5.0, self._scheduler_timeout / 2)))
            return True
        except Exception:
            return False

    def _lost(self, detail):
        return self.broken or SchedulerLost(f"lost the dask scheduler at {self._address} ({detail}): "
                                            f"pending ringpool tasks failed")

    def _fail_all(self, exc):
        with self.lock:
            if self.broken is None:
                self.broken = exc
            exc = self.broken
            pending = list(self._pending.values())
            self._pending.clear()
        _log.error("%s", exc)
        for _, cf, _, _ in pending:
            try:
                cf.set_exception(exc)
            except InvalidStateError:
                pass

    def close(self, wait):
        """Stop the threads (after the pending tasks, with wait)."""
        self._closing = True
        self._stop.set()
        self._done.put(None)
        if wait:
            self._monitor.join()
            self._collector.join()
