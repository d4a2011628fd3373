"""Nested workers (a ringpool worker that starts ringpool workers) and the shared resource tracker.

A worker started by a worker outlives its parent, as under spawn (so it can see the parent die
through ``parent_process()``), and dies with the outermost process; workers at every depth use
the outermost process's resource tracker.
"""
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from multiprocessing import shared_memory

import pytest

import ringpool
from conftest import alive

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(params=["zygote", "exec"])
def ctx(request):
    return ringpool.get_context(zygote=request.param == "zygote")


# -- targets ------------------------------------------------------------------------------------

def _report_parent(conn):
    from multiprocessing.process import parent_process

    parent = parent_process()
    conn.send(("alive" if parent.is_alive() else "not alive", parent.pid, os.getppid()))
    parent.join(60)  # returns when the parent dies
    conn.send(("alive" if parent.is_alive() else "not alive", parent.pid, os.getppid()))


def _start_grandchild(conn, zygote):
    inner = ringpool.get_context(zygote=zygote)
    p = inner.Process(target=_report_parent, args=(conn,))
    p.start()
    conn.send(("started", os.getpid(), p.pid))
    time.sleep(120)


def _start_daemon_grandchild(conn, zygote):
    inner = ringpool.get_context(zygote=zygote)
    p = inner.Process(target=time.sleep, args=(120,), daemon=True)
    p.start()
    conn.send(p.pid)
    time.sleep(120)


def _square(x):
    return x * x


def _executor_inside(conn):
    with ringpool.Executor(max_workers=2) as ex:
        conn.send(list(ex.map(_square, range(20), chunksize=3)))


def _dataloader_inside(conn):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    ds = TensorDataset(torch.arange(32))
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=ringpool.get_context())
    conn.send([int(x) for (batch,) in loader for x in batch])


def _tracker_pid(conn):
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # reuses the inherited one: no new tracker process
    conn.send(resource_tracker._resource_tracker._pid)
    conn.send(resource_tracker._resource_tracker._check_alive())


def _write_shared(name, conn):
    sm = shared_memory.SharedMemory(name)
    sm.buf[:5] = b"HELLO"
    sm.close()
    conn.send("written")


def _nested_tracker(conn, zygote):
    p = ringpool.get_context(zygote=zygote).Process(target=_tracker_pid, args=(conn,))
    p.start()
    p.join(60)


# -- tests --------------------------------------------------------------------------------------

