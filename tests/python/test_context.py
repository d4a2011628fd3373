"""Conformance: the same checks against spawn, forkserver and ringpool.get_context()
(shared/CONTRACT.md section 5; ringpool in both start modes)."""
import concurrent.futures
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.context import BaseContext

import pytest

import ringpool
from conftest import alive, our_children

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def default_context():
    """ringpool's default context, as a user gets it (``get_context()``: the automatic preload),
    whose zygote starts from this process's modules now, torch included when it is installed
    (another test module may have started it before torch was imported here)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    ctx = ringpool.get_context()
    ctx.shutdown()  # the next start() makes a zygote that preloads what is imported now
    return ctx


@pytest.fixture(params=["spawn", "forkserver", "ringpool", "ringpool-exec"])
def ctx(request):
    if request.param == "ringpool":
        return request.getfixturevalue("default_context")
    if request.param == "ringpool-exec":
        return ringpool.get_context(zygote=False)
    return mp.get_context(request.param)


# -- targets (module level: spawn-style children import them) --------------------------------

def _return():
    return None


def _exit3():
    sys.exit(3)


def _raise():
    raise ValueError("raised in the child")


def _sleep(t):
    time.sleep(t)


def _report(q):
    p = mp.current_process()
    q.put((os.getpid(), p.name, p.daemon, bytes(p.authkey)))


def _primitives(lock, rlock, sem, bsem, cond, ev, val, arr, q):
    with lock, rlock, rlock:
        pass
    sem.release()
    bsem.acquire()
    bsem.release()
    with cond:
        cond.notify_all()
    with val.get_lock():
        val.value += 1
    arr[0] = 42.0
    ev.set()
    q.put("ok")


def _handles(std_q, conn, sock, out):
    std_q.put("via stdlib queue")
    conn.send("via connection")
    sock.sendall(b"via socket")
    out.put("done")


def _square(x):
    return x * x


_init_value = None


def _init(v):
    global _init_value
    _init_value = v


def _get_init(_):
    return _init_value


# -- the context itself ---------------------------------------------------------------------

def test_context_identity_and_start_method(ctx):
    assert isinstance(ctx, BaseContext)
    assert ctx.get_context() is ctx
    method = ctx.get_start_method()
    assert isinstance(method, str) and method != "fork"
    assert ctx.Process._start_method in (None, "spawn", "forkserver")


def test_register_start_method_returns_the_named_context():
    # An installed ringpool needs no call (its .pth: tests/python/test_start_method.py); a checkout
    # on PYTHONPATH, like this process, gets the name from the call, and the call stays harmless
    # where the name already resolves.
    ctx = ringpool.register_start_method()
    assert ctx is ringpool.get_context() is mp.get_context("ringpool")
    assert ringpool.register_start_method() is ctx
    assert "ringpool" in mp.get_all_start_methods()


def test_a_plain_process_under_the_ringpool_start_method(tmp_path):
    # multiprocessing.Process (not ctx.Process) after set_start_method("ringpool"): the stdlib's
    # Process class, which has no ringpool context of its own, gets the registered one.
    script = tmp_path / "plain.py"
    script.write_text(
        "import multiprocessing as mp, ringpool\n"
        "def f(q):\n    q.put(mp.current_process().name)\n"
        "if __name__ == '__main__':\n"
        "    ringpool.register_start_method(); mp.set_start_method('ringpool')\n"
        "    q = mp.Queue(); p = mp.Process(target=f, args=(q,), name='plain'); p.start()\n"
        "    print(q.get(timeout=60)); p.join(60); print(p.exitcode)\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(ringpool.__file__))}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["plain", "0"]


# -- Process lifecycle ----------------------------------------------------------------------

@pytest.mark.parametrize("target, args, code", [
    (_return, (), 0), (_exit3, (), 3), (_raise, (), 1),
])
def test_exit_codes(ctx, target, args, code, capfd):
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join(60)
    assert p.exitcode == code
    if target is _raise and ctx.get_start_method() != "forkserver":
        # (forkserver children write to the server's stderr, captured when the server started)
        assert "ValueError: raised in the child" in capfd.readouterr().err


def _check_length(data, n):
    sys.exit(0 if len(data) == n else 4)


def test_large_process_object(ctx):
    # Larger than the bootstrap ring's inline limit: ringpool sends it out of band.
    data = os.urandom(300_000)
    p = ctx.Process(target=_check_length, args=(data, len(data)))
    p.start()
    p.join(60)
    assert p.exitcode == 0


def test_kill_terminate_join_and_sentinel(ctx):
    p = ctx.Process(target=_sleep, args=(60,))
    p.start()
    assert isinstance(p.pid, int)
    p.join(0.1)
    assert p.exitcode is None and p.is_alive()
    assert mp.connection.wait([p.sentinel], 0.1) == []
    with pytest.raises(ValueError):
        p.close()  # still running
    p.kill()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    # Ready, and stays ready. (The stdlib forkserver's sentinel is a status pipe that join() has
    # read from: it turns readable again only at EOF, when the server closes its end.)
    assert mp.connection.wait([p.sentinel], 10) == [p.sentinel]
    assert mp.connection.wait([p.sentinel], 10) == [p.sentinel]
    t0 = time.monotonic()
    p.join()  # returns at once
    assert time.monotonic() - t0 < 1.0
    p.terminate()  # on an exited child: no error
    p.kill()
    p.close()
    q = ctx.Process(target=_sleep, args=(60,))
    q.start()
    q.terminate()
    q.join(30)
    assert q.exitcode == -signal.SIGTERM


def test_pid_name_daemon_authkey_match(ctx):
    q = ctx.Queue()
    p = ctx.Process(target=_report, args=(q,), name="conformance-worker", daemon=True)
    p.start()
    pid, name, daemon, authkey = q.get(timeout=60)
    p.join(30)
    assert pid == p.pid
    assert (name, daemon) == ("conformance-worker", True)
    assert authkey == bytes(mp.current_process().authkey)


def test_primitives_from_the_context_work_in_a_child(ctx):
    objs = (ctx.Lock(), ctx.RLock(), ctx.Semaphore(0), ctx.BoundedSemaphore(1), ctx.Condition(), ctx.Event(),
            ctx.Value("i", 1), ctx.Array("d", 3), ctx.Queue())
    p = ctx.Process(target=_primitives, args=objs)
    p.start()
    assert objs[8].get(timeout=60) == "ok"
    p.join(30)
    assert p.exitcode == 0
    assert objs[2].acquire(timeout=5)
    assert objs[5].is_set() and objs[6].value == 2 and objs[7][0] == 42.0


def test_stdlib_queue_connection_and_socket_as_args(ctx):
    std_q = mp.get_context("spawn").Queue()
    r, w = mp.Pipe()
    s1, s2 = socket.socketpair()
    out = ctx.Queue()
    p = ctx.Process(target=_handles, args=(std_q, w, s2, out))
    p.start()
    assert out.get(timeout=60) == "done"
    assert std_q.get(timeout=10) == "via stdlib queue"
    assert r.recv() == "via connection"
    s1.settimeout(10)
    assert s1.recv(100) == b"via socket"
    p.join(30)
    assert p.exitcode == 0


def test_unpicklable_args_raise_in_start(ctx):
    # (ringpool's hybrid pickler sends lambdas by value: test_shipping.py; a lock goes nowhere.)
    p = ctx.Process(target=_sleep, args=({"lock": threading.Lock()},))
    with pytest.raises(TypeError):
        p.start()
    assert p._popen is None or p.exitcode is not None


def _start_join_cycles(ctx, n):
    """n start/join/close cycles; fd count and zombie children must not grow."""
    p = ctx.Process(target=_return)  # first use: the context's fixed resources (supervisor, zygote)
    p.start()
    p.join(60)
    p.close()
    time.sleep(0.5)  # ringpool: its spare workers (a pidfd each) are forked again by then
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(n):
        p = ctx.Process(target=_return)
        p.start()
        p.join(60)
        assert p.exitcode == 0
        p.close()
    time.sleep(0.5)
    assert len(os.listdir("/proc/self/fd")) <= before + 2
    children = our_children()  # any of our threads may be a parent (the supervisor's)
    assert not [c for c in children if not alive(c) and os.path.exists(f"/proc/{c}")], "zombie children left"


def test_many_start_join_cycles_keep_fds_stable(ctx):
    _start_join_cycles(ctx, 20)


# -- the stdlib's pools on the context ------------------------------------------------------

def test_process_pool_executor(ctx):
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx, initializer=_init, initargs=("init",)) as ex:
        assert list(ex.map(_square, range(10), chunksize=3)) == [x * x for x in range(10)]
        assert ex.submit(_square, 7).result(60) == 49
        assert set(ex.map(_get_init, range(4))) == {"init"}
        with pytest.raises(ValueError, match="raised in the child"):
            ex.submit(_raise).result(60)


def test_pool(ctx):
    with ctx.Pool(2) as pool:
        assert pool.map(_square, range(20)) == [x * x for x in range(20)]
        assert sorted(pool.imap_unordered(_square, range(10))) == [x * x for x in range(10)]
        assert pool.apply_async(_square, (9,)).get(60) == 81
    with ctx.Pool(2, maxtasksperchild=1) as pool:
        assert pool.map(_square, range(6), chunksize=1) == [x * x for x in range(6)]


# -- DataLoader ------------------------------------------------------------------------------

class _SquaresDataset:
    def __len__(self):
        return 40

    def __getitem__(self, i):
        import torch

        if i == 33 and getattr(self, "fail", False):
            raise ValueError("bad sample 33")
        return torch.full((3,), float(i)), i * i


def test_dataloader_map_style_order_and_errors(ctx):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    dl = DataLoader(_SquaresDataset(), batch_size=4, num_workers=2, multiprocessing_context=ctx)
    labels = [int(x) for _, y in dl for x in y]
    assert labels == [i * i for i in range(40)]
    ds = _SquaresDataset()
    ds.fail = True
    it = iter(DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=ctx))
    with pytest.raises(ValueError, match="Caught ValueError in DataLoader worker process"):
        for _ in it:
            pass
    del it


def test_dataloader_persistent_workers_and_early_break(ctx):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    dl = DataLoader(_SquaresDataset(), batch_size=4, num_workers=2, multiprocessing_context=ctx,
                    persistent_workers=True)
    pids = None
    for epoch in range(3):
        it = iter(dl)
        assert sum(len(y) for _, y in it) == 40
        now = [w.pid for w in it._workers]
        assert pids is None or now == pids  # the same workers over 3 epochs
        pids = now
    workers = list(it._workers)
    del dl, it
    for w in workers:
        w.join(6)
        assert w.exitcode == 0 if isinstance(ctx, ringpool.RingpoolContext) else w.exitcode is not None
    it = iter(DataLoader(_SquaresDataset(), batch_size=4, num_workers=2, multiprocessing_context=ctx))
    next(it)
    workers = list(it._workers)
    t0 = time.monotonic()
    del it  # an early break: shuts its workers down without terminate()
    assert time.monotonic() - t0 < 2.0
    for w in workers:
        w.join(5)
        # A stdlib spawn worker runs the interpreter's full exit, where torch sometimes aborts
        # (SIGABRT) on these loaded cores; ringpool's workers leave through os._exit.
        assert w.exitcode == 0 if isinstance(ctx, ringpool.RingpoolContext) else w.exitcode is not None


def _file_system_strategy(worker_id):
    import torch.multiprocessing

    torch.multiprocessing.set_sharing_strategy("file_system")


@pytest.mark.parametrize("workers, batch, prefetch", [(1, 1, 1), (3, None, 8), (2, 4, 8)])
def test_dataloader_order_and_shared_batches_across_settings(ctx, workers, batch, prefetch):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    _check_order_and_sharing(DataLoader(_SquaresDataset(), batch_size=batch, num_workers=workers,
                                        prefetch_factor=prefetch, multiprocessing_context=ctx), batch)


def _check_order_and_sharing(dl, batch):
    labels, shared = [], True
    for x, y in dl:
        labels += [int(v) for v in (y if batch is not None else [y])]
        shared &= x.is_shared()
    assert labels == [i * i for i in range(40)]  # the baseline order
    assert shared


@pytest.mark.parametrize("workers, batch, prefetch, modes", [(8, 1, 1, ("zygote", "exec")), (8, None, 8, ("zygote",))])
def test_dataloader_eight_workers(workers, batch, prefetch, modes):
    # Contract item 29 up to 8 workers (four times the cores), ringpool only: eight spawn workers
    # each importing torch take most of a minute here (exec mode once, for the same reason).
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    ctxs = {"zygote": ringpool.get_context(preload=("torch",)), "exec": ringpool.get_context(zygote=False)}
    for ctx in (ctxs[m] for m in modes):
        _check_order_and_sharing(DataLoader(_SquaresDataset(), batch_size=batch, num_workers=workers,
                                            prefetch_factor=prefetch, multiprocessing_context=ctx), batch)


class _WatchdogDataset:
    """Each sample: the worker's parent pid and what DataLoader's ManagerWatchdog says."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        from torch.utils.data._utils.worker import ManagerWatchdog

        return os.getppid(), ManagerWatchdog().is_alive()


