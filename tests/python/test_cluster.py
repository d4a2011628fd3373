"""ringpool.ClusterExecutor (ringpool/cluster.py, ringpool/_cluster_worker.py) against a real dask
scheduler and real dask workers on loopback: subprocesses in their own sessions, started with a
nanny (so the dask workers are daemonic processes), each with an empty working directory and only
ringpool on its path; every process group is killed when its test (or module) ends."""
import collections
import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest

distributed = pytest.importorskip("distributed")
np = pytest.importorskip("numpy")

import ringpool  # noqa: E402
from ringpool import _cluster_worker  # noqa: E402
from ringpool._cluster_futures import stats  # noqa: E402
from ringpool.cluster import _GROWTH, ClusterExecutor, ClusterWorkerDied, SchedulerLost, _MapRun, _Pacer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dask_procs as dp  # noqa: E402
# The task functions live in a module the dask workers do not have: registered, it is shipped.
import _cluster_tasks  # noqa: E402
from _cluster_tasks import _add, _fail_at, _kill_my_dask_worker, _kill_my_dask_worker_once, _sleep, _square  # noqa: E402

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("cluster_tasks_registered")]


@pytest.fixture(scope="module")
def cluster(cluster_tasks_registered):
    procs = dp.Procs()
    try:
        _, address = procs.scheduler()
        for i in range(2):
            procs.worker(address, f"w{i}")
        yield procs, address
    finally:
        procs.close()


@pytest.fixture(scope="module")
def ex(cluster):
    e = ClusterExecutor(cluster[1], processes_per_worker=1)
    try:
        dp.wait_workers(e.client, 2)
        yield e
    finally:
        e.shutdown(wait=False, cancel_futures=True)


def _make_package(root, name, version, pad=0):
    pkg = root / name
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        f"VERSION = {version}\n"
        "from .tools import Point\n"
        "def where(x):\n"
        "    import os\n"
        "    return (VERSION, x, os.getcwd())\n")
    (pkg / "tools.py").write_text(
        "class Point:\n"
        "    def __init__(self, x):\n"
        "        self.x = x\n"
        "    def norm(self):\n"
        "        return abs(self.x)\n")
    if pad:
        (pkg / "blob.py").write_text(f"DATA = {'x' * pad!r}\n")
    return pkg


# -- the Executor surface ---------------------------------------------------------------------------

def test_import_ringpool_does_not_import_dask():
    code = "import sys, ringpool; assert 'distributed' not in sys.modules and 'dask' not in sys.modules; " \
           "assert ringpool.ClusterExecutor.__module__ == 'ringpool.cluster'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": dp.BINDINGS})


def test_submit_map_and_waiting(ex):
    assert ex.submit(_square, 7).result(60) == 49
    assert ex.submit(_add, 2, b=5).result(60) == 7
    futs = [ex.submit(_square, i) for i in range(20)]
    assert sorted(f.result() for f in cf.as_completed(futs, timeout=60)) == [i * i for i in range(20)]
    done, not_done = cf.wait(futs, timeout=60)
    assert len(done) == 20 and not not_done
    for chunksize in (1, 7, 64):
        assert list(ex.map(_square, range(300), chunksize=chunksize)) == [i * i for i in range(300)]
    assert list(ex.map(_add, range(50), range(100, 150), chunksize=8)) == [i + 100 + i for i in range(50)]
    assert list(ex.map(_square, [])) == []
    assert sorted(ex.imap_unordered(_square, iter(range(200)), chunksize=9)) == [i * i for i in range(200)]
    assert list(ex.map(_square, range(10), chunksize=3, progress=True)) == [i * i for i in range(10)]
    assert ex.submit(lambda: 41 + 1).result(60) == 42  # by value, as in ringpool.Executor


def test_map_is_lazy_with_a_bounded_window(cluster):
    pulled = []

    def items():
        for i in range(10_000):
            pulled.append(i)
            yield i

    with ClusterExecutor(cluster[1], processes_per_worker=1, max_in_flight=3) as e:
        it = e.map(_square, items(), chunksize=10)
        assert len(pulled) <= 30  # at most three one-chunk tasks submitted at the call
        assert [next(it) for _ in range(5)] == [0, 1, 4, 9, 16]
        # The first answer sized the next tasks (at most _GROWTH times the chunk measured, or
        # _GROWTH times that time-boxed): at most three tasks in flight, far from the end.
        assert len(pulled) <= 10 + 3 * _GROWTH * _GROWTH * 10 < 10_000
        it.close()


