"""ringpool.Executor: the concurrent.futures contract, crash isolation, timeouts, recycling."""
import concurrent.futures as cf
import io
import itertools
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

import ringpool
from conftest import BINDINGS, alive, our_children
from ringpool import Executor, TaskTimeout, WorkerDied


def _square(x):
    return x * x


def _add(a, b=0, *, c=0):
    return a + b + c


def _pid(_=None):
    return os.getpid()


def _sleep_pid(t):
    time.sleep(t)
    return os.getpid()


def _raise(msg):
    raise KeyError(msg)


def _die_on(x, victim, how="kill"):
    if x == victim:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    time.sleep(0.002)
    return x


def _unpicklable_result(_):
    return threading.Lock()


def _result_only_the_worker_can_load(_):
    mod = types.ModuleType("_ringpool_only_in_worker")
    exec("class Thing:\n    pass\n", mod.__dict__)
    sys.modules[mod.__name__] = mod
    return mod.Thing()


_state = {}


def _init(v):
    _state["v"] = v


def _get_state(_):
    return _state.get("v")


def _bad_init():
    raise RuntimeError("initializer broke")


def _put_to(q, x):
    q.put(("from worker", x))
    return True


def _echo(x):
    return x


@pytest.fixture(scope="module")
def pool():
    with Executor(2) as ex:
        yield ex


def test_submit_map_and_imap_unordered(pool):
    assert pool.submit(_square, 7).result(30) == 49
    assert pool.submit(_add, 1, 2, c=3).result(30) == 6
    assert list(pool.map(_square, range(50))) == [i * i for i in range(50)]
    assert list(pool.map(_add, range(10), range(10))) == [2 * i for i in range(10)]
    assert list(pool.map(_square, range(100), chunksize=7)) == [i * i for i in range(100)]
    assert sorted(pool.imap_unordered(_square, iter(range(3000)))) == [i * i for i in range(3000)]
    assert sorted(pool.imap_unordered(_square, range(100), chunksize=9)) == [i * i for i in range(100)]
    assert list(pool.map(_square, [])) == []
    # A function named by string, resolved in the worker.
    assert pool.submit("os.path:join", "a", "b").result(30) == os.path.join("a", "b")
    assert isinstance(pool, cf.Executor)


def test_remote_exception_carries_its_traceback(pool):
    f = pool.submit(_raise, "nope")
    with pytest.raises(KeyError, match="nope") as info:
        f.result(30)
    cause = info.value.__cause__
    assert isinstance(cause, ringpool.RemoteTraceback)
    assert "_raise" in str(cause) and "test_executor.py" in str(cause)
    assert isinstance(f.exception(1), KeyError)
    with pytest.raises(KeyError):
        list(pool.map(_raise, ["a"]))
    assert pool.submit(_square, 3).result(30) == 9  # the worker goes on


def test_futures_api_wait_as_completed_and_callbacks(pool):
    seen = []
    fs = [pool.submit(_square, i) for i in range(20)]
    fs[0].add_done_callback(lambda f: seen.append(f.result()))
    done, not_done = cf.wait(fs, timeout=30)
    assert len(done) == 20 and not not_done
    assert sorted(f.result() for f in cf.as_completed(fs, timeout=30)) == [i * i for i in range(20)]
    assert seen == [0]


def test_many_threads_submit_at_once(pool):
    out = {}

    def run(k):
        out[k] = [pool.submit(_add, k, i).result(60) for i in range(200)]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(out[k] == [k + i for i in range(200)] for k in range(6))


def test_unpicklable_argument_raises_in_submit_and_nothing_is_queued(pool):
    # Lambdas travel by value (the hybrid pickler); a lock cannot travel at all, and the error
    # names where it sits.
    assert pool.submit(_echo, lambda: 5).result(30)() == 5
    with pytest.raises(TypeError, match=r"cannot pickle args\[0\]\['held'\] \(a _thread.lock\)"):
        pool.submit(_echo, {"held": threading.Lock()})
    # In map, only that item fails, at its position, as under the stdlib.
    it = pool.map(_echo, [1, 2, threading.Lock(), 4])
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(TypeError):
        next(it)
    assert pool.submit(_square, 5).result(30) == 25