def test_dataloader_manager_watchdog_watches_the_main_process(ctx):
    # ManagerWatchdog compares getppid() with its value at start: it must be the main process
    # (CONTRACT §5), not a zygote or a fork server, or a dead main would go unnoticed.
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    got = list(DataLoader(_WatchdogDataset(), batch_size=None, num_workers=2, multiprocessing_context=ctx))
    alive = all(ok for _, ok in got)
    parents = {int(ppid) for ppid, _ in got}
    if ctx.get_start_method() == "forkserver":
        assert parents != {os.getpid()}  # the stdlib's trap: its workers are the server's children
    else:
        assert parents == {os.getpid()} and alive


def test_dataloader_file_system_strategy_set_in_worker_init_fn(ctx):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    dl = DataLoader(_SquaresDataset(), batch_size=8, num_workers=2, worker_init_fn=_file_system_strategy,
                    multiprocessing_context=ctx)
    batches = list(dl)
    assert [int(v) for _, y in batches for v in y] == [i * i for i in range(40)]
    assert torch.equal(batches[2][0][1], torch.full((3,), 17.0))


def test_two_dataloaders_and_an_executor_at_once(ctx):
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        fut = ex.submit(_square, 12)
        a = iter(DataLoader(_SquaresDataset(), batch_size=4, num_workers=1, multiprocessing_context=ctx))
        b = iter(DataLoader(_SquaresDataset(), batch_size=8, num_workers=1, multiprocessing_context=ctx))
        got_a = [int(x) for _, y in a for x in y]
        got_b = [int(x) for _, y in b for x in y]
        assert got_a == got_b == [i * i for i in range(40)]
        assert fut.result(60) == 144