def test_remote_exception_carries_its_traceback_and_host(ex):
    with pytest.raises(ValueError, match="item 3 is bad") as info:
        ex.submit(_fail_at, 3, 3).result(60)
    tb = str(info.value.__cause__)
    assert isinstance(info.value.__cause__, ringpool.RemoteTraceback)
    assert "_fail_at" in tb and "raise ValueError" in tb and "on host" in tb
    # In map, the items before the failing one are yielded, then its error raises.
    it = ex.map(_fail_at, range(10), [5] * 10, chunksize=4)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="item 5 is bad"):
        next(it)


def test_unpicklable_function_or_argument_fails_in_submit_naming_the_path(ex):
    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"args\[0\]\['held'\]"):
        ex.submit(_square, {"held": lock})
    with pytest.raises(TypeError, match=r"fn"):
        ex.submit(lambda: lock)
    with pytest.raises(TypeError, match=r"items\[1\]"):
        list(ex.map(_square, [1, lock], chunksize=2))
    assert ex.submit(_square, 3).result(60) == 9


def test_shutdown_cancel_futures(cluster):
    e = ClusterExecutor(cluster[1], processes_per_worker=1)
    futs = [e.submit(_sleep, 0.5) for _ in range(12)]
    t = time.monotonic()
    e.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - t < 30
    assert any(f.cancelled() for f in futs)
    assert all(f.done() for f in futs)
    with pytest.raises(RuntimeError, match="after shutdown"):
        e.submit(_square, 1)


# -- code shipping ----------------------------------------------------------------------------------

def test_packages_reach_every_worker_once_per_version(ex, tmp_path):
    name = "rp_cluster_pkg_a"
    _make_package(tmp_path, name, 1, pad=5 << 20)  # a 5 MB package
    mod = ringpool.import_module_from_path(name, tmp_path / name)
    try:
        out = list(ex.map(mod.where, range(40), chunksize=2))
        assert [o[:2] for o in out] == [(1, i) for i in range(40)]
        assert all(str(tmp_path) not in o[2] for o in out)  # ran elsewhere, in the workers' folders
        p = ex.submit(mod.Point, -4).result(60)  # an object of a registered class, by reference
        assert type(p) is mod.Point and p.norm() == 4
        for _ in range(3):  # resubmitting the same version ships nothing again
            assert ex.submit(mod.where, 0).result(60)[0] == 1
        _make_package(tmp_path, name, 2, pad=5 << 20)
        mod = ringpool.reload(name)
        assert [o[:2] for o in ex.map(mod.where, range(40), chunksize=2)] == [(2, i) for i in range(40)]
        stats = ex.cluster_stats()
        assert len(stats) == 2
        hashes = {f"{name}:{h}" for h in _shipped_hashes(stats, name)}
        assert len(hashes) == 2
        for addr, s in stats.items():
            got = {k: v for k, v in s["received"].items() if k.startswith(name + ":")}
            assert got == {h: 1 for h in hashes}, (addr, got)  # one transfer per worker per version
        assert ex._shipper.transfers[name] == 2
    finally:
        ringpool.modules.purge(name)


def _shipped_hashes(stats, name):
    return {k.split(":", 1)[1] for s in stats.values() for k in s["received"] if k.startswith(name + ":")}