def test_unpicklable_result_fails_only_its_task(pool):
    with pytest.raises(pickle.PicklingError, match="result could not be pickled"):
        pool.submit(_unpicklable_result, 0).result(30)
    assert pool.submit(_square, 6).result(30) == 36


def test_result_that_does_not_unpickle_here_fails_only_its_task(pool):
    fs = [pool.submit(_square, i) for i in range(5)]
    bad = pool.submit(_result_only_the_worker_can_load, 0)
    fs += [pool.submit(_square, i) for i in range(5, 10)]
    with pytest.raises(pickle.UnpicklingError, match="could not be unpickled here"):
        bad.result(30)
    assert [f.result(30) for f in fs] == [i * i for i in range(10)]


def test_function_the_worker_cannot_import(pool):
    mod = types.ModuleType("_ringpool_only_in_parent")
    exec("def f(x):\n    return x\n", mod.__dict__)
    sys.modules[mod.__name__] = mod
    try:
        with pytest.raises(ModuleNotFoundError):
            pool.submit(mod.f, 1).result(30)
        # Sent again (by number on a worker that failed to load it, or in full on the other).
        with pytest.raises((ModuleNotFoundError, LookupError)):
            pool.submit(mod.f, 2).result(30)
        assert pool.submit(_square, 4).result(30) == 16
    finally:
        del sys.modules[mod.__name__]


def test_large_arguments_and_results_and_handles(pool):
    blob = os.urandom(5 << 20)
    assert pool.submit(_echo, blob).result(60) == blob
    np = pytest.importorskip("numpy")
    a = np.arange(1 << 20, dtype=np.float64)
    assert (pool.submit(_echo, a).result(60) == a).all()
    q = ringpool.Queue()
    assert pool.submit(_put_to, q, 5).result(30) is True
    assert q.get(timeout=30) == ("from worker", 5)


def test_a_handle_argument_submitted_behind_a_backlog():
    """A submit that waits in the backlog is pickled at once (errors raise in submit); an argument
    carrying a descriptor (a ringpool.Queue) made that pickling fail with pybind11's "Unable to
    convert call argument" instead of passing the handle."""
    with Executor(1) as ex:
        q = ringpool.Queue()
        busy = [ex.submit(_sleep_pid, 0.2) for _ in range(6)]  # one worker, a depth of 2: a backlog
        f = ex.submit(_put_to, q, 7)
        assert f.result(60) is True
        assert q.get(timeout=30) == ("from worker", 7)
        assert all(b.result(60) for b in busy)


@pytest.mark.parametrize("how,desc", [("kill", "killed by signal SIGKILL"), ("exit", "exit code 3")])
def test_a_dead_worker_fails_only_its_task_and_is_replaced(how, desc):
    with Executor(2) as ex:
        before = set(ex.map(_sleep_pid, [0.05] * 4))
        fs = [ex.submit(_die_on, i, 13, how) for i in range(60)]
        failed = []
        for i, f in enumerate(fs):
            try:
                assert f.result(60) == i
            except WorkerDied as e:
                failed.append((i, e))
        assert [i for i, _ in failed] == [13]
        err = failed[0][1]
        assert isinstance(err, cf.process.BrokenProcessPool)
        assert desc in str(err) and err.pid in before
        assert err.exitcode == (-signal.SIGKILL if how == "kill" else 3)
        after = set(ex.map(_sleep_pid, [0.05] * 8))
        assert err.pid not in after and len(after) == 2