class _DyingDataset:
    """Sample 20 ends its worker (SIGKILL or os._exit(3)) after noting its pid and the time."""

    def __init__(self, path, how):
        self.path, self.how = path, how

    def __len__(self):
        return 400

    def __getitem__(self, i):
        if i == 20:
            with open(self.path, "w") as f:
                f.write(f"{os.getpid()} {time.time()}")
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(3)
        time.sleep(0.005)
        return i


@pytest.mark.parametrize("how", ["kill", "exit3"])
def test_dataloader_reports_a_dead_worker_with_its_pid(ctx, how, tmp_path):
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    if not isinstance(ctx, ringpool.RingpoolContext):
        # forkserver: its workers are not children, so DataLoader only notices after its 5 s
        # status poll, and the dead worker's resource_sharer (tensor fds) often breaks first; a
        # worker left behind by that can wedge the rest of the session. spawn: where DataLoader's
        # SIGCHLD handler interrupts the main thread decides whether the error surfaces inside
        # the loop, in resource_sharer, or after it: on two loaded cores each happens.
        pytest.skip(f"stdlib {ctx.get_start_method()}: a dead DataLoader worker is not reported reliably")
    path = tmp_path / "victim"
    it = iter(DataLoader(_DyingDataset(str(path), how), batch_size=2, num_workers=2, multiprocessing_context=ctx))
    try:
        with pytest.raises(RuntimeError) as info:
            for _ in it:
                pass
        seen = time.time()
    finally:
        # Unregister DataLoader's SIGCHLD check now: the failed iterator stays alive (the
        # traceback holds it), and any later child exit would raise its error again, anywhere.
        it._shutdown_workers()
    pid, died = path.read_text().split()
    # Where DataLoader's SIGCHLD handler interrupts the main thread decides the wording: inside
    # the queue get, "(pid(s) N) exited unexpectedly" caused by the handler's error; elsewhere,
    # the handler's own error.
    text = f"{info.value} <- {info.value.__cause__}"
    assert re.search(rf"DataLoader worker \(pid(\(s\))? {pid}\)", text), text
    # Direct children are seen by DataLoader's SIGCHLD handler at once; ringpool passes tensor fds
    # with the message, so no resource_sharer of the dead worker is ever asked for one.
    assert seen - float(died) < 1.0
    assert ("killed by signal: Killed" if how == "kill" else "exit code 3") in text


