"""ringpool.ClusterExecutor: ringpool's Executor surface over a dask.distributed cluster.

::

    client process                          dask scheduler            dask worker (each host)
    --------------                          --------------            -----------------------
    map/submit ─► chunk: ringpool pickle ─► task (by-value trampoline, ─► _cluster_worker.run:
      (fn, items), out-of-band buffers        header, payload, buffers)    install the chunk's package
      │  registry changed? ─► plugin per package (bytes, once per         versions, unpickle, fan out to
      │                       worker per version; later joiners too)      the node-local ringpool.Executor
      ▼                                                                    (processes, rings), pickle the
    window of chunk futures ◄──────── results (pickle + buffers) ◄────── values (+ first error)
      (bounded; yielded in order)
    monitor thread: scheduler gone for longer than scheduler_timeout -> pending futures fail

- A chunk is one dask task: dask's scheduling (placement, work stealing, retries after a worker
  dies) decides where it runs; ringpool decides how its items use the host's cores.
- The task function travels by value and imports ringpool on the worker itself, so a host without
  ringpool answers "ringpool is not importable on dask worker ..." instead of an unpickling
  traceback; the call itself is ringpool's hybrid pickle (registered packages and hand-imported
  modules by reference, lambdas and ``__main__`` by value) with protocol-5 out-of-band buffers,
  which dask sends as frames of their own (a numpy array is never inside a pickle).
- Packages in ringpool's registry (``ringpool.modules``) go to the cluster as worker plugins, one
  per package, named after it: the scheduler keeps the newest version for workers that join later,
  and each dask worker receives each version once. Every chunk names the versions it was pickled
  with; the worker runs it only with exactly those installed (``_cluster_worker._Versions``).

This module imports ``distributed``; ``import ringpool`` does not import it (``ringpool.ClusterExecutor``
is resolved lazily). Deviations from ``ringpool.Executor`` are listed on the class.
"""
from __future__ import annotations

import collections
import io
import itertools
import logging
import pickle
import queue
import threading
import time
from concurrent.futures import Executor as _Executor
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures import TimeoutError as _FuturesTimeout
from concurrent.futures.process import BrokenProcessPool

import distributed
from distributed.diagnostics.plugin import WorkerPlugin

from . import _cluster_worker, modules
from ._cluster_worker import dumps
from .bundle import _as_bundle
from .reduction import explain_parts
from .executor import RemoteTraceback, WorkerDied, _progress_bar, _raise_call_error

__all__ = ["ClusterExecutor", "ClusterWorkerDied", "SchedulerLost"]

_log = logging.getLogger("ringpool.cluster")

# Seconds the client may be disconnected from the scheduler before every pending future fails
# with SchedulerLost: long enough to ride out a scheduler restart on a loaded machine, short
# enough that a caller blocked on a result learns within a bounded time.
_SCHEDULER_TIMEOUT = 20.0
_CONNECT_TIMEOUT = 10.0  # seconds to reach the scheduler at construction
_MONITOR_STEP = 0.5
# Out-of-band buffers (numpy arrays) at least this large are scattered to a worker ahead of the
# task instead of riding in the task's message through the scheduler.
_SCATTER_BYTES = 1 << 20
# A map's window of chunks in flight (see ClusterExecutor._window).
_WINDOW_ITEMS = 16384
_WINDOW_CHUNKS = 1024
_GATHER_BATCH = 256  # finished chunks fetched by one gather at most

# The task function, built by value: cloudpickle ships its code (its module does not exist on the
# worker), so unpickling it needs nothing but Python; it then imports ringpool itself.
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


def ringpool_cluster_stats():
    from ringpool import _cluster_worker
    return _cluster_worker.stats()
