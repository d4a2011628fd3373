"""ringpool.ClusterExecutor: ringpool's Executor surface over a dask.distributed cluster.

::

    client process                          dask scheduler            dask worker (each host)
    --------------                          --------------            -----------------------
    map ─► group of chunks: ringpool pickle ─► task (by-value trampoline, ─► _cluster_worker.run:
      (fn, items), out-of-band buffers        header, payload, buffers)    install the task's package
      │  registry changed? ─► _cluster_ship: a plugin per package          versions, unpickle, run the
      │     version (once per worker, shared by executors; joiners too)    chunks on the node-local
      ▼                                                                    ringpool.Executor, pickle
    window of tasks (_cluster_futures) ◄──── results + seconds taken ◄──── the values (+ first error)
      (bounded; yielded in order; _Pacer sizes the next groups from the seconds)

- A dask task carries a **group** of a map's chunks, as many as make ~_TASK_SECONDS of work
  measured on the workers (``_Pacer``): dask's fixed cost per task (milliseconds across client,
  scheduler and worker) is then a few percent whatever the chunksize, and dask's scheduling
  (placement, work stealing, retries after a worker dies) still decides where each group runs.
  ``chunksize`` is the smallest unit of a task (a task carries whole chunks); on the host the
  node-local pool takes a task's items one by one (its rings batch them by themselves).
- The call is ringpool's hybrid pickle (registered packages and hand-imported modules by
  reference, lambdas and ``__main__`` by value) with protocol-5 out-of-band buffers, which dask
  sends as frames of their own (a numpy array is never inside a pickle).
- Packages in ringpool's registry reach the cluster through ``_cluster_ship``; every task names
  the versions it was pickled with, and the worker runs it only with exactly those installed.

This module imports ``distributed``; ``import ringpool`` does not import it (``ringpool.ClusterExecutor``
is resolved lazily). Deviations from ``ringpool.Executor`` are listed on the class.
"""
from __future__ import annotations

import collections
import itertools
import queue
import time
import weakref
from concurrent.futures import Executor as _Executor
from concurrent.futures import TimeoutError as _FuturesTimeout

import distributed

from . import _cluster_ship
from ._cluster_futures import ClusterWorkerDied, SchedulerLost, _DaskTasks, decode, probe, stats, warm
from ._cluster_worker import dumps, pool_config
from .bundle import _as_bundle
from .executor import _check_progress, _progress_bar, _raise_call_error
from .reduction import explain_parts

__all__ = ["ClusterExecutor", "ClusterWorkerDied", "SchedulerLost"]

# Seconds the client may be disconnected from the scheduler before every pending future fails
# with SchedulerLost: long enough to ride out a scheduler restart on a loaded machine, short
# enough that a caller blocked on a result learns within a bounded time.
_SCHEDULER_TIMEOUT = 20.0
_CONNECT_TIMEOUT = 10.0  # seconds to reach the scheduler at construction
# Work one dask task should carry, as measured on the workers: ~25x dask's fixed cost per task
# (~2 ms here), so that cost stays a few percent; longer tasks would balance worse at the end
# of a map and hold more items in flight.
_TASK_SECONDS = 0.05
# ... and at least this much per dask thread in the cluster: the scheduler spends ~0.5-1 ms of its
# one core per task, so with every thread finishing a task per (threads x 2 ms) it stays at most
# about half busy however many hosts there are (0.4 s tasks at 200 threads, 4 s at 2,000).
_TASK_SECONDS_PER_THREAD = 0.002
_TASK_ITEMS = 32768  # items one task carries at most (bounds a map's memory in flight)
# A task carries at most this many times the items of the largest task measured so far: a size
# is tried before one much larger is (the first chunks may be unlike the rest). 16: a no-op map
# reaches full-size tasks after two rounds of measurements instead of four at 4x.
_GROWTH = 16
# While a map ramps up, a result that makes the next task this many times larger than the last one
# submitted tops the window up at once (instead of when half of it is consumed): each step of the
# ramp costs one dask round trip, not half a window of them.
_RAMP = 4
# A time-boxed task (the ramp's larger tasks) stops after this many times a task's target time: it
# trims an estimate far too low, not the ordinary error of one (a task cut short costs another).
_BOX = 2


