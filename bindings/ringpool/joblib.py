"""A joblib parallel backend named ``"ringpool"``, over ``ringpool.Executor``.

``import ringpool.joblib`` registers it; then::

    from joblib import Parallel, delayed, parallel_backend
    import ringpool.joblib

    Parallel(n_jobs=4, backend="ringpool")(delayed(f)(x) for x in data)
    with parallel_backend("ringpool", preload=["numpy"], task_timeout=60):   # Executor options
        Parallel(n_jobs=4)(delayed(f)(x) for x in data)

joblib does what it always does (batching, ``pre_dispatch``, ``verbose``, result order,
``timeout``); the backend gives it a ``ringpool.Executor`` with ``n_jobs`` workers. joblib's
semantics, as its loky backend has them:
- ``n_jobs``: -1 is every CPU joblib counts (``joblib.cpu_count()``), -2 all but one, and so on;
  ``n_jobs=1`` (or None outside a ``parallel_backend`` block) runs sequentially in the caller, as
  every joblib backend does; 0 is a ValueError.
- Results come back in the order of the input; the first exception a task raises is raised by
  ``Parallel`` with its own type (its ``__cause__`` a ``ringpool.RemoteTraceback`` with the
  worker's traceback), and the batches not yet started are cancelled.
- ``Parallel(timeout=S)`` raises ``TimeoutError`` when a batch's result takes longer than S.

Deviations from loky:
- Batches already running in a worker when an exception (or ``timeout``) aborts the call run to
  their end, their results dropped: the worker is not killed, but the pool is retired and the next
  call gets a fresh one (workers start in milliseconds from the zygote), so it never waits behind
  them. ``task_timeout=`` (an Executor option) bounds a task's run time: an overrunning task's
  worker is killed and the task fails with ``ringpool.TaskTimeout``.
- ``max_nbytes``/``mmap_mode`` (loky's automatic memory-mapping of large numpy arguments) are
  ignored: ringpool sends large arrays out of band through shared memory anyway
  (docs/design/queues.md).
- ``require="sharedmem"`` is refused, as by every process backend.

The pool is reused between ``Parallel`` calls (as loky's is): one Executor at a time, made again
when ``n_jobs`` or the Executor options change, shut down at interpreter exit.
"""
from __future__ import annotations

import threading

from joblib import register_parallel_backend
from joblib._parallel_backends import (AutoBatchingMixin, FallbackToBackend, ParallelBackendBase,
                                        SafeFunction, SequentialBackend)
from joblib.parallel import cpu_count

__all__ = ["RingpoolBackend", "NAME"]

NAME = "ringpool"

_pool_lock = threading.Lock()
_pool = None  # (key, Executor): the one reused pool


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _retire(ex):
    """Stop reusing ex: the next call gets a fresh pool while ex's workers finish what they run."""
    global _pool
    with _pool_lock:
        if _pool is not None and _pool[1] is ex:
            _pool = None
    ex.shutdown(wait=False, cancel_futures=True)


def _executor(n_jobs, options):
    """The shared Executor for these settings, made (and the previous one shut down) if need be."""
    global _pool
    from .executor import Executor  # deferred: `import ringpool.joblib` stays cheap until used

    key = (n_jobs, _freeze(options))
    with _pool_lock:
        if _pool is not None and _pool[0] == key and not _pool[1]._shutdown:
            return _pool[1]
        old, _pool = _pool, None
        if old is not None:
            old[1].shutdown(wait=False, cancel_futures=True)
        ex = Executor(max_workers=n_jobs, **options)
        _pool = (key, ex)
        return ex


class RingpoolBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ``ParallelBackendBase`` over a ``ringpool.Executor``.

    Keyword arguments (given to ``parallel_backend("ringpool", ...)``) are ``ringpool.Executor``'s:
    ``preload``, ``initializer``, ``initargs``, ``max_tasks_per_child``, ``mp_context``,
    ``zygote``, ``task_timeout``. Called by joblib, from the thread that runs ``Parallel``, and
    (``apply_async``'s callback) from the thread that receives a result.
    """

    supports_timeout = True
    supports_sharedmem = False

    def __init__(self, nesting_level=None, inner_max_num_threads=None, **executor_options):
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        if "max_workers" in executor_options:
            raise TypeError("the number of workers is Parallel's n_jobs, not max_workers")
        self._options = executor_options
        self._executor = None
        self._futures = set()
        self._futures_lock = threading.Lock()
        self.parallel = None

    def effective_n_jobs(self, n_jobs):
        """The number of workers ``n_jobs`` stands for (joblib's rules; module docstring)."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if n_jobs < 0:
            return max(cpu_count() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None, **parallel_args):
        """Make (or reuse) the pool; returns the number of workers. Parallel's other arguments
        (``max_nbytes``, ``mmap_mode``, ``temp_folder``, ``context``, ``verbose``) do not apply."""
        if require == "sharedmem":
            raise ValueError("the ringpool backend runs tasks in other processes: no shared memory")
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self._executor = _executor(n_jobs, self._options)
        self.parallel = parallel
        return n_jobs

    def apply_async(self, func, callback=None):
        """Submit one batch to the Executor; the Future doubles as joblib's job (``get``)."""
        future = self._executor.submit(SafeFunction(func))
        # joblib calls job.get(timeout=...) as on a multiprocessing AsyncResult; in Python 3.11
        # concurrent.futures.TimeoutError is the builtin TimeoutError joblib expects.
        future.get = future.result
        with self._futures_lock:
            self._futures.add(future)
        future.add_done_callback(self._done)
        if callback is not None:
            future.add_done_callback(lambda f: f.cancelled() or callback(f))
        return future

    def _done(self, future):
        with self._futures_lock:
            self._futures.discard(future)

    def abort_everything(self, ensure_ready=True):
        """Cancel every batch of this call not finished yet (their results are dropped). If any
        was outstanding, the pool is retired (its workers finish the batch they run, then exit)
        and the next call starts a fresh one rather than wait behind them."""
        with self._futures_lock:
            pending, self._futures = list(self._futures), set()
        for f in pending:
            f.cancel()
        if pending and self._executor is not None:
            _retire(self._executor)
        if ensure_ready and self.parallel is not None:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel, **self.parallel._backend_args)

    def terminate(self):
        """End of a ``Parallel`` call: forget this call's state, keep the pool for the next."""
        self._executor = None
        self.reset_batch_stats()


register_parallel_backend(NAME, RingpoolBackend)