class _SlowDataset:
    def __len__(self):
        return 4

    def __getitem__(self, i):
        time.sleep(3)
        return i


def test_dataloader_timeout(ctx):
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    it = iter(DataLoader(_SlowDataset(), num_workers=1, timeout=1, multiprocessing_context=ctx))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="DataLoader timed out after 1 seconds"):
        next(it)
    assert time.monotonic() - t0 < 2.5
    del it


class _Shards:
    """Sharded by worker over range(n); worker 2 of 3 gets an empty shard. Made an
    IterableDataset by _ShardsIterable (below), so that importing this module (which every
    spawn-style worker does) does not import torch."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        assert info is not None and info.num_workers == 3 and info.dataset is not None
        lo = info.id * 10
        hi = min(self.n, lo + 10) if info.id < 2 else lo
        for i in range(lo, hi):
            yield i, info.id, info.seed, _init_calls


def __getattr__(name):
    # _ShardsIterable is created on first use, here and (by pickle's lookup) in workers.
    if name == "_ShardsIterable":
        from torch.utils.data import IterableDataset

        cls = type("_ShardsIterable", (_Shards, IterableDataset), {"__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(name)


_init_calls = 0


def _count_init(worker_id):
    global _init_calls
    _init_calls += 1


def test_dataloader_iterable_shards_init_fn_and_persistent_epochs(ctx):
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader, get_worker_info

    assert get_worker_info() is None
    dl = DataLoader(__getattr__("_ShardsIterable")(20), batch_size=None, num_workers=3, worker_init_fn=_count_init,
                    persistent_workers=True, multiprocessing_context=ctx)
    for _ in range(2):
        rows = list(dl)
        assert sorted(int(r[0]) for r in rows) == list(range(20))  # exact union, no duplicates
        assert {int(r[1]) for r in rows} == {0, 1}
        assert all(int(r[3]) == 1 for r in rows)  # worker_init_fn ran once per worker
        assert len({int(r[2]) for r in rows}) == 2  # a seed per worker
    del dl


def _fail_init(worker_id):
    if worker_id == 1:
        raise ValueError("init failed")


def test_dataloader_init_fn_error_and_pin_memory(ctx):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    with pytest.raises(ValueError, match="worker process 1"):
        list(DataLoader(_SquaresDataset(), batch_size=4, num_workers=2, worker_init_fn=_fail_init,
                        multiprocessing_context=ctx))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "pin_memory ... no accelerator" on a CPU-only build
        batches = list(DataLoader(_SquaresDataset(), batch_size=8, num_workers=2, pin_memory=True,
                                  multiprocessing_context=ctx))
    assert [int(x) for _, y in batches for x in y] == [i * i for i in range(40)]
    assert torch.equal(batches[1][0][0], torch.full((3,), 8.0))


def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def _pid(_=None):
    return os.getpid()


def test_process_pool_executor_broken_pool_and_max_tasks(ctx):
    from concurrent.futures.process import BrokenProcessPool

    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        assert ex.submit(_square, 3).result(60) == 9
        t0 = time.monotonic()
        with pytest.raises(BrokenProcessPool):
            ex.submit(_kill_self).result(60)
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(BrokenProcessPool):
            ex.submit(_square, 2)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as ex:
        pids = [ex.submit(_pid).result(60) for _ in range(3)]
    assert len(set(pids)) == 3


# -- nothing outlives the parent; nothing leaks ------------------------------------------------

_ORPHAN_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, {bindings!r})
import multiprocessing as mp
import ringpool

def sleeper():
    time.sleep(120)

if __name__ == "__main__":
    ctx = ringpool.get_context() if {method!r} == "ringpool" else mp.get_context({method!r})
    procs = [ctx.Process(target=sleeper, daemon={daemon!r}) for _ in range(2)]
    for p in procs:
        p.start()
    zygote = [ctx.zygote_pid()] if {method!r} == "ringpool" else []
    print(" ".join(str(p) for p in [*(p.pid for p in procs), *zygote]), flush=True)
    if {exit_normally!r}:
        sys.exit(0)
    time.sleep(120)
"""