class _Pacer:
    """How many items one dask task of a map of ``fn`` carries, from the seconds the workers
    spent on the tasks so far (shared by the maps of one function in one executor; updated from
    any thread without a lock: an estimate)."""

    def __init__(self):
        self.seconds = 0.0  # work measured on the workers, older tasks decayed (halved per task)
        self.count = 0.0    # items of that work, decayed alike: their ratio weighs big tasks more
        self.largest = 0    # items of the largest task measured

    @property
    def per_item(self):
        return self.seconds / self.count if self.count else None

    def items(self, chunksize, seconds, capped=True):
        """Items for the next task, to make ``seconds`` of work: whole chunks, at least one; with
        ``capped``, at most _GROWTH times the largest task measured."""
        per = self.per_item
        if per is None:
            return chunksize
        want = min(seconds / max(per, 1e-9), _TASK_ITEMS)
        if capped:
            want = min(want, _GROWTH * max(self.largest, chunksize))
        return max(1, int(want) // chunksize) * chunksize

    def observe(self, items, seconds):
        if items > 0:
            self.seconds = self.seconds / 2 + seconds
            self.count = self.count / 2 + items
            self.largest = max(self.largest, items)


class ClusterExecutor(_Executor):
    """A ``concurrent.futures`` executor whose tasks run on a dask.distributed cluster, each dask
    worker fanning them out to a node-local ``ringpool.Executor``.

    address_or_client: a scheduler address (``"tcp://host:8786"``) or a ``distributed.Client``
        (left open at shutdown).
    processes_per_worker: workers of each dask worker's local pool (default: the CPUs that dask
        worker may use).
    preload, initializer, initargs, max_tasks_per_child, zygote, task_timeout: as
        ``ringpool.Executor``'s, for every local pool (an initializer runs in each local worker).
    bundle: a ``ringpool.Bundle`` (or a path to one): the environment of every local pool's
        workers, on every host (sent once per dask worker).
    retries: times dask runs a task again after it raised (a task whose worker died is rerun by
        the scheduler up to its ``allowed-failures`` anyway).
    connect_timeout: seconds to reach the scheduler at construction (TimeoutError naming it).
    scheduler_timeout: seconds without a scheduler after which pending futures fail
        (``SchedulerLost``).
    max_in_flight: dask tasks one map keeps submitted ahead of the one it yields (default: every
        dask thread's twice over, plus 2).

    Any thread may call submit/map/starmap/imap/imap_unordered/shutdown. Deviations from
    ``ringpool.Executor``: ``map`` and ``starmap`` read their iterables lazily (a bounded window
    of tasks), like ``imap``; ``worker_pids`` does not exist (``cluster_stats()`` reports each dask
    worker's pool); a task whose dask worker dies runs again on another worker (dask's
    ``allowed-failures``) and only then fails with ``ClusterWorkerDied`` (a ``WorkerDied`` naming
    the dask worker's address); ``mp_context`` is not offered (a context is per process: the
    local pools' contexts are made on each host from ``preload``, ``zygote`` and ``bundle``).
    """

    def __init__(self, address_or_client, *, processes_per_worker=None, preload=None, bundle=None,
                 initializer=None, initargs=(), max_tasks_per_child=None, zygote=True, task_timeout=None,
                 retries=0, connect_timeout=_CONNECT_TIMEOUT, scheduler_timeout=_SCHEDULER_TIMEOUT,
                 max_in_flight=None):
        if processes_per_worker is not None and (not isinstance(processes_per_worker, int) or processes_per_worker < 1):
            raise ValueError("processes_per_worker must be a positive int or None")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None and (not isinstance(max_tasks_per_child, int) or max_tasks_per_child <= 0):
            raise ValueError("max_tasks_per_child must be a positive int")
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError("task_timeout must be positive")
        if isinstance(preload, str):
            preload = (preload,)
        self._bundle = _as_bundle(bundle)
        try:
            self._config = pool_config(processes_per_worker, preload or (), self._bundle and self._bundle.hash,
                                       zygote, initializer, initargs, max_tasks_per_child, task_timeout)
        except Exception as exc:
            _raise_call_error(initializer, tuple(initargs), {}, exc)
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
        self._shutdown = False
        self._paces = weakref.WeakKeyDictionary()  # fn -> _Pacer
        try:
            self._check_workers()
            self._client.register_worker_plugin(_cluster_ship._PoolPlugin())
            self._shipper = _cluster_ship.shipper(self._client)
            if self._bundle is not None:
                self._shipper.ship_bundle(self._client, self._bundle)
            needs = self._shipper.ship(self._client)
            # Every current dask worker starts its node-local pool now, in a thread of its own,
            # while the caller prepares its first map (a pool takes ~0.2-1 s to start; without
            # this the first tasks wait for it). Workers that join later start theirs at their
            # first task.
            self._client.run(warm, self._config, needs)
        except BaseException:
            if self._own_client:
                self._client.close()
            raise
        self._tasks = _DaskTasks(self._client, scheduler_timeout, retries)

    @staticmethod
    def _connect(address, timeout):
        try:
            return distributed.Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise TimeoutError(f"ringpool.ClusterExecutor: could not reach a dask scheduler at {address} within "
                               f"{timeout:g} s ({type(exc).__name__}: {exc})") from None

    def _check_workers(self):
        bad = {addr: (host, err) for addr, (ver, host, err) in self._client.run(probe).items() if ver is None}
        if bad:
            lines = "; ".join(f"{a} on host {h}: {e}" for a, (h, e) in sorted(bad.items()))
            raise RuntimeError(f"ringpool is not importable on {len(bad)} dask worker(s): {lines}. Install ringpool "
                               f"(with its compiled extension) on every host of the cluster")

    def __repr__(self):
        state = "broken" if self._tasks.broken else "shut down" if self._shutdown else "running"
        return f"<ringpool.ClusterExecutor {state}, scheduler {self._address}>"

    @property
    def client(self):
        """The ``distributed.Client`` the executor submits through (given, or made from the address)."""
        return self._client

    def cluster_stats(self):
        """{dask worker address: what it received (package:hash -> times), what it has installed,
        its local pools' pids, its pid and host}. Runs on every worker (a dask ``client.run``)."""
        return self._client.run(stats)

    # -- submitting -------------------------------------------------------------------------------
    def _check_open(self):
        if self._tasks.broken is not None:
            raise self._tasks.broken
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _submit(self, op, calls):
        """Pickle calls (in the caller: a pickling error raises here), ship what they need, submit
        them as dask tasks in one message. Returns ([(dask future, Future)], None or (the call that
        failed to pickle, its error)): the calls before a failed one are submitted."""
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
        needs = self._shipper.ship(self._client)  # after pickling: it may have registered a module
        return self._tasks.submit((self._config, needs, op), prepared, op, self._check_open), failed

    def submit(self, fn, /, *args, **kwargs):
        """Schedule fn(*args, **kwargs) on the cluster; returns a ``concurrent.futures.Future``
        (cancelling it cancels the dask task). An argument that cannot be pickled raises here,
        naming its path."""
        out, failed = self._submit("call", [(fn, args, kwargs)])
        if failed:
            _raise_call_error(fn, args, kwargs, failed[1])
        return out[0][1]

    def map(self, fn, *iterables, timeout=None, chunksize=1, progress=False, total=None):
        """Like ``Executor.map``: results in order; a dask task carries as many chunks of
        ``chunksize`` items as make ~50 ms of work (more on a large cluster; at least one). The
        iterables are read lazily, with at most ``max_in_flight`` tasks submitted ahead of the one
        being yielded (the first ones are submitted now). ``progress=True``: a tqdm bar."""
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        if total is None:
            try:
                total = min(len(i) for i in iterables)
            except TypeError:
                total = None
        single = len(iterables) == 1
        items = iter(iterables[0]) if single else zip(*iterables)
        return self._start(fn, items, single, chunksize, True, timeout, progress, total)

    def starmap(self, fn, iterable, timeout=None, chunksize=1, progress=False, total=None):
        """fn(*args) for each args tuple of ``iterable``, results in order, read lazily as in ``map``."""
        return self._start(fn, (tuple(a) for a in iterable), False, chunksize, True, timeout, progress, total)

    def imap(self, fn, iterable, chunksize=1, progress=False, total=None):
        """fn(item) for each item, results in input order; ``iterable`` is read lazily (as ``map``)."""
        return self._start(fn, iter(iterable), True, chunksize, True, None, progress, total)

    def imap_unordered(self, fn, iterable, chunksize=1, progress=False, total=None):
        """fn(item) for each item, in completion order (a task's items in order); ``iterable`` is
        read lazily with a bounded number of tasks outstanding."""
        return self._start(fn, iter(iterable), True, chunksize, False, None, progress, total)

    def _start(self, fn, items, single, chunksize, ordered, timeout, progress, total):
        """Check the arguments, submit the first window of tasks (now, so that a pickling error
        raises in the call), and return the generator of the results."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        _check_progress(progress)
        end = None if timeout is None else time.monotonic() + timeout
        run = _MapRun(self, fn, items, single, chunksize)
        run.top_up(ordered)
        return run.results(ordered, end, _progress_bar(progress, total))

    def _pacer(self, fn):
        try:
            return self._paces.setdefault(fn, _Pacer())
        except TypeError:  # not weakly referenceable or not hashable: learn within this map only
            return _Pacer()

    def _sizing(self):
        """(tasks a map keeps in flight, seconds of work per task), from the cluster's dask threads
        now (workers may join or leave during a map: the next map sees them)."""
        try:
            threads = max(1, sum(self._client.nthreads().values()))
        except Exception:
            threads = 2
        window = self._max_in_flight if self._max_in_flight is not None else 2 * threads + 2
        return window, max(_TASK_SECONDS, _TASK_SECONDS_PER_THREAD * threads)

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stop accepting work; with cancel_futures, cancel what has not finished (here and on the
        cluster); with wait, wait for the rest. Closes the client if this executor made it."""
        with self._tasks.lock:
            first = not self._shutdown
            self._shutdown = True
        pending = self._tasks.pending_futures()
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
            self._tasks.close(wait)
            if self._own_client:
                if self._tasks.broken is not None:
                    self._client.close(timeout=2)  # no scheduler to say goodbye to
                else:
                    self._client.close()


class _MapRun:
    """One map/imap_unordered: cuts the input into tasks of whole chunks (sized by the function's
    ``_Pacer``), keeps a window of them in flight and yields their results. Used by the thread
    iterating it."""

    def __init__(self, ex, fn, items, single, chunksize):
        self.ex, self.fn, self.items, self.single, self.chunksize = ex, fn, items, single, chunksize
        self.pacer = ex._pacer(fn)
        self.limit, self.task_seconds = ex._sizing()
        self.live = collections.deque()  # (dask future, Future, item count, items if time-boxed), in order
        self.arrived = queue.SimpleQueue()  # finished Futures, for an unordered run
        self.exhausted = False
        self.last_size = 0  # items of the last task submitted

    def next_size(self):
        return self.pacer.items(self.chunksize, self.task_seconds)

    def top_up(self, ordered):
        """Submit tasks until the window is full, in one scheduler message. With nothing measured
        for the function yet: half the window of one-chunk probes (at least one per dask thread);
        the other half is left for tasks sized from the probes' times, submitted as soon as the
        first one answers. While the growth cap holds a task below the size the times ask for
        (the ramp) and a chunk is measured at under half a task's target time, a task carries
        _GROWTH times that size, time-boxed: the worker stops feeding its pool after _BOX times
        the target time and the items it did not run come back to be sent again. So the ramp reaches full
        size in one step for fast functions, and a slow function's tasks stay one chunk (a
        time-boxed task of slow chunks would hold its other chunks while the first runs)."""
        probing = self.pacer.per_item is None
        limit = max(1, self.limit // 2) if probing else self.limit
        size, boxed = self.next_size(), False
        if not probing and self.pacer.items(self.chunksize, self.task_seconds, capped=False) > size \
                and self.pacer.per_item * self.chunksize * 2 <= self.task_seconds:
            size = min(_GROWTH * size, max(1, _TASK_ITEMS // self.chunksize) * self.chunksize)
            boxed = True
        calls, parts = [], []
        while not self.exhausted and len(self.live) + len(calls) < limit:
            part = list(itertools.islice(self.items, size))
            if not part:
                self.exhausted = True
                break
            calls.append((self.fn, part, self.single, (self.chunksize, _BOX * self.task_seconds)) if boxed
                         else (self.fn, part, self.single))
            parts.append(part)
        self._send(calls, parts if boxed else [None] * len(calls), ordered, front=False)

    def _send(self, calls, parts, ordered, front):
        """Submit calls in one scheduler message; their tasks join the window at its end, or at its
        front (the rest of a time-boxed task, due before everything else in flight)."""
        if not calls:
            return
        self.last_size = max(len(c[1]) for c in calls)
        out, failed = self.ex._submit("map", calls)
        entries = [(df, cf, len(c[1]), part) for (df, cf), c, part in zip(out, calls, parts)]
        if front:
            self.live.extendleft(reversed(entries))
        else:
            self.live.extend(entries)
        if not ordered:
            for e in entries:
                e[1].add_done_callback(self.arrived.put)
        if failed:
            _raise_map_error(self.fn, failed[0][1], failed[1])

    def send_rest(self, rest, ordered):
        """The items a time-boxed task did not run: again, in tasks sized from what is measured
        now, ahead of the tasks in flight (their values come next)."""
        size = self.next_size()
        calls = [(self.fn, rest[i:i + size], self.single) for i in range(0, len(rest), size)]
        self._send(calls, [None] * len(calls), ordered, front=True)

    def results(self, ordered, end, bar):
        try:
            while self.live:
                if ordered:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        raise _FuturesTimeout()
                    raw = self.live[0][1].result(left)
                    _, _, n, part = self.live.popleft()
                else:
                    cf = self.arrived.get()
                    entry = next(e for e in self.live if e[1] is cf)
                    self.live.remove(entry)
                    raw, n, part = cf.result(), entry[2], entry[3]
                values, err, seconds = decode(raw)
                if part is not None and err is None:  # time-boxed: it ran this many items
                    n = len(values)
                self.pacer.observe(n, seconds)
                if part is not None and err is None and n < len(part):
                    self.send_rest(part[n:], ordered)
                # Top up in batches (one scheduler message each), or at once while the task
                # size is still growing (the ramp of a function's first map).
                if len(self.live) <= self.limit // 2 or self.next_size() >= _RAMP * self.last_size:
                    self.top_up(ordered)
                if bar is not None:
                    bar.update(len(values))
                yield from values
                if err is not None:
                    raise err
        finally:
            if bar is not None:
                bar.close()
            self.ex._tasks.cancel([e[0] for e in self.live])


def _raise_map_error(fn, chunk, exc):
    better = explain_parts([("fn", fn), *((f"items[{i}]", a) for i, a in enumerate(chunk))],
                           getattr(exc, "__cause__", None) or exc)
    if better is exc or better is getattr(exc, "__cause__", None):
        raise exc
    raise better from exc
