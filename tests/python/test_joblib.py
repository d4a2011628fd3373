"""ringpool.joblib: joblib's Parallel on ringpool workers, used as joblib's docs use it."""
import os
import time

import pytest

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed, parallel_backend  # noqa: E402

import ringpool  # noqa: E402
import ringpool.joblib as rj  # noqa: E402

pytestmark = pytest.mark.integration


def square(x):
    return x * x


def pid_of(_):
    time.sleep(0.05)  # long enough that one worker cannot take every task
    return os.getpid()


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def slow(seconds):
    time.sleep(seconds)
    return seconds


def test_registered_name():
    assert joblib.parallel.BACKENDS["ringpool"] is rj.RingpoolBackend
    with parallel_backend("ringpool"):
        assert isinstance(joblib.parallel.get_active_backend()[0], rj.RingpoolBackend)


def test_results_in_input_order():
    out = Parallel(n_jobs=2, backend="ringpool")(delayed(square)(i) for i in range(1000))
    assert out == [i * i for i in range(1000)]


def test_runs_in_ringpool_workers_n_jobs():
    pids = set(Parallel(n_jobs=2, backend="ringpool", batch_size=1)(delayed(pid_of)(i) for i in range(40)))
    assert os.getpid() not in pids
    assert len(pids) == 2  # n_jobs workers, every one used
    ex = rj._pool[1]
    assert isinstance(ex, ringpool.Executor)
    assert pids == set(ex.worker_pids())


def test_n_jobs_semantics():
    backend = rj.RingpoolBackend()
    assert backend.effective_n_jobs(3) == 3
    assert backend.effective_n_jobs(-1) == joblib.cpu_count()
    assert backend.effective_n_jobs(-1000) == 1
    assert backend.effective_n_jobs(None) == 1
    with pytest.raises(ValueError, match="n_jobs == 0"):
        Parallel(n_jobs=0, backend="ringpool")(delayed(square)(i) for i in range(3))
    # n_jobs=1: sequential, in this process (joblib's rule for every backend)
    assert Parallel(n_jobs=1, backend="ringpool")(delayed(pid_of)(i) for i in range(3)) == [os.getpid()] * 3
    # n_jobs=-1: every CPU joblib counts
    p = Parallel(n_jobs=-1, backend="ringpool")
    if joblib.cpu_count() > 1:
        assert p(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]
        assert rj._pool[0][0] == joblib.cpu_count()


def test_exception_is_raised_with_its_type_and_remote_traceback():
    with pytest.raises(ValueError, match="bad item 7") as info:
        Parallel(n_jobs=2, backend="ringpool")(delayed(fail_on)(i, 7) for i in range(50))
    cause = info.value.__cause__
    assert isinstance(cause, ringpool.RemoteTraceback)
    assert "fail_on" in str(cause)
    # The pool is still usable afterwards.
    assert Parallel(n_jobs=2, backend="ringpool")(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]


def mark(path, seconds):
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write("x")


def test_exception_cancels_the_rest(tmp_path):
    log = tmp_path / "ran"
    log.write_text("")
    with pytest.raises(ValueError, match="bad item 0"):
        Parallel(n_jobs=2, backend="ringpool", batch_size=1, pre_dispatch="all")(
            [delayed(fail_on)(0, 0)] + [delayed(mark)(str(log), 0.05) for _ in range(1000)])
    # Wait until no more run (at most 15 s). Cancelled, only those already in a worker's ring run
    # (the Executor's initial depth, about 20 per worker); not cancelled, all 1000 would run, 40 a
    # second.
    end, last = time.monotonic() + 15, -1
    while time.monotonic() < end and len(log.read_text()) != last:
        last = len(log.read_text())
        time.sleep(1)
    assert len(log.read_text()) < 100


def test_parallel_backend_passes_executor_options():
    with parallel_backend("ringpool", preload=(), task_timeout=0.5):
        with pytest.raises(ringpool.TaskTimeout):
            Parallel(n_jobs=2)(delayed(slow)(s) for s in (0.01, 30))
    with pytest.raises(TypeError, match="n_jobs"):
        parallel_backend("ringpool", max_workers=3)


def test_timeout_and_a_fresh_pool_after_it():
    Parallel(n_jobs=2, backend="ringpool")(delayed(square)(i) for i in range(2))
    old = rj._pool[1]
    with pytest.raises(TimeoutError):
        Parallel(n_jobs=2, backend="ringpool", timeout=0.3)(delayed(slow)(s) for s in (0.01, 4))
    assert rj._pool is None and old._shutdown  # retired
    # The worker still sleeping is not in the next call's pool: both of its workers answer.
    pids = Parallel(n_jobs=2, backend="ringpool", batch_size=1)(delayed(pid_of)(i) for i in range(20))
    assert len(set(pids)) == 2


def test_sharedmem_refused():
    with pytest.raises(ValueError, match="shared memory"):
        Parallel(n_jobs=2, backend="ringpool", require="sharedmem")


def test_lambda_and_nested_call():
    # Lambdas travel by value (ringpool's hybrid pickler); a Parallel inside a task runs in
    # threads there (joblib's nesting rule).
    assert Parallel(n_jobs=2, backend="ringpool")(delayed(lambda x: x + 1)(i) for i in range(5)) == [1, 2, 3, 4, 5]

    def inner(n):
        return sum(Parallel(n_jobs=2)(delayed(square)(i) for i in range(n)))

    assert Parallel(n_jobs=2, backend="ringpool")(delayed(inner)(n) for n in (3, 4)) == [5, 14]


def test_reuses_the_pool_until_settings_change():
    Parallel(n_jobs=2, backend="ringpool")(delayed(square)(i) for i in range(4))
    first = rj._pool[1]
    Parallel(n_jobs=2, backend="ringpool")(delayed(square)(i) for i in range(4))
    assert rj._pool[1] is first
    Parallel(n_jobs=3, backend="ringpool")(delayed(square)(i) for i in range(4))
    assert rj._pool[1] is not first and first._shutdown