def test_a_dead_worker_and_its_replacement_are_logged(caplog):
    # ringpool.executor: each worker's start (DEBUG), the death (WARNING, naming pid and signal).
    with caplog.at_level("DEBUG", logger="ringpool"):
        with Executor(2) as ex:
            before = set(ex.map(_sleep_pid, [0.05] * 4))
            with pytest.raises(WorkerDied) as info:
                ex.submit(_die_on, 1, 1).result(60)
            after = set(ex.map(_sleep_pid, [0.05] * 8))
    victim = info.value.pid
    records = [r for r in caplog.records if r.name == "ringpool.executor"]
    died = [r for r in records if r.levelname == "WARNING"]
    assert len(died) == 1, [r.getMessage() for r in records]
    assert died[0].getMessage().startswith("worker ") and f"(pid {victim}) died (killed by signal SIGKILL) " \
        "while running a task; replacing it" in died[0].getMessage()
    # The same attributes as the C++ runtime's records (docs/design/logging.md).
    assert (died[0].event, died[0].ringpool_pid, died[0].exit_code) == ("worker_died", victim, -signal.SIGKILL)
    assert [r.event for r in records if r.levelname == "DEBUG"].count("worker_replaced") == 1
    started = {int(r.getMessage().rpartition("pid ")[2].rstrip(")")) for r in records
               if r.levelname == "DEBUG" and " started (pid " in r.getMessage()}
    assert started >= before | after | {victim} and len(started) == 3  # two at construction, one replacement