def _run_parent(tmp_path, method, daemon, exit_normally):
    import subprocess

    script = tmp_path / "parent.py"
    bindings = os.path.dirname(os.path.dirname(ringpool.__file__))
    script.write_text(_ORPHAN_SCRIPT.format(bindings=bindings, method=method, daemon=daemon,
                                            exit_normally=exit_normally))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)


def test_daemon_children_end_with_a_normal_exit(tmp_path):
    parent = _run_parent(tmp_path, "ringpool", daemon=True, exit_normally=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert parent.wait(30) == 0
    deadline = time.monotonic() + 15
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def test_workers_die_with_a_sigkilled_parent(tmp_path):
    parent = _run_parent(tmp_path, "ringpool", daemon=False, exit_normally=False)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3 and all(alive(p) for p in pids)  # two workers, the zygote
        parent.kill()
        parent.wait(30)
        deadline = time.monotonic() + 15
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids), "a worker or the zygote outlived its SIGKILLed parent"
    finally:
        parent.kill()


@pytest.mark.stress
@pytest.mark.timeout(300)
def test_300_cycles_leave_no_fds_or_zombies():
    _start_join_cycles(ringpool.get_context(), 300)


# -- get_context's arguments --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_get_context_refuses_a_start_method_name(method):
    with pytest.raises(ValueError, match=rf"multiprocessing\.get_context\('{method}'\)"):
        ringpool.get_context(method)