def test_hand_imported_module_is_shipped(ex, tmp_path):
    import importlib.util

    name = "rp_cluster_hand"
    (tmp_path / f"{name}.py").write_text("def triple(x):\n    return 3 * x\n")
    spec = importlib.util.spec_from_file_location(name, tmp_path / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    try:
        assert list(ex.map(mod.triple, range(6), chunksize=2)) == [0, 3, 6, 9, 12, 15]
    finally:
        ringpool.modules.purge(name)
        sys.modules.pop(name, None)


def test_a_worker_joining_later_gets_the_packages(cluster, tmp_path):
    procs, address = cluster
    name = "rp_cluster_pkg_late"
    _make_package(tmp_path, name, 7)
    mod = ringpool.import_module_from_path(name, tmp_path / name)
    e = ClusterExecutor(address, processes_per_worker=1)
    late = None
    try:
        assert e.submit(mod.where, 1).result(60)[0] == 7
        late = procs.worker(address, "late")
        dp.wait_workers(e.client, 3)
        stats = e.cluster_stats()
        for addr, s in stats.items():
            assert [v for k, v in s["received"].items() if k.startswith(name + ":")] == [1], addr
        # Chunks land on all three (dask decides where), all with the package.
        assert [o[:2] for o in e.map(mod.where, range(60), chunksize=1)] == [(7, i) for i in range(60)]
    finally:
        e.shutdown()
        ringpool.modules.purge(name)
        if late is not None:
            dp.kill_group(late)


def test_bundle_is_the_environment_on_every_host(cluster, tmp_path):
    name = "rp_cluster_bundled"
    out = tmp_path / "b.zip"
    with ringpool.BundleWriter(out) as w:
        w.save_source_string(name, "from .calc import compute\n", is_package=True)
        w.save_source_string(f"{name}.calc", "def compute(x):\n    return ('bundled', x * x + 1)\n")
    with ClusterExecutor(cluster[1], processes_per_worker=1, bundle=str(out)) as e:
        assert e.submit(f"{name}.calc:compute", 3).result(60) == ("bundled", 10)
        assert list(e.map(f"{name}:compute", range(4), chunksize=2)) == [("bundled", x * x + 1) for x in range(4)]
        assert all(v["received"] for v in e.cluster_stats().values())
    assert name not in sys.modules


# -- data -------------------------------------------------------------------------------------------

def test_numpy_buffers_travel_out_of_band():
    a = np.arange(1 << 20, dtype=np.float64)
    payload, bufs = _cluster_worker.dumps((np.negative, [a], True))
    assert len(payload) < 1000  # the array is not inside the pickle ...
    assert [b.nbytes for b in bufs] == [a.nbytes] and np.shares_memory(bufs[0], a)  # ... nor copied


def test_large_numpy_arguments_and_results(ex):
    a = np.random.default_rng(0).random(2_000_000)
    r = ex.submit(np.multiply, a, 2.0).result(120)
    assert isinstance(r, np.ndarray) and np.array_equal(r, a * 2.0)
    parts = np.split(np.arange(4_000_000, dtype=np.int64), 4)
    sums = list(ex.map(np.sum, parts, chunksize=2))
    assert sums == [int(p.sum()) for p in parts]


# -- failures ---------------------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_dask_worker_killed_mid_map_reruns_its_chunks(dask_procs, tmp_path):
    _, address = dask_procs.scheduler()
    for i in range(2):
        dask_procs.worker(address, f"k{i}")
    with ClusterExecutor(address, processes_per_worker=1) as e:
        dp.wait_workers(e.client, 2)
        out = list(e.map(_kill_my_dask_worker_once, range(200), [str(tmp_path / "marker")] * 200, [57] * 200,
                         chunksize=5))
        assert out == [3 * i for i in range(200)]  # every result once, in order
        assert (tmp_path / "marker").exists()


@pytest.mark.timeout(180)
def test_no_retry_left_fails_with_worker_died_naming_the_host(dask_procs):
    _, address = dask_procs.scheduler(env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
    dask_procs.worker(address, "only")
    with ClusterExecutor(address, processes_per_worker=1) as e:
        dp.wait_workers(e.client, 1)
        worker = dp.wait_workers(e.client, 1)[0]
        with pytest.raises(ClusterWorkerDied, match="died while running") as info:
            e.submit(_kill_my_dask_worker, 0).result(120)
        assert isinstance(info.value, ringpool.WorkerDied)
        assert worker in str(info.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_losing_the_scheduler_fails_pending_futures_in_bounded_time(dask_procs, how):
    sched, address = dask_procs.scheduler()
    dask_procs.worker(address, "s0")
    e = ClusterExecutor(address, processes_per_worker=1, scheduler_timeout=3)
    try:
        dp.wait_workers(e.client, 1)
        f = e.submit(_sleep, 60)
        it = e.map(_sleep, [60] * 4)
        time.sleep(0.5)
        if how == "frozen":
            os.killpg(sched.pid, signal.SIGSTOP)  # no reset: only the executor's pings notice
        else:
            os.killpg(sched.pid, signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(SchedulerLost, match=address):
            f.result(60)
        with pytest.raises(SchedulerLost):
            next(it)
        assert time.monotonic() - t < 30  # scheduler_timeout plus a ping's timeout, with room for load
        with pytest.raises(SchedulerLost):
            e.submit(_square, 1)
    finally:
        e.shutdown(wait=False)
        os.killpg(sched.pid, signal.SIGKILL)


def test_unreachable_address_fails_in_stated_time():
    address = "tcp://127.0.0.1:9"  # discard: nothing listens
    t = time.monotonic()
    with pytest.raises(TimeoutError, match=r"tcp://127\.0\.0\.1:9 within 2 s"):
        ClusterExecutor(address, connect_timeout=2)
    assert time.monotonic() - t < 60


def test_worker_without_ringpool_gets_a_message_saying_so(dask_procs):
    _, address = dask_procs.scheduler()
    dask_procs.worker(address, "bare", pythonpath=None)  # dask only: no ringpool on its path
    with distributed.Client(address, timeout=30, set_as_default=False) as client:
        dp.wait_workers(client, 1)
        with pytest.raises(RuntimeError, match="ringpool is not importable on 1 dask worker"):
            ClusterExecutor(client)
        # A task that reaches such a worker anyway (it joined after the check) says so too.
        from ringpool import _cluster_futures

        f = client.submit(_cluster_futures.chunk_task, (None, (), "call"), b"", [], pure=False)
        with pytest.raises(RuntimeError, match="ringpool is not importable on the dask worker"):
            f.result(60)


def test_the_scheduler_needs_no_ringpool(dask_procs, tmp_path):
    _, address = dask_procs.scheduler(pythonpath=None)  # dask only
    dask_procs.worker(address, "with-ringpool")
    name = "rp_cluster_pkg_plain_scheduler"
    _make_package(tmp_path, name, 3)
    mod = ringpool.import_module_from_path(name, tmp_path / name)
    try:
        with ClusterExecutor(address, processes_per_worker=1) as e:
            dp.wait_workers(e.client, 1)
            assert e.client.run_on_scheduler(lambda: "ringpool" in sys.modules) is False
            assert [o[:2] for o in e.map(mod.where, range(6), chunksize=2)] == [(3, i) for i in range(6)]
    finally:
        ringpool.modules.purge(name)


@pytest.fixture
def environ_restored():
    # A nanny in this process (LocalCluster) sets its pre-spawn environment (OMP_NUM_THREADS=1,
    # MKL_NUM_THREADS=1, ...) in os.environ for good: later tests must not inherit it.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_local_cluster_with_processes(tmp_path, environ_restored):
    # LocalCluster starts daemonic worker processes through nannies.
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  local_directory=str(tmp_path)) as lc, \
            distributed.Client(lc, set_as_default=False) as client:
        with ClusterExecutor(client, processes_per_worker=2) as e:
            assert list(e.map(_square, range(50), chunksize=5)) == [i * i for i in range(50)]
            (stats,) = e.cluster_stats().values()
            (pids,) = stats["pools"].values()
            assert len(pids) == 2
        assert client.status == "running"  # a client given to us stays open


def test_a_module_only_on_the_client_path_names_the_fix(ex, tmp_path, monkeypatch):
    name = "rp_cluster_client_only"
    (tmp_path / f"{name}.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module(name)
    try:
        with pytest.raises(ModuleNotFoundError, match=rf"register_module\('{name}'\)"):
            ex.submit(mod.double, 2).result(60)
        ringpool.register_module(mod)
        assert ex.submit(mod.double, 2).result(60) == 4
    finally:
        ringpool.modules.purge(name)
        sys.modules.pop(name, None)


def test_two_executors_share_the_node_local_pools(ex, cluster):
    before = {a: s["pools"] for a, s in ex.cluster_stats().items()}
    with ClusterExecutor(cluster[1], processes_per_worker=1) as other:
        it = ex.map(_sleep, [0.05] * 40, chunksize=2)  # running while the other registers
        assert list(other.map(_square, range(30), chunksize=3)) == [i * i for i in range(30)]
        assert list(it) == [0.05] * 40
    after = {a: s["pools"] for a, s in ex.cluster_stats().items()}
    for a, pools in before.items():  # the same pool processes: none was shut down and restarted
        assert {k: v for k, v in after[a].items() if k in pools} == pools


# -- ringpool.Executor's options, passed to the node-local pools ------------------------------------

def test_bad_options_fail_before_connecting():
    nowhere = "tcp://127.0.0.1:9"  # never reached: the options are checked first
    with pytest.raises(TypeError, match="initializer must be a callable"):
        ClusterExecutor(nowhere, initializer=3)
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        ClusterExecutor(nowhere, max_tasks_per_child=0)
    with pytest.raises(ValueError, match="task_timeout"):
        ClusterExecutor(nowhere, task_timeout=0)
    with pytest.raises(TypeError, match=r"args\[0\]"):
        ClusterExecutor(nowhere, initializer=_cluster_tasks._set_tag, initargs=(threading.Lock(),))


@pytest.mark.timeout(300)
def test_executor_options_reach_the_local_pools(dask_procs):
    # Its own cluster: the pools these options make die with it, at the end of this test.
    _, address = dask_procs.scheduler()
    dask_procs.worker(address, "opts", nthreads=2)
    with ClusterExecutor(address, processes_per_worker=2, initializer=_cluster_tasks._set_tag,
                         initargs=("initialized",)) as e:
        dp.wait_workers(e.client, 1)
        assert set(e.map(_cluster_tasks._tag, range(20), chunksize=2)) == {"initialized"}
        assert e.submit(_cluster_tasks._tag, 0).result(60) == "initialized"
    with ClusterExecutor(address, processes_per_worker=1, max_tasks_per_child=1) as e:
        pids = list(e.map(_cluster_tasks._pid, range(12)))
        assert len(set(pids)) == 12  # a fresh local worker for every task
    with ClusterExecutor(address, processes_per_worker=1, task_timeout=1) as e:
        with pytest.raises(ringpool.TaskTimeout, match="longer than 1 s"):
            e.submit(_sleep, 60).result(120)
        assert e.submit(_square, 3).result(60) == 9  # its worker was replaced
    with ClusterExecutor(address, processes_per_worker=1, zygote=False) as e:
        assert e.submit(_cluster_tasks._started_by_zygote, 0).result(120) is False
    with ClusterExecutor(address, processes_per_worker=1) as e:
        assert e.submit(_cluster_tasks._started_by_zygote, 0).result(120) is True
    with ClusterExecutor(address, processes_per_worker=1, initializer=_cluster_tasks._raise_in_init) as e:
        for _ in range(2):  # a broken local pool is not kept: the next task tries a new one
            with pytest.raises(BrokenProcessPool, match="initializer raised OSError: no such device"):
                e.submit(_square, 2).result(120)
        assert len(e.cluster_stats()) == 1


# -- code shipping across executors -----------------------------------------------------------------

def test_a_second_executor_ships_nothing_the_workers_have(cluster, tmp_path):
    name = "rp_cluster_pkg_twice"
    _make_package(tmp_path, name, 1, pad=1 << 20)
    mod = ringpool.import_module_from_path(name, tmp_path / name)

    def arrivals(e):
        return {a: sum(v for k, v in s["received"].items() if k.startswith(name + ":"))
                for a, s in e.cluster_stats().items()}

    try:
        with ClusterExecutor(cluster[1], processes_per_worker=1) as first:
            assert first.submit(mod.where, 1).result(60)[0] == 1
            assert set(arrivals(first).values()) == {1}
            # Another client of the same scheduler in this process.
            with ClusterExecutor(cluster[1], processes_per_worker=1) as second:
                assert second.client is not first.client
                assert [o[0] for o in second.map(mod.where, range(8), chunksize=1)] == [1] * 8
                assert set(arrivals(second).values()) == {1}
        # Another client process with the same package (same content, same hash): it reads what
        # the scheduler holds and ships nothing either.
        code = ("import sys, ringpool\n"
                "from ringpool.cluster import ClusterExecutor\n"
                f"mod = ringpool.import_module_from_path({name!r}, {str(tmp_path / name)!r})\n"
                "if __name__ == '__main__':\n"
                f"    with ClusterExecutor({cluster[1]!r}, processes_per_worker=1) as e:\n"
                "        assert e.submit(mod.where, 2).result(60)[0] == 1\n"
                f"        print(dict(e._shipper.transfers))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": dp.BINDINGS})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "{}"
        with ClusterExecutor(cluster[1], processes_per_worker=1) as again:
            assert set(arrivals(again).values()) == {1}  # one transfer per worker, three executors
    finally:
        ringpool.modules.purge(name)


def test_groups_of_chunks_grow_from_measured_times(cluster):
    with ClusterExecutor(cluster[1], processes_per_worker=1, max_in_flight=4) as e:
        out = list(e.map(_square, range(20_000), chunksize=10))
        assert out == [i * i for i in range(20_000)]
        pacer = e._paces[_square]
        assert pacer.per_item is not None
        assert pacer.largest > 10  # tasks came to carry several chunks
        assert pacer.largest % 10 == 0  # ... whole chunks
        assert sorted(e.imap_unordered(_square, range(5000), chunksize=7)) == [i * i for i in range(5000)]
        assert list(e.starmap(_add, [(i, 1) for i in range(300)], chunksize=4)) == [i + 1 for i in range(300)]
        assert list(e.imap(_square, iter(range(300)))) == [i * i for i in range(300)]


def test_pacer_sizes_tasks_in_whole_chunks_from_measured_times():
    p = _Pacer()
    assert p.items(64, 0.05) == 64  # nothing measured: one chunk
    p.observe(64, 64 * 10e-6)  # 10 µs an item: 0.05 s would be 5000 items ...
    assert p.items(64, 0.05) == min(5000, _GROWTH * 64) // 64 * 64  # ... but first at most 16x what was tried
    p.observe(1024, 1024 * 10e-6)
    assert p.items(64, 0.05) == 5000 // 64 * 64  # the time target, in whole chunks
    assert p.items(64, 0.5) == 16384  # a larger cluster: longer tasks
    p.observe(100, 100 * 1.0)  # a slow stretch: the estimate follows (older tasks weigh half)
    assert p.items(64, 0.05) == 64  # at least one chunk
    p.observe(0, 1.0)  # an empty task teaches nothing
    assert p.items(7, 3600) == _GROWTH * 1024 // 7 * 7  # whole chunks of 7 under the growth cap
    p.observe(20000, 20000 * 1e-6)
    assert p.items(64, 3600) == 32768  # the cap on a task's items (memory in flight)


class _FakeTasksExecutor:
    """Just what a _MapRun uses of a ClusterExecutor, answering every task at once as if item x
    had taken ``cost(x)`` seconds on a worker (a time-boxed task stops after the chunk that
    reaches its budget, as _cluster_worker._run_boxed does at a slice's end); records each
    submission (one scheduler message): how many task results had been read before it, its
    tasks' sizes and which were time-boxed."""

    def __init__(self, cost, window):
        self.cost, self.window, self.pacer = cost, window, _Pacer()
        self.batches, self.read = [], 0
        self._tasks = self

    def _pacer(self, fn):
        return self.pacer

    def _sizing(self):
        return self.window, 0.05

    def _submit(self, op, calls):
        self.batches.append((self.read, [len(c[1]) for c in calls], [len(c) == 4 for c in calls]))
        out = []
        fake = self

        class Answered(cf.Future):
            def result(self, timeout=None):
                fake.read += 1
                return super().result(timeout)

        for fn, items, _, *box in calls:
            seconds, ran = 0.0, len(items)
            if box:
                chunksize, budget = box[0]
                for i in range(0, len(items), chunksize):
                    seconds += sum(self.cost(x) for x in items[i:i + chunksize])
                    if seconds >= budget:
                        ran = i + chunksize
                        break
            else:
                seconds = sum(self.cost(x) for x in items)
            f = Answered()
            f.set_result((*_cluster_worker.dumps(([fn(x) for x in items[:ran]], None)), seconds))
            out.append((None, f))
        return out, None

    def cancel(self, dfs):
        pass


def test_first_map_probes_then_reaches_full_size_in_one_time_boxed_step():
    fake = _FakeTasksExecutor(cost=lambda x: 2e-6, window=10)
    run = _MapRun(fake, _square, iter(range(100_000)), True, 64)
    run.top_up(True)
    assert list(run.results(True, None, None)) == [i * i for i in range(100_000)]
    first, second = fake.batches[:2]
    assert first == (0, [64] * 5, [False] * 5)  # nothing known: half the window of one-chunk probes
    # Right after the first probe's answer, the rest of the window: the times ask for 25,000
    # items a task, the growth cap allows 1024; a chunk is fast (128 µs), so tasks of 16 x 1024
    # go time-boxed (they all run: 33 ms each).
    assert second == (1, [16384] * 6, [True] * 6)
    # A function measured before: a full window of full-size tasks from the start, not boxed.
    fake.batches.clear()
    fake.read = 0
    run = _MapRun(fake, _square, iter(range(100_000)), True, 64)
    run.top_up(True)
    size = fake.pacer.items(64, 0.05)
    assert fake.batches == [(0, [size] * 4 + [100_000 - 4 * size], [False] * 5)]  # the input covered
    assert sum(1 for _ in run.results(True, None, None)) == 100_000


def test_a_time_boxed_task_that_stops_early_sends_the_rest_again_in_order():
    # Cheap first items, then 50x dearer: the boxed tasks sized from the probes stop early.
    fake = _FakeTasksExecutor(cost=lambda x: 2e-6 if x < 320 else 1e-4, window=10)
    run = _MapRun(fake, _square, iter(range(60_000)), True, 64)
    run.top_up(True)
    assert list(run.results(True, None, None)) == [i * i for i in range(60_000)]  # each once, in order
    assert fake.batches[1][2] == [True] * 4  # 4 boxed tasks of 16384 (the input: 60,000)
    # The first boxed task ran 16 chunks (0.1 s at 100 µs an item): its other 15,360 items go
    # again at once, as the next tasks, sized from the new times (8 chunks: ~50 ms).
    read, sizes, boxed = fake.batches[2]
    assert read == 6 and sum(sizes) == 16384 - 16 * 64 and set(sizes) == {512} and not any(boxed)
    # Unordered (imap_unordered), nothing learnt: nothing lost or repeated either.
    fake.pacer.__init__()
    run = _MapRun(fake, _square, iter(range(30_000)), True, 64)
    run.top_up(False)
    assert sorted(run.results(False, None, None)) == [i * i for i in range(30_000)]


def test_a_slow_function_gets_one_chunk_tasks_never_time_boxed():
    fake = _FakeTasksExecutor(cost=lambda x: 1e-3, window=10)  # a chunk of 64: 64 ms, over a task's 50 ms
    run = _MapRun(fake, _square, iter(range(2000)), True, 64)
    run.top_up(True)
    assert list(run.results(True, None, None)) == [i * i for i in range(2000)]
    assert all(set(sizes) <= {64, 2000 % 64} and not any(boxed) for _, sizes, boxed in fake.batches)


def test_the_constructor_starts_the_node_local_pools(cluster):
    # A configuration no other test uses: its pool can only come from this executor's warm-up.
    with ClusterExecutor(cluster[1], processes_per_worker=1, max_tasks_per_child=10**9 - 7) as e:
        dp.wait_workers(e.client, 2)
        key = repr(e._config)
        end = time.monotonic() + 120
        while True:
            pools = {a: s["pools"].get(key) for a, s in e.cluster_stats().items()}
            if all(pools.values()):
                break
            assert time.monotonic() < end, f"no pool started without a task: {pools}"
            time.sleep(0.2)
        assert all(len(pids) == 1 for pids in pools.values())
        assert e.submit(_square, 4).result(60) == 16  # ... and tasks use it
        after = {a: s["pools"][key] for a, s in e.cluster_stats().items()}
        assert after == pools


# -- several versions of one package from several clients -----------------------------------------

def test_a_worker_keeps_the_versions_used_last_and_names_a_dropped_one(monkeypatch):
    # The worker side alone, in this process (no dask): what it keeps of 6 versions of a package.
    for attr, value in (("_store", {}), ("_by_name", collections.defaultdict(list)), ("_dropped", {}),
                        ("_received", collections.Counter())):
        monkeypatch.setattr(_cluster_worker, attr, value)
    snaps = [ringpool.modules.Snapshot("rp_lru_pkg", "/nowhere", {"__init__.py": f"V = {v}\n".encode()})
             for v in range(6)]
    for s in snaps[:4]:
        _cluster_worker.receive_snapshot(s.to_bytes())
    with _cluster_worker._cond:
        _cluster_worker._use("rp_lru_pkg", snaps[0].hash)  # version 0 is used again: now the most recent
    for s in snaps[4:]:
        _cluster_worker.receive_snapshot(s.to_bytes())
    kept = {snaps.index(s) for s in snaps if s.hash in _cluster_worker._store}
    assert kept == {0, 3, 4, 5} and _cluster_worker._KEEP_VERSIONS == 4  # 1 and 2: least recently used
    t = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"dropped package rp_lru_pkg {snaps[1].hash[:12]}: it keeps the 4"):
        with _cluster_worker._Versions((("rp_lru_pkg", snaps[1].hash),)):
            pass
    assert time.monotonic() - t < _cluster_worker._SNAPSHOT_WAIT  # at once, not after the wait


_VERSION_CLIENT = """
import json, sys, ringpool
from ringpool.cluster import ClusterExecutor
mod = ringpool.import_module_from_path({name!r}, {path!r})
if __name__ == "__main__":
    with ClusterExecutor({address!r}, processes_per_worker=1) as e:
        for line in sys.stdin:
            if line.strip() != "map":
                break
            out = list(e.map(mod.where, range(40), chunksize=1))
            print(json.dumps({{"versions": sorted({{o[0] for o in out}}), "in_order": [o[1] for o in out] == list(range(40)),
                              "shipped": dict(e._shipper.transfers)}}), flush=True)
"""


@pytest.mark.timeout(400)
def test_two_client_processes_alternate_two_versions_of_one_package(dask_procs, tmp_path):
    import select  # here: only this test talks to client processes over pipes

    name = "rp_cluster_two_versions"
    _, address = dask_procs.scheduler()
    workers = [dask_procs.worker(address, f"v{i}") for i in range(2)]
    clients = []
    for version in (1, 2):
        _make_package(tmp_path / f"client{version}", name, version, pad=1 << 20)
        code = _VERSION_CLIENT.format(name=name, path=str(tmp_path / f"client{version}" / name), address=address)
        clients.append(subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": dp.BINDINGS}))

    def send(c):
        c.stdin.write("map\n")
        c.stdin.flush()

    def answer(c):
        ready, _, _ = select.select([c.stdout], [], [], 120)
        assert ready, f"no answer from a client process: {c.poll()}"
        line = c.stdout.readline()
        assert line, f"client process exited: {c.wait(10)} {c.stderr.read()[-3000:]}"
        return json.loads(line)

    def check(c, version, out):
        assert out == {"versions": [version], "in_order": True, "shipped": {name: 1}}  # its own version, once

    def arrivals(client):
        return {a: sorted((k.split(":")[1][:12], v) for k, v in s["received"].items() if k.startswith(name + ":"))
                for a, s in client.run(stats).items()}

    with distributed.Client(address, set_as_default=False) as watcher:
        try:
            dp.wait_workers(watcher, 2)
            for _ in range(3):  # alternating
                for version, c in zip((1, 2), clients):
                    send(c)
                    check(c, version, answer(c))
            for c in clients:  # at the same time: the workers switch versions between tasks, never within one
                send(c)
            for version, c in zip((1, 2), clients):
                check(c, version, answer(c))
            got = arrivals(watcher)
            assert len(got) == 2 and all(len(v) == 2 and all(n == 1 for _, n in v) for v in got.values()), got
            # A worker that joins later gets both versions (neither client unregistered the other's),
            # and the two first workers go: every task now runs on it.
            dask_procs.worker(address, "v-late")
            dp.wait_workers(watcher, 3)
            for w in workers:
                dp.kill_group(w)
            end = time.monotonic() + 60
            while len(watcher.scheduler_info()["workers"]) > 1:
                assert time.monotonic() < end, "the killed workers did not leave"
                time.sleep(0.2)
            for version, c in zip((1, 2), clients):
                send(c)
                check(c, version, answer(c))
            late = arrivals(watcher)
            assert len(late) == 1 and [n for _, n in next(iter(late.values()))] == [1, 1], late
        finally:
            for c in clients:
                try:
                    c.stdin.close()
                    c.wait(60)
                except Exception:
                    c.kill()
                    c.wait()


def test_a_pool_whose_start_spans_a_shutdown_is_not_kept(monkeypatch):
    # The worker side alone, in this process: a pool still starting (warm) when the dask worker
    # closes (shutdown_pools) is shut down when ready, and later starts are not affected.
    started, real = [], _cluster_worker.Executor

    def slow_executor(*a, **kw):
        time.sleep(0.5)
        started.append(real(*a, **kw))
        return started[-1]

    monkeypatch.setattr(_cluster_worker, "Executor", slow_executor)
    monkeypatch.setattr(_cluster_worker, "_pools", {})
    config = _cluster_worker.pool_config(1, (), None, True, None, (), None, None)
    errors = []

    def start():
        try:
            _cluster_worker._pool(config)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=start)
    t.start()
    time.sleep(0.1)
    _cluster_worker.shutdown_pools()
    t.join(60)
    assert len(errors) == 1 and "is closing" in str(errors[0])
    assert _cluster_worker._pools == {} and started[0]._state.shutdown  # started, then shut down
    pool = _cluster_worker._pool(config)  # a start after the shutdown is kept
    try:
        assert _cluster_worker._pools == {config: pool}
        assert pool.submit(_square, 5).result(60) == 25
    finally:
        _cluster_worker.shutdown_pools()