def test_logging_is_silent_unless_configured():
    # A library's logger: a NullHandler on "ringpool", so an unconfigured application prints
    # nothing (not even through logging's last-resort handler) when a worker dies.
    code = ("import ringpool, os, signal\n"
            "def die(): os.kill(os.getpid(), signal.SIGKILL)\n"
            "if __name__ == '__main__':\n"
            "    with ringpool.Executor(1) as ex:\n"
            "        try: ex.submit(die).result(60)\n"
            "        except ringpool.WorkerDied: print('died')\n"
            "        print(ex.submit(abs, -3).result(60))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                       env={**os.environ, "PYTHONPATH": BINDINGS})
    assert (r.returncode, r.stdout.split(), r.stderr) == (0, ["died", "3"], "")


class _OnlyInParent:
    """Pickled by reference to a module the workers cannot import (set up by the test)."""


def _item(job):
    """One call of a map: does job's action, then logs its index (O_APPEND: one line per call)."""
    i, action, log = job
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        time.sleep(60)
    time.sleep(0.0005)
    with open(log, "a") as f:
        f.write(f"{i}\n")
    return _result_only_the_worker_can_load(i) if action == "alien" else i


@pytest.fixture
def one_run(monkeypatch):
    """Workers take up to 1000 calls at a time, so a map of a few hundred goes to one worker as
    one run record and its bad item sits in the middle of it."""
    from ringpool import _executor_tasks

    monkeypatch.setattr(_executor_tasks, "_DEPTH_BOUNDS", (1000, 1000))


def _map_with_one_bad_item(ex, tmp_path, n, bad, action):
    """map(_item) over n jobs, item `bad` doing `action`: the results before it, its error, and
    how many times each item ran. The map is left only once every other item has run (leaving
    it cancels the calls not yet sent, as the stdlib's map does)."""
    log = str(tmp_path / "ran")
    jobs = [(i, action if i == bad else "ok", log) for i in range(n)]
    it = ex.map(_item, jobs)
    got = [next(it) for _ in range(bad)]
    # Every item logs once it has run, the bad one too when it returns (an "alien" result).
    lines = n if isinstance(action, str) and action == "alien" else n - 1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(log) as f:
            ran = [int(line) for line in f]
        if len(ran) >= lines:
            break
        time.sleep(0.05)
    with pytest.raises(Exception) as info:
        next(it)
    counts = {i: ran.count(i) for i in set(ran)}
    return got, info.value, counts


@pytest.mark.parametrize("action", ["kill", "alien"])
def test_a_maps_bad_item_fails_alone_and_every_other_item_runs_once(action, tmp_path, one_run):
    # A map's calls travel to a worker many to a record: one of them dying with its worker, or
    # returning a result the parent cannot load, still fails only that item.
    with Executor(2) as ex:
        got, err, counts = _map_with_one_bad_item(ex, tmp_path, 400, 237, action)
        assert got == list(range(237))
        if action == "kill":
            assert isinstance(err, WorkerDied) and "SIGKILL" in str(err)
            assert 237 not in counts
        else:
            assert isinstance(err, pickle.UnpicklingError)
            assert counts.pop(237) == 1
        assert counts == {i: 1 for i in range(400) if i != 237}
        assert list(ex.map(_square, range(300))) == [i * i for i in range(300)]
        assert len(ex.worker_pids()) == 2


def test_a_map_item_whose_argument_does_not_unpickle_in_the_worker_fails_alone(tmp_path, one_run):
    mod = types.ModuleType("_ringpool_only_in_parent_args")
    mod.Thing = type("Thing", (), {"__module__": mod.__name__})
    sys.modules[mod.__name__] = mod
    try:
        with Executor(2) as ex:
            got, err, counts = _map_with_one_bad_item(ex, tmp_path, 300, 150, mod.Thing())
            assert got == list(range(150)) and isinstance(err, ModuleNotFoundError)
            assert counts == {i: 1 for i in range(300) if i != 150}
            assert list(ex.map(_square, range(300))) == [i * i for i in range(300)]
    finally:
        del sys.modules[mod.__name__]


def test_a_map_item_that_times_out_fails_alone(tmp_path, one_run):
    with Executor(2, task_timeout=1.0) as ex:
        got, err, counts = _map_with_one_bad_item(ex, tmp_path, 200, 77, "hang")
        assert got == list(range(77)) and isinstance(err, TaskTimeout)
        assert counts == {i: 1 for i in range(200) if i != 77}


def test_task_timeout_kills_and_replaces_its_worker():
    with Executor(2, task_timeout=1.0) as ex:
        slow = ex.submit(_sleep_pid, 30)
        quick = [ex.submit(_square, i) for i in range(20)]
        t0 = time.monotonic()
        with pytest.raises(TaskTimeout) as info:
            slow.result(30)
        assert time.monotonic() - t0 < 10
        assert isinstance(info.value, TimeoutError)
        assert [f.result(30) for f in quick] == [i * i for i in range(20)]
        assert not alive(info.value.pid)
        assert ex.submit(_sleep_pid, 0.2).result(30) != info.value.pid


def test_max_tasks_per_child_recycles_workers():
    with Executor(2, max_tasks_per_child=5) as ex:
        pids = [ex.submit(_pid).result(30) for _ in range(25)]
        assert list(ex.map(_square, range(100))) == [i * i for i in range(100)]
    counts = {p: pids.count(p) for p in set(pids)}
    assert max(counts.values()) <= 5 and len(counts) >= 5


def test_initializer_runs_in_every_worker():
    with Executor(2, initializer=_init, initargs=("hello",)) as ex:
        assert set(ex.map(_get_state, range(20))) == {"hello"}


def test_failing_initializer_breaks_the_pool():
    ex = Executor(2, initializer=_bad_init)
    try:
        f = ex.submit(_square, 2)
        with pytest.raises(cf.process.BrokenProcessPool) as info:
            f.result(60)
        assert "initializer broke" in str(info.value)
        with pytest.raises(cf.process.BrokenProcessPool):
            ex.submit(_square, 3)
    finally:
        ex.shutdown()


def test_shutdown_waits_cancels_and_refuses_new_work():
    ex = Executor(1)
    first = ex.submit(_sleep_pid, 0.5)
    queued = [ex.submit(_sleep_pid, 0.5) for _ in range(5)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert first.done() and not first.cancelled()
    assert any(f.cancelled() for f in queued)
    assert all(f.done() for f in queued)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(_square, 1)

    ex = Executor(2)
    fs = [ex.submit(_square, i) for i in range(50)]
    ex.shutdown(wait=True)
    assert [f.result(0) for f in fs] == [i * i for i in range(50)]


def test_map_timeout_and_early_break():
    with Executor(2) as ex:
        it = ex.map(_sleep_pid, [3, 3, 3], timeout=0.5)
        with pytest.raises(cf.TimeoutError):
            list(it)
        # Leaving an unordered stream early leaves the pool usable.
        for x in ex.imap_unordered(_square, range(100000)):
            break
        assert ex.submit(_square, 2).result(30) == 4


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    with Executor(2) as ex:
        assert list(ex.map(_square, range(200), progress=True)) == [i * i for i in range(200)]
    assert "200/200" in capsys.readouterr().err


def test_exec_mode_and_no_leftovers(no_shm_leak):
    before = our_children()
    with Executor(2, zygote=False) as ex:
        pids = set(ex.map(_sleep_pid, [0.1] * 6))
        assert ex.submit(_square, 9).result(60) == 81
    assert pids and not (pids & our_children())
    assert not any(alive(p) for p in pids)
    # No exec-mode worker is left. (Other children may come and go meanwhile: the stdlib's
    # resource tracker, started by the first worker start of this process, and the spares that
    # earlier tests' zygotes fork in the background.)
    live = set(ringpool.get_context(zygote=False)._supervisor().live_workers())
    left = [p for p in our_children() - before - live if "ringpool._worker" in _cmdline(p)]
    assert not left, left


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_pool_survives_its_zygote_dying():
    ctx = ringpool.RingpoolContext(spares=0)
    try:
        with Executor(2, mp_context=ctx) as ex:
            assert ex.submit(_square, 2).result(60) == 4
            fs = [ex.submit(_sleep_pid, 0.3) for _ in range(6)]
            time.sleep(0.1)
            os.kill(ctx.zygote_pid(), signal.SIGKILL)
            outcomes = []
            for f in fs:
                try:
                    outcomes.append(f.result(60))
                except WorkerDied:
                    outcomes.append("died")
            # The two running tasks die with the zygote's workers; the queued ones run elsewhere.
            assert outcomes.count("died") <= 2 and len(outcomes) == 6
            assert list(ex.map(_square, range(10))) == [i * i for i in range(10)]
    finally:
        ctx.shutdown()


class _FlakyStarts:
    """A context whose next `fail` Process starts raise, as a start does when the zygote is
    killed at that moment."""

    def __init__(self, fail=0):
        self._ctx = ringpool.get_context()
        self.fail = fail

    def Process(self, *args, **kwargs):
        p = self._ctx.Process(*args, **kwargs)
        if self.fail > 0:
            self.fail -= 1

            def start():
                raise RuntimeError("ringpool zygote (pid 1) exited with code -9")

            p.start = start
        return p


@pytest.mark.parametrize("failures", [3, 10_000])
def test_a_replacement_that_fails_to_start_is_retried_or_breaks_the_pool(failures):
    ctx = _FlakyStarts()
    with Executor(2, mp_context=ctx) as ex:
        assert sorted(ex.map(_pid, range(4))) and len(ex.worker_pids()) == 2
        ctx.fail = failures
        victim = ex.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        fs = [ex.submit(_square, i) for i in range(50)]
        if failures < 100:
            # Retried until a start succeeds: every task completes, the pool is whole again.
            assert [f.result(60) for f in fs] == [i * i for i in range(50)]
            deadline = time.monotonic() + 30
            while len(ex.worker_pids()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(ex.worker_pids()) == 2 and victim not in ex.worker_pids()
        else:
            # The surviving worker runs the tasks; the missing one never starts, and after its
            # attempts the pool breaks: nothing waits forever.
            done, pending = cf.wait(fs, timeout=60)
            assert not pending
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    ex.submit(_square, 2)
                except cf.process.BrokenProcessPool as e:
                    assert "no worker could be started" in str(e)
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the pool neither replaced its worker nor broke")


def test_short_of_workers_is_a_verdict_not_a_live_object():
    # Issue 13's lost wake-up: "short of workers" used to return its last operand, the pool's task
    # dict while tasks were pending; the watcher tested it after releasing the pool lock, a task
    # finishing meanwhile emptied the dict, and a pool one worker short then waited with no
    # timeout for a wake-up that never came. The verdict is a bool now, fixed when it is taken.
    from ringpool._executor_tasks import _State

    class Sched:
        outstanding = 3

        def shortfall(self):
            return 1

    s = _State.__new__(_State)
    s.broken, s.closed, s.shutdown, s.sched = None, False, False, Sched()
    verdict = s.short_of_workers()
    Sched.outstanding = 0  # the last task finished after the lock was released
    assert verdict is True
    s.shutdown = True
    assert s.short_of_workers() is False  # shut down with nothing left: no replacement
    Sched.outstanding = 1
    assert s.short_of_workers() is True


def test_worker_pids_names_the_live_workers():
    with Executor(2) as ex:
        pids = set(ex.worker_pids())
        assert len(pids) == 2 and pids <= our_children()
        seen = {ex.submit(_sleep_pid, 0.05).result(60) for _ in range(20)}
        assert seen <= pids
        victim = next(iter(pids))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while victim in ex.worker_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert victim not in ex.worker_pids()
        assert ex.submit(_square, 3).result(60) == 9
        assert len(ex.worker_pids()) == 2


_UNGUARDED = """
import ringpool

def square(x):
    return x * x

ex = ringpool.Executor(2{extra})
print(list(ex.map(square, range(3))))
ex.shutdown()
"""


@pytest.mark.parametrize("extra", ["", ", zygote=False"])
def test_a_pool_made_at_module_level_without_the_main_guard_breaks_once(tmp_path, extra):
    # Each worker imports the main module (as under spawn), which makes a pool again: the stdlib's
    # bootstrapping check kills the worker. The pool must break with a message naming the fix,
    # not replace its workers forever.
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED.format(extra=extra))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, PYTHONPATH=BINDINGS), cwd=tmp_path)
    assert r.returncode != 0
    # The workers share the script's stderr and may still be writing their tracebacks when the
    # parent writes its own: the parent's last line can follow a worker's unfinished one.
    name = "concurrent.futures.process.BrokenProcessPool:"
    broken = [line.split(name, 1)[1] for line in r.stderr.splitlines() if name in line]
    assert broken and "if __name__ ==" in broken[-1], r.stderr[-3000:]
    assert r.stderr.count("Traceback") <= 10, r.stderr[-3000:]