def test_a_grandchild_has_its_parent_and_notices_its_death(ctx):
    r, w = mp.Pipe(duplex=False)
    child = ctx.Process(target=_start_grandchild, args=(w, ctx.zygote))
    child.start()
    try:
        got = {}
        for _ in range(2):  # the child's report and the grandchild's, in either order
            assert r.poll(60), f"the worker did not start its own worker (got {got})"
            msg = r.recv()
            got[msg[0]] = msg[1:]
        child_pid, grand_pid = got["started"]
        assert child_pid == child.pid
        assert got["alive"] == (child.pid, child.pid)
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert r.poll(60), "the grandchild died with its parent (it must outlive it, as under spawn)"
        status, parent_pid, _ = r.recv()
        assert (status, parent_pid) == ("not alive", child.pid)
        deadline = time.monotonic() + 30
        while alive(grand_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(grand_pid)
    finally:
        child.kill()
        child.join(10)


def test_a_daemonic_grandchild_dies_with_its_parent(ctx):
    # A daemonic worker (a Pool's, an Executor's, a DataLoader's) ends with its parent, as the
    # parent would end it at exit; a pool's worker waiting on a ring could not notice otherwise.
    r, w = mp.Pipe(duplex=False)
    child = ctx.Process(target=_start_daemon_grandchild, args=(w, ctx.zygote))
    child.start()
    try:
        assert r.poll(60)
        grand = r.recv()
        assert alive(grand)
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        deadline = time.monotonic() + 10
        while alive(grand) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(grand), "a daemonic grandchild outlived its SIGKILLed parent"
    finally:
        child.kill()
        child.join(10)


def test_an_executor_inside_a_worker(ctx):
    r, w = mp.Pipe(duplex=False)
    p = ctx.Process(target=_executor_inside, args=(w,))
    p.start()
    assert r.poll(90)
    assert r.recv() == [x * x for x in range(20)]
    p.join(60)
    assert p.exitcode == 0


def test_a_dataloader_inside_a_worker(ctx):
    pytest.importorskip("torch")
    r, w = mp.Pipe(duplex=False)
    p = ctx.Process(target=_dataloader_inside, args=(w,))
    p.start()
    assert r.poll(90)
    assert r.recv() == list(range(32))
    p.join(60)
    assert p.exitcode == 0


def test_workers_at_every_depth_use_the_outermost_resource_tracker(ctx):
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    ours = resource_tracker._resource_tracker._pid
    r, w = mp.Pipe(duplex=False)
    for target, args in ((_tracker_pid, (w,)), (_nested_tracker, (w, ctx.zygote))):
        p = ctx.Process(target=target, args=args)
        p.start()
        assert r.poll(60)
        pid = r.recv()
        assert pid in (None, ours), "the worker started a resource tracker of its own"
        assert r.recv() is True
        p.join(60)
        assert p.exitcode == 0


def test_shared_memory_attached_in_a_worker_survives_its_exit(ctx):
    sm = shared_memory.SharedMemory(create=True, size=64)
    try:
        sm.buf[:5] = b"howdy"
        r, w = mp.Pipe(duplex=False)
        p = ctx.Process(target=_write_shared, args=(sm.name, w))
        p.start()
        assert r.poll(60) and r.recv() == "written"
        p.join(60)
        assert p.exitcode == 0
        time.sleep(0.2)  # a tracker of the worker's own would have unlinked it by now
        again = shared_memory.SharedMemory(sm.name)  # still there
        assert bytes(again.buf[:5]) == b"HELLO"
        again.close()
    finally:
        sm.close()
        sm.unlink()  # ours to unlink: raises if a worker's tracker took it


_TOP_SCRIPT = r"""
import os, sys, time
sys.path.insert(0, {bindings!r})
import multiprocessing as mp
import ringpool

def leaf(conn):
    conn.send(os.getpid())
    time.sleep(120)

def middle(conn, depth):
    ctx = ringpool.get_context(zygote={zygote!r})
    conn.send(os.getpid())
    if ctx.zygote:
        ctx.ensure_running()
        conn.send(ctx.zygote_pid())
    p = ctx.Process(target=middle if depth > 1 else leaf, args=(conn, depth - 1) if depth > 1 else (conn,))
    p.start()
    time.sleep(120)

if __name__ == "__main__":
    r, w = mp.Pipe(duplex=False)
    p = ringpool.get_context(zygote={zygote!r}).Process(target=middle, args=(w, 2))
    p.start()
    pids = []
    while r.poll(60):
        pids.append(r.recv())
        if len(pids) == (5 if {zygote!r} else 3):
            break
    print(" ".join(map(str, pids)), flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "exec"])
def test_nothing_outlives_a_sigkilled_top_process(tmp_path, zygote):
    script = tmp_path / "top.py"
    bindings = os.path.dirname(os.path.dirname(ringpool.__file__))
    script.write_text(_TOP_SCRIPT.format(bindings=bindings, zygote=zygote))
    top = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        pids = [int(p) for p in top.stdout.readline().split()]
        # depth 1, its zygote, depth 2, its zygote, the leaf (exec mode: no zygotes)
        assert len(pids) == (5 if zygote else 3) and all(alive(p) for p in pids), pids
        top.kill()
        top.wait(30)
        deadline = time.monotonic() + 15
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)], "a nested worker or zygote outlived the SIGKILLed top process"
    finally:
        top.kill()
        top.wait(30)


_TRACKER_MODULE = """
import os
from multiprocessing import resource_tracker

resource_tracker.ensure_running()  # in the zygote's preload: a tracker of the zygote's own
FD = resource_tracker._resource_tracker._fd
INO = os.fstat(FD).st_ino
"""


def _zygote_tracker_state(conn):
    from multiprocessing import resource_tracker

    import rp_zygote_tracker as m

    try:
        inherited_open = os.fstat(m.FD).st_ino == m.INO
    except OSError:
        inherited_open = False
    t = resource_tracker._resource_tracker
    conn.send((inherited_open, t._pid, os.fstat(t._fd).st_ino != m.INO))


def test_a_worker_drops_the_tracker_its_zygote_started(tmp_path, monkeypatch):
    (tmp_path / "rp_zygote_tracker.py").write_text(_TRACKER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    ctx = ringpool.get_context(preload=["rp_zygote_tracker"])
    r, w = mp.Pipe(duplex=False)
    p = ctx.Process(target=_zygote_tracker_state, args=(w,))
    p.start()
    try:
        assert r.poll(60)
        inherited_open, pid, uses_ours = r.recv()
    finally:
        p.join(60)
        ctx.shutdown()
    assert not inherited_open, "the worker kept the zygote's tracker pipe open"
    assert pid is None
    assert uses_ours
    assert p.exitcode == 0