def test_get_context_ringpool_name_is_the_default_context():
    assert ringpool.get_context("ringpool") is ringpool.get_context()


def test_get_context_tunables():
    ctx = ringpool.get_context(preload=(), spares=0, ready_timeout=60, preload_main=False)
    assert (ctx._spares, ctx._ready_timeout, ctx._preload_main) == (0, 60.0, False)
    assert ringpool.get_context(preload=(), spares=0, ready_timeout=60, preload_main=False) is ctx
    assert ringpool.get_context(preload=(), spares=1, ready_timeout=60, preload_main=False) is not ctx
    assert ringpool.get_context(preload=()) is not ctx
    # Pickled (to a worker, say), a context comes back as the same settings' context.
    assert pickle.loads(pickle.dumps(ctx)) is ctx
    for bad in ({"spares": -1}, {"spares": 1.5}, {"ready_timeout": 0}, {"ready_timeout": -3}):
        with pytest.raises(ValueError):
            ringpool.get_context(preload=(), **bad)


def test_get_context_spares_zero_still_starts_workers():
    ctx = ringpool.get_context(preload=(), spares=0)
    q = ctx.Queue()
    p = ctx.Process(target=q.put, args=("hello",))
    p.start()
    try:
        assert q.get(timeout=60) == "hello"
    finally:
        p.join(60)
    assert p.exitcode == 0
