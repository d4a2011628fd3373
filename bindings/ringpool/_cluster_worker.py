"""The dask-worker side of ``ringpool.ClusterExecutor`` (client side: ``ringpool/cluster.py``).

::

    dask worker process (one per host, or several)
    ├─ snapshot/bundle plugins ──► receive_snapshot / receive_bundle: bytes kept by hash, counted
    └─ task threads ──► run(header, payload, buffers)
          1. _Versions: install the exact package hashes the chunk was pickled with, waiting until
             no running chunk uses another version (a chunk never mixes versions)
          2. _pool(config): the node-local ringpool.Executor for this configuration (started once,
             reused by every later chunk; shut down by the pool plugin's teardown). warm(config)
             starts it in a thread when a ClusterExecutor is made, before its first task
          3. unpickle (fn, items), fan them out to the local pool, pickle the results
             (out-of-band buffers: numpy arrays go through dask's frames, not inside a pickle)

This module imports no dask: the client's task function (built by value, so that a host without
ringpool gets a message saying so instead of an unpickling traceback) imports it on the worker.
"""
from __future__ import annotations

import collections
import io
import logging
import multiprocessing
import os
import pickle
import socket
import threading
import time
import traceback

from . import modules
from ._errors import RemoteTraceback
from .bundle import Bundle
from .context import get_context
from .executor import Executor
from .reduction import Pickler

_log = logging.getLogger("ringpool.cluster")

# How long a chunk waits for a package version it needs to arrive (its plugin is registered before
# the first task that needs it is submitted, and a worker that joins later gets the plugins in its
# registration, before any task: this only covers a message still in flight).
_SNAPSHOT_WAIT = 30.0
# Versions of one package a dask worker keeps, least recently used dropped first (a version in use
# by a running task is never dropped): tasks submitted before a reload, and clients (say, two
# processes) that ship different versions of one package to the same workers, each find theirs
# without shipping it again. Also the versions of a package the scheduler keeps for workers that
# join later (_cluster_ship).
_KEEP_VERSIONS = 4

_cond = threading.Condition()
_store = {}                           # hash -> Snapshot received here
_by_name = collections.defaultdict(list)  # name -> hashes held in _store, least recently used first
_received = collections.Counter()     # (name, hash) -> times its bytes arrived in this process
_dropped = {}                         # hash -> name, of versions dropped from _store (least recently used)
_bundles = {}                         # bundle hash -> Bundle
_pools = {}                           # config -> ringpool.Executor
_address = None                       # this dask worker's address, for messages
_active = 0                           # chunks running
_active_versions = {}                 # name -> hash the running chunks use
_starting = set()                     # configs whose pool is being started (by warm or a task)
_shutdowns = 0                        # times shutdown_pools ran (a pool started across one is not kept)


def host_label():
    return f"{_address or 'dask worker'} on host {socket.gethostname()} (pid {os.getpid()})"


def prepare(address):
    """The pool plugin's setup: remember our address; let this process start workers.

    Python forbids a daemonic process (what a nanny and LocalCluster(processes=True) start, by
    default) from having children, because they would be orphaned when it is terminated at its
    parent's exit. ringpool's workers cannot be orphaned: they watch the outermost ringpool
    process (this dask worker) and die with it even when it is SIGKILLed (_worker._watch_root,
    docs/design/spawner.md). So the flag is lifted for this process; the dask worker itself is
    still ended by its nanny as before."""
    global _address
    _address = address
    cfg = multiprocessing.current_process()._config
    if cfg.get("daemon"):
        cfg["daemon"] = False


def receive_snapshot(data):
    snap = modules.Snapshot.from_bytes(data)
    with _cond:
        _received[(snap.name, snap.hash)] += 1
        if snap.hash not in _store:
            _store[snap.hash] = snap
            _use(snap.name, snap.hash)
        _cond.notify_all()


def _use(name, hash_):
    """Mark a version of ``name`` as used now (held by _cond); drop the least recently used ones
    beyond _KEEP_VERSIONS, except one a running task uses."""
    hashes = _by_name[name]
    if hash_ in hashes:
        hashes.remove(hash_)
    hashes.append(hash_)
    for old in [h for h in hashes if h != _active_versions.get(name)][:max(0, len(hashes) - _KEEP_VERSIONS)]:
        hashes.remove(old)
        _store.pop(old, None)
        _dropped[old] = name


def receive_bundle(label, data):
    b = Bundle._from_data(label, data)
    with _cond:
        _received[("<bundle>", b.hash)] += 1
        _bundles.setdefault(b.hash, b)
        _cond.notify_all()


def stats():
    """What this dask worker received and runs: for tests, the benchmark and troubleshooting."""
    with _cond:
        return {"received": {f"{n}:{h}": c for (n, h), c in _received.items()},
                "installed": modules.installed(),
                "pools": {repr(k): p.worker_pids() for k, p in _pools.items()},
                "pid": os.getpid(), "host": socket.gethostname()}


def shutdown_pools():
    global _shutdowns
    with _cond:
        _shutdowns += 1  # a pool still starting (warm) is shut down when it is ready
        pools = list(_pools.values())
        _pools.clear()
    for p in pools:
        p.shutdown(wait=True, cancel_futures=True)