def _fail_at_5(x):
    if x == 5:
        raise ValueError("five")
    return x


def _consumed(it, seen):
    for x in it:
        seen.append(x)
        yield x


@pytest.mark.parametrize("chunksize", [1, 7])
def test_imap_keeps_input_order_and_reads_its_input_lazily(pool, chunksize):
    assert list(pool.imap(_square, range(3000), chunksize=chunksize)) == [i * i for i in range(3000)]
    # An endless input: only a bounded window of it is read ahead of the results taken.
    seen = []
    it = pool.imap(_square, _consumed(itertools.count(), seen), chunksize=chunksize)
    assert [next(it) for _ in range(20)] == [i * i for i in range(20)]
    it.close()  # cancels what was queued
    assert 20 <= len(seen) < 1_000_000
    assert pool.submit(_square, 3).result(30) == 9  # the pool goes on


def test_imap_raises_at_the_failing_position(pool):
    it = pool.imap(_fail_at_5, range(10))
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="five"):
        next(it)


@pytest.mark.parametrize("chunksize", [1, 4])
def test_starmap_unpacks_each_tuple(pool, chunksize):
    pairs = [(i, i + 1) for i in range(50)]
    assert list(pool.starmap(_add, pairs, chunksize=chunksize)) == [a + b for a, b in pairs]
    assert list(pool.starmap(_add, iter([[1], [2, 3]]))) == [1, 5]
    assert list(pool.starmap(_add, [])) == []


def test_progress_takes_tqdm_options(pool):
    pytest.importorskip("tqdm")
    out = io.StringIO()
    assert list(pool.map(_square, range(20), progress={"desc": "squares", "file": out})) == [i * i for i in range(20)]
    assert "squares" in out.getvalue() and "20/20" in out.getvalue()
    out = io.StringIO()
    assert sorted(pool.imap(_square, range(5), progress={"desc": "lazy", "file": out}, total=5)) == [0, 1, 4, 9, 16]
    assert "lazy" in out.getvalue()
    with pytest.raises(TypeError, match="tqdm options"):
        pool.map(_square, range(3), progress="yes")  # at the call, before anything is queued