'''
_ns = {"__name__": "ringpool_cluster_by_value"}
exec(compile(_TASK_SOURCE, "<ringpool.cluster task>", "exec"), _ns)
_chunk_task = _ns["ringpool_cluster_chunk"]
_probe = _ns["ringpool_cluster_probe"]
_stats = _ns["ringpool_cluster_stats"]
del _ns


class ClusterWorkerDied(WorkerDied):
    """A chunk's dask worker died while running it, and dask had no retry left for it."""

    def __init__(self, host, detail=""):
        self.host, self.detail = host, detail
        BrokenProcessPool.__init__(self, f"dask worker {host} died while running this task and no retry was left"
                                         + (f" ({detail})" if detail else ""))
        self.pid, self.exitcode = None, None

    def __reduce__(self):
        return (ClusterWorkerDied, (self.host, self.detail))


class SchedulerLost(BrokenProcessPool):
    """The client lost its dask scheduler for longer than the executor's scheduler_timeout."""


class _SnapshotPlugin(WorkerPlugin):
    """One registered package's sources, for every current and future dask worker."""

    def __init__(self, name, data):
        self.name = f"ringpool-package-{name}"
        self.data = data

    def setup(self, worker):
        _cluster_worker.receive_snapshot(self.data)


class _BundlePlugin(WorkerPlugin):
    def __init__(self, bundle):
        self.name = f"ringpool-bundle-{bundle.hash[:16]}"
        self.label, self.data = bundle.path, bundle.data

    def setup(self, worker):
        _cluster_worker.receive_bundle(self.label, self.data)


class _PoolPlugin(WorkerPlugin):
    """Lets the dask worker start ringpool workers; shuts its node-local pools down with it."""

    name = "ringpool-pool"

    def setup(self, worker):
        _cluster_worker.prepare(worker.address)

    def teardown(self, worker):
        # Also called when another ClusterExecutor registers this plugin again (dask replaces a
        # plugin of the same name): the pools, shared by every executor, stop only with the worker.
        if getattr(worker.status, "name", "").startswith("clos"):
                _cluster_worker.shutdown_pools()


def _decode(value):
    blob, bufs = value
    values, err = pickle.loads(blob, buffers=bufs)
    if err is not None:
        exc, tb = err
        exc.__cause__ = RemoteTraceback(tb)
        err = exc
    return values, err


def _translate(exc):
    """A dask-level failure of a chunk task -> the exception its futures get."""
    if type(exc).__name__ == "KilledWorker":
        last = exc.args[1] if len(exc.args) > 1 else None
        host = getattr(last, "address", None) or str(last)
        return ClusterWorkerDied(host, f"it ran on {exc.args[2] if len(exc.args) > 2 else '?'} workers, all died")
    return exc


class ClusterExecutor(_Executor):
    """A ``concurrent.futures`` executor whose tasks run on a dask.distributed cluster, each dask
    worker fanning them out to a node-local ``ringpool.Executor``.

    address_or_client: a scheduler address (``"tcp://host:8786"``) or a ``distributed.Client``
        (left open at shutdown).
    processes_per_worker: workers of each dask worker's local pool (default: the CPUs that dask
        worker may use).
    preload: modules the local pools' zygotes import once (as ``ringpool.Executor``'s).
    bundle: a ``ringpool.Bundle`` (or a path to one): the environment of every local pool's
        workers, on every host (sent once per dask worker).
    retries: times dask runs a chunk again after it raised (a chunk whose worker died is rerun by
        the scheduler up to its ``allowed-failures`` anyway).
    connect_timeout: seconds to reach the scheduler at construction (TimeoutError naming it).
    scheduler_timeout: seconds without a scheduler after which pending futures fail
        (``SchedulerLost``).
    max_in_flight: chunks one map keeps submitted ahead of the one it yields (default: enough for
        every dask thread twice over, and up to 16384 items' worth of small chunks, at most 1024).

    Any thread may call submit/map/imap_unordered/shutdown. Deviations from ``ringpool.Executor``:
    ``map`` reads its iterables lazily (a bounded window of chunks); ``worker_pids`` does not exist
    (``cluster_stats()`` reports each dask worker's pool); a chunk whose dask worker dies runs again
    on another worker (dask's ``allowed-failures``) and only then fails with ``ClusterWorkerDied``
    (a ``WorkerDied`` naming the dask worker's address); ``task_timeout``, ``initializer`` and
    ``max_tasks_per_child`` are not offered.
    """

    def __init__(self, address_or_client, *, processes_per_worker=None, preload=None, bundle=None, retries=0,
                 connect_timeout=_CONNECT_TIMEOUT, scheduler_timeout=_SCHEDULER_TIMEOUT, max_in_flight=None):
        if processes_per_worker is not None and (not isinstance(processes_per_worker, int) or processes_per_worker < 1):
            raise ValueError("processes_per_worker must be a positive int or None")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if isinstance(preload, str):
            preload = (preload,)
        self._bundle = _as_bundle(bundle)
        self._config = (processes_per_worker, tuple(preload or ()), self._bundle.hash if self._bundle else None)
        self._retries = int(retries)
        self._scheduler_timeout = float(scheduler_timeout)
        self._max_in_flight = max_in_flight
        if isinstance(address_or_client, distributed.Client):
            self._client, self._own_client = address_or_client, False
        elif isinstance(address_or_client, str):
            self._client = self._connect(address_or_client, connect_timeout)
            self._own_client = True
        else:
            raise TypeError(f"ClusterExecutor takes a scheduler address or a distributed.Client, "
                            f"not {type(address_or_client).__name__}")
        self._address = self._client.scheduler.address
        self._lock = threading.RLock()
        self._ship_lock = threading.Lock()
        self._shipped = {}          # package name -> hash registered on the cluster
        self._shipped_version = -1  # modules.registry_version() at the last check
        self._transfers = collections.Counter()  # package name -> plugin registrations (versions)
        self._pending = {}          # dask future key -> (dask future, concurrent Future, op, buffers held)
        self._shutdown = False
        self._broken = None
        try:
            self._check_workers()
            self._client.register_worker_plugin(_PoolPlugin())
            if self._bundle is not None:
                self._client.register_worker_plugin(_BundlePlugin(self._bundle))
            self._ship()
        except BaseException:
            if self._own_client:
                self._client.close()
            raise
        self._stop = threading.Event()
        self._done = queue.SimpleQueue()  # finished dask futures, for the collector
        self._collector = threading.Thread(target=self._collect, name="ringpool-cluster-collector", daemon=True)
        self._collector.start()
        self._monitor = threading.Thread(target=self._watch_scheduler, name="ringpool-cluster-monitor", daemon=True)
        self._monitor.start()

    @staticmethod
    def _connect(address, timeout):
        try:
            return distributed.Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise TimeoutError(f"ringpool.ClusterExecutor: could not reach a dask scheduler at {address} within "
                               f"{timeout:g} s ({type(exc).__name__}: {exc})") from None

    def _check_workers(self):
        bad = {addr: (host, err) for addr, (ver, host, err) in self._client.run(_probe).items() if ver is None}
        if bad:
            lines = "; ".join(f"{a} on host {h}: {e}" for a, (h, e) in sorted(bad.items()))
            raise RuntimeError(f"ringpool is not importable on {len(bad)} dask worker(s): {lines}. Install ringpool "
                               f"(with its compiled extension) on every host of the cluster")

    def __repr__(self):
        state = "broken" if self._broken else "shut down" if self._shutdown else "running"
        return f"<ringpool.ClusterExecutor {state}, scheduler {self._address}>"

    @property
    def client(self):
        """The ``distributed.Client`` the executor submits through (given, or made from the address)."""
        return self._client

    # -- code shipping ----------------------------------------------------------------------------
    def _ship(self):
        """Register a plugin for every package whose hash the cluster does not have (called before
        a chunk pickled under the current registry is submitted). Returns the (name, hash) pairs a
        chunk needs."""
        ver = modules.registry_version()
        if ver == self._shipped_version:
            return self._needs
        with self._ship_lock:
            ver = modules.registry_version()
            snaps = modules.snapshots()
            for s in snaps:
                if self._shipped.get(s.name) != s.hash:
                    self._client.register_worker_plugin(_SnapshotPlugin(s.name, s.to_bytes()))
                    self._shipped[s.name] = s.hash
                    self._transfers[s.name] += 1
                    _log.info("shipped %s %s (%d files) to the cluster", s.name, s.hash[:12], len(s.files))
            self._needs = tuple((s.name, s.hash) for s in snaps)
            self._shipped_version = ver
            return self._needs

    def cluster_stats(self):
        """{dask worker address: what it received (package:hash -> times), what it has installed,
        its local pools' pids, its pid and host}. Runs on every worker (a dask ``client.run``)."""
        return self._client.run(_stats)

    # -- submitting -------------------------------------------------------------------------------
    def _check_open(self):
        if self._broken is not None:
            raise self._broken
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _submit_chunks(self, op, calls):
        """Pickle chunks (in the caller: a pickling error raises here), ship what they need,
        submit them in one message to the scheduler. Returns ([(dask future, concurrent Future)],
        None or (the call that failed to pickle, its error)): the chunks before a failed one are
        submitted. For "call" the Future gets the call's result or exception, for "map" the
        chunk's raw answer (see _decode)."""
        self._check_open()
        prepared, failed = [], None
        for call in calls:
            try:
                prepared.append(dumps(call))
            except Exception as exc:
                failed = (call, exc)
                break
        if not prepared:
            return [], failed
        needs = self._ship()  # after pickling: the pickler may have registered a hand-imported module
        header = (self._config, needs, op)
        for _, bufs in prepared:
            big = [i for i, b in enumerate(bufs) if memoryview(b).nbytes >= _SCATTER_BYTES]
            if big:
                # Straight to a worker, not inside the task message through the scheduler (the
                # task then depends on them: dask moves them to wherever it runs).
                for i, fut in zip(big, self._client.scatter([bufs[i] for i in big], hash=False)):
                    bufs[i] = fut
        with self._lock:
            self._check_open()
            if len(prepared) == 1:
                dfs = [self._client.submit(_chunk_task, header, *prepared[0], pure=False, retries=self._retries)]
            else:
                dfs = self._client.map(_chunk_task, [header] * len(prepared), [p for p, _ in prepared],
                                       [b for _, b in prepared], pure=False, retries=self._retries)
            out = []
            for df, (_, bufs) in zip(dfs, prepared):
                cf = Future()
                self._pending[df.key] = (df, cf, op, bufs)
                out.append((df, cf))
        for df, cf in out:
            cf.add_done_callback(lambda cf, df=df: cf.cancelled() and self._cancel([df]))
            df.add_done_callback(self._chunk_done)
        return out, failed

    def _chunk_done(self, df):
        """A dask future finished (dask's callback thread): hand it to the collector."""
        self._done.put(df)

    def _collect(self):
        """The collector thread: takes finished dask futures in batches and fetches the results
        of a batch with one gather (one round trip through the scheduler, where a result() per
        future would make one each), then resolves their concurrent Futures."""
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
            with self._lock:
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

    _NO_RAW = object()

    def _resolve(self, entry, raw=_NO_RAW):
        df, cf, op, _ = entry
        if cf.done():
            return
        try:
            if raw is self._NO_RAW:
                raw = df.result()
            if op == "call":
                values, err = _decode(raw)
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
                    cf.set_exception(self._broken)
                except InvalidStateError:
                    pass
            else:
                cf.cancel()
        except BaseException as exc:
            try:
                cf.set_exception(_translate(exc))
            except InvalidStateError:
                pass

    def submit(self, fn, /, *args, **kwargs):
        """Schedule fn(*args, **kwargs) on the cluster; returns a ``concurrent.futures.Future``
        (cancelling it cancels the dask task). An argument that cannot be pickled raises here,
        naming its path."""
        out, failed = self._submit_chunks("call", [(fn, args, kwargs)])
        if failed:
            _raise_call_error(fn, args, kwargs, failed[1])
        return out[0][1]

    def map(self, fn, *iterables, timeout=None, chunksize=1, progress=False, total=None):
        """Like ``Executor.map``: results in order, ``chunksize`` items per dask task. The
        iterables are read lazily, with at most ``max_in_flight`` chunks submitted ahead of the
        one being yielded (the first ones are submitted now). ``progress=True``: a tqdm bar."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        end = None if timeout is None else time.monotonic() + timeout
        single = len(iterables) == 1
        if total is None:
            try:
                total = min(len(i) for i in iterables)
            except TypeError:
                total = None
        chunks = _chunks(iter(iterables[0]) if single else zip(*iterables), chunksize)
        window = collections.deque()
        limit = self._window(chunksize)
        self._fill(window, limit, fn, chunks, single)
        return self._ordered(window, limit, fn, chunks, single, end, progress, total)

    def imap_unordered(self, fn, iterable, chunksize=1, progress=False, total=None):
        """fn(item) for each item, in completion order; ``iterable`` is read lazily with a bounded
        number of chunks outstanding."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        chunks = _chunks(iter(iterable), chunksize)
        return self._unordered(fn, chunks, chunksize, progress, total)

    def _window(self, chunksize):
        """Chunks one map keeps in flight: enough to keep every dask thread busy while results
        travel, and for small chunks enough items to hide the round trips (at most _WINDOW_ITEMS
        items or _WINDOW_CHUNKS chunks: the memory a map may hold is bounded)."""
        if self._max_in_flight is not None:
            return self._max_in_flight
        try:
            threads = sum(self._client.nthreads().values())
        except Exception:
            threads = 2
        return max(2 * threads + 2, min(_WINDOW_CHUNKS, _WINDOW_ITEMS // chunksize))

    def _fill(self, window, limit, fn, chunks, single):
        calls = [(fn, chunk, single) for chunk in itertools.islice(chunks, limit - len(window))]
        if not calls:
            return
        out, failed = self._submit_chunks("map", calls)
        window.extend(out)
        if failed:
            _raise_map_error(fn, failed[0][1], failed[1])

    def _ordered(self, window, limit, fn, chunks, single, end, progress, total):
        bar = _progress_bar(progress, total)
        try:
            while window:
                df, cf = window[0]
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise _FuturesTimeout()
                try:
                    raw = cf.result(left)
                except _FuturesTimeout:
                    raise
                window.popleft()
                if len(window) <= limit // 2:  # top up in batches: one scheduler message each
                    self._fill(window, limit, fn, chunks, single)
                yield from _chunk_values(raw, bar)
        finally:
            if bar is not None:
                bar.close()
            self._cancel([df for df, _ in window])

    def _unordered(self, fn, chunks, chunksize, progress, total):
        bar = _progress_bar(progress, total)
        limit = self._window(chunksize)
        done = collections.deque()
        ready = threading.Condition()
        live = {}
        exhausted = False

        def arrived(cf):
            with ready:
                done.append(cf)
                ready.notify()

        try:
            while True:
                if not exhausted and len(live) <= limit // 2:
                    calls = [(fn, chunk, True) for chunk in itertools.islice(chunks, limit - len(live))]
                    exhausted = len(calls) < limit - len(live)
                    out, failed = self._submit_chunks("map", calls) if calls else ([], None)
                    for df, cf in out:
                        live[cf] = df
                        cf.add_done_callback(arrived)
                    if failed:
                        _raise_map_error(fn, failed[0][1], failed[1])
                if not live:
                    return
                with ready:
                    while not done:
                        ready.wait()
                    cf = done.popleft()
                live.pop(cf, None)
                yield from _chunk_values(cf.result(), bar)
        finally:
            if bar is not None:
                bar.close()
            self._cancel(list(live.values()))

    def _cancel(self, dfs):
        if not dfs:
            return
        with self._lock:
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
        connection needs no timeout: dask cancels the client's futures at once; _chunk_done.)"""
        answered = time.monotonic()
        while not self._stop.wait(_MONITOR_STEP):
            if self._shutdown and not self._pending:
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
        return self._broken or SchedulerLost(f"lost the dask scheduler at {self._address} ({detail}): "
                                             f"pending ringpool tasks failed")

    def _fail_all(self, exc):
        with self._lock:
            if self._broken is None:
                self._broken = exc
            exc = self._broken
            pending = list(self._pending.values())
            self._pending.clear()
        _log.error("%s", exc)
        for _, cf, _, _ in pending:
            try:
                cf.set_exception(exc)
            except InvalidStateError:
                pass

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop accepting work; with cancel_futures, cancel what has not finished (here and on the
        cluster); with wait, wait for the rest. Closes the client if this executor made it."""
        with self._lock:
            first = not self._shutdown
            self._shutdown = True
            pending = [e[1] for e in self._pending.values()]
        if cancel_futures:
            for cf in pending:
                cf.cancel()
        if wait:
            for cf in pending:
                try:
                    cf.exception()
                except BaseException:
                    pass
        if first:
            self._stop.set()
            self._done.put(None)
            if wait:
                self._monitor.join()
                self._collector.join()
            if self._own_client:
                if self._broken is not None:
                    self._client.close(timeout=2)  # no scheduler to say goodbye to
                else:
                    self._client.close()


def _chunks(it, size):
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def _chunk_values(raw, bar):
    """A finished chunk's results, in order (its error, if an item failed, raised after the
    items before it), counted on the progress bar."""
    values, err = _decode(raw)
    if bar is not None:
        bar.update(len(values))
    yield from values
    if err is not None:
        raise err


def _raise_map_error(fn, chunk, exc):
    better = explain_parts([("fn", fn), *((f"items[{i}]", a) for i, a in enumerate(chunk))],
                           getattr(exc, "__cause__", None) or exc)
    if better is exc or better is getattr(exc, "__cause__", None):
        raise exc
    raise better from exc