def warm(config, needs):
    """Start the node-local pool for ``config`` in a thread of its own and return at once (the
    ClusterExecutor's constructor calls this on every dask worker, so that starting the pool
    overlaps with the client's first map instead of delaying its first tasks; a task that comes
    while it starts waits for it). A failure is only logged: the first task starts the pool
    again and gets the error."""
    def start():
        try:
            with _Versions(needs):  # the initializer may come from one of these packages
                _pool(config)
        except Exception as exc:
            _log.warning("ringpool: warming the node-local pool on %s failed (the first task retries): %s",
                         host_label(), exc)

    threading.Thread(target=start, name="ringpool-cluster-warm", daemon=True).start()


def _pool(config):
    """The node-local pool for ``config`` (see ``pool_config``), started by the first caller
    (``warm`` or a task); callers that come while it starts wait for it. It starts outside the
    lock: receiving packages and other configurations' tasks go on meanwhile."""
    with _cond:
        while True:
            p = _pools.get(config)
            if p is not None:
                return p
            if config not in _starting:
                break
            _cond.wait()
        _starting.add(config)
        shutdowns = _shutdowns
        try:
            bundle = None
            processes, preload, bundle_hash, zygote, init, max_tasks, task_timeout = config
            if bundle_hash is not None:
                end = time.monotonic() + _SNAPSHOT_WAIT
                while bundle_hash not in _bundles:
                    if not _cond.wait(max(0.0, end - time.monotonic())) and time.monotonic() >= end:
                        raise RuntimeError(f"bundle {bundle_hash[:12]} did not reach {host_label()} within "
                                           f"{_SNAPSHOT_WAIT:g} s")
                bundle = _bundles[bundle_hash]
        except BaseException:
            _starting.discard(config)
            _cond.notify_all()
            raise
    p = None
    try:
        initializer, initargs = pickle.loads(init) if init is not None else (None, ())
        if multiprocessing.current_process()._config.get("daemon"):
            # No pool plugin ran here (a worker started some other way): lift it as prepare() does.
            prepare(_address)
        ctx = get_context(preload=preload or None, zygote=zygote, bundle=bundle)
        try:
            p = Executor(processes or len(os.sched_getaffinity(0)) or 1, initializer=initializer, initargs=initargs,
                         max_tasks_per_child=max_tasks, mp_context=ctx, task_timeout=task_timeout)
        except AssertionError as exc:
            raise RuntimeError(f"{host_label()} cannot start ringpool workers ({exc}): start dask workers "
                               f"without the daemon flag (DASK_DISTRIBUTED__WORKER__DAEMON=False)") from exc
    finally:
        with _cond:
            _starting.discard(config)
            closed = _shutdowns != shutdowns
            if p is not None and not closed:
                _pools[config] = p
            _cond.notify_all()
    if closed:
        p.shutdown(wait=False, cancel_futures=True)
        raise RuntimeError(f"{host_label()} is closing: its ringpool pools are shut down")
    return p


def _discard(config, pool):
    with _cond:
        if _pools.get(config) is pool:
            del _pools[config]
    pool.shutdown(wait=False, cancel_futures=True)


def pool_config(processes, preload, bundle_hash, zygote, initializer, initargs, max_tasks_per_child, task_timeout):
    """The node-local pool's settings as one hashable value, sent with every chunk (client side):
    chunks with the same settings share one pool per dask worker. The initializer travels as
    ringpool's pickle (by value for a lambda or ``__main__``, by reference for a registered
    package), so it is unpickled only once the chunk's package versions are installed."""
    init = None
    if initializer is not None:
        f = io.BytesIO()
        Pickler(f, 5).dump((initializer, tuple(initargs)))
        init = f.getvalue()
    return (processes, tuple(preload), bundle_hash, bool(zygote), init, max_tasks_per_child, task_timeout)


class _Versions:
    """Hold the exact package versions ``needs`` while a chunk runs: install them (waiting for
    their bytes, and for running chunks of other versions to finish), count the chunk in."""

    def __init__(self, needs):
        self.needs = needs

    def __enter__(self):
        global _active
        needs = self.needs
        end = time.monotonic() + _SNAPSHOT_WAIT
        with _cond:
            while True:
                missing = [(n, h) for n, h in needs if h not in _store and modules.installed().get(n) != h]
                clash = _active and any(_active_versions.get(n, h) != h for n, h in needs)
                if not missing and not clash:
                    break
                dropped = [(n, h) for n, h in missing if h in _dropped]
                if dropped:  # its bytes will not come again: say so now, not after _SNAPSHOT_WAIT
                    raise RuntimeError(
                        f"{host_label()} dropped package {', '.join(f'{n} {h[:12]}' for n, h in dropped)}: it keeps "
                        f"the {_KEEP_VERSIONS} versions of a package used last, and more versions of it were used "
                        f"there since this one (by other clients or reloads)")
                left = end - time.monotonic()
                if left <= 0:
                    if missing:
                        raise RuntimeError(f"packages {', '.join(f'{n} {h[:12]}' for n, h in missing)} did not reach "
                                           f"{host_label()} within {_SNAPSHOT_WAIT:g} s")
                    end = time.monotonic() + _SNAPSHOT_WAIT  # other chunks still running: keep waiting
                    continue
                _cond.wait(min(left, 1.0))
            have = modules.installed()
            for n, h in needs:
                if have.get(n) != h and n not in modules._registry:  # registered: the client's own process
                    modules.install(_store[h])  # pushed to the local pool's workers (popen's listener)
                _active_versions[n] = h
                if h in _store:
                    _use(n, h)
            _active += 1

    def __exit__(self, *exc):
        global _active
        with _cond:
            _active -= 1
            if not _active:
                _active_versions.clear()
            _cond.notify_all()


def dumps(obj):
    """ringpool's hybrid pickle of obj, its protocol-5 out-of-band buffers apart, as uint8 numpy
    arrays: dask sends those as frames of their own (its numpy serializer), so a large array is
    neither copied into a pickle nor pickled again by dask (whose messages through the scheduler
    use pickle protocol 4, where a PickleBuffer cannot go). Without numpy, buffers are bytes."""
    bufs = []
    f = io.BytesIO()
    Pickler(f, 5, buffer_callback=bufs.append).dump(obj)
    if bufs:
        try:
            import numpy
        except ImportError:
            bufs = [bytes(b.raw()) for b in bufs]
        else:
            bufs = [numpy.frombuffer(b.raw(), dtype=numpy.uint8) for b in bufs]
    return f.getvalue(), bufs


def _error(exc, prefix=""):
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        tb = cause.tb
    else:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    tb = f"{prefix}[on {host_label()}]\n{tb}"
    try:
        pickle.dumps(exc)
    except Exception as perr:
        exc = RuntimeError(f"{type(exc).__qualname__}: {exc} (the exception itself could not be pickled: {perr})")
    exc.__cause__ = None
    exc.__context__ = None
    exc.__traceback__ = None
    return exc, tb


def _run_boxed(pool, fn, items, single, chunksize, budget, start, values):
    """A time-boxed task (sent while a map's task sizes ramp up, larger than the times measured so
    far ask for): feed the pool slices of whole chunks (about an eighth of the task each, two in
    flight) and stop feeding once ``budget`` seconds have passed since ``start``; the slices in
    flight finish. Appends to ``values``; the items not run are the client's to send again (it
    sees fewer values than items)."""
    step = max(1, -(-len(items) // (8 * chunksize))) * chunksize
    step = max(step, -(-2 * pool._max_workers // chunksize) * chunksize)  # every local worker busy
    pending = collections.deque()  # iterators of the slices' values, in order
    i = 0
    stop = False
    while True:
        while i < len(items) and not stop and len(pending) < 2:
            part = items[i:i + step]
            i += len(part)
            pending.append(pool.map(fn, part) if single else pool.map(fn, *zip(*part)))
        if not pending:
            return
        values.extend(pending.popleft())
        stop = stop or time.perf_counter() - start >= budget


def run(header, payload, buffers):
    """One dask task. header: (pool config, needs, op); payload + buffers: ringpool's pickle of the
    call, (fn, args, kwargs) for op "call", (fn, items, single) or (fn, items, single, (chunksize,
    budget)) for "map" (a group of the map's chunks; the second form time-boxed: see
    ``_run_boxed``). Returns the pickle (and out-of-band buffers) of (values, error), and the
    seconds the work took here: the values of the items before the first that failed (or, for a
    time-boxed task, before the first not run), and that failure as (exception, remote traceback)
    or None."""
    config, needs, op = header
    with _Versions(needs):
        pool = _pool(config)  # the initializer may need the chunk's package versions
        start = time.perf_counter()  # after a pool's start: the client sizes tasks from this
        try:
            call = pickle.loads(payload, buffers=buffers)
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                f"{exc} on {host_label()}: the task refers to a module the client imports from its own "
                f"sys.path; register it there (ringpool.register_module({exc.name!r})) to ship it to the "
                f"cluster", name=exc.name) from None
        values, err = [], None
        try:
            if op == "call":
                fn, args, kwargs = call
                values.append(pool.submit(fn, *args, **kwargs).result())
            else:
                fn, items, single, *box = call
                # One item at a time (ringpool batches them onto its rings by itself): a failing
                # item costs only the items after it, as the values before it are kept.
                if box:
                    _run_boxed(pool, fn, items, single, *box[0], start, values)
                elif single:
                    values.extend(pool.map(fn, items))
                elif items:
                    values.extend(pool.map(fn, *zip(*items)))
        except BaseException as exc:
            if not isinstance(exc, Exception):
                raise
            err = _error(exc)
            if pool._broken is not None:  # its initializer raised: the next task tries a new pool
                _discard(config, pool)
        seconds = time.perf_counter() - start
        try:
            return (*dumps((values, err)), seconds)
        except Exception as exc:
            return (*dumps(([], _error(exc, "a result could not be pickled\n"))), seconds)
