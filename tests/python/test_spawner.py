"""The spawner and supervisor (docs/design/spawner.md): the zygote's preload, the state a worker
starts from, what happens when the zygote dies, and where processes are started from."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import ringpool
from conftest import alive, our_children
from ringpool import _core

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]




def _wait_gone(pid, timeout=10):
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def _state(q):
    import sys as s

    q.put({"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "env": os.environ.get("RINGPOOL_T"),
           "path": list(s.path), "preloaded": "rp_preload_probe" in s.modules,
           "probe_pid": getattr(s.modules.get("rp_preload_probe"), "IMPORTED_IN", None),
           "fds": sorted(int(x) for x in os.listdir("/proc/self/fd"))})


def _sleep(t):
    time.sleep(t)


def _torch_state(q):
    import torch
    import torch.multiprocessing as tmp

    q.put((tmp.get_sharing_strategy(), torch.get_num_threads()))


def _start_reporting(ctx, q, n):
    """Starts n workers that put their _state on q; returns (processes, states) once all joined."""
    procs = [ctx.Process(target=_state, args=(q,)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return procs, got


@pytest.fixture
def probe_dir(tmp_path, monkeypatch):
    """A module the zygote preloads, on a sys.path entry this process has when the zygote starts."""
    (tmp_path / "rp_preload_probe.py").write_text("import os\nIMPORTED_IN = os.getpid()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_preload_runs_once_in_the_zygote_and_workers_are_our_children(probe_dir):
    ctx = ringpool.RingpoolContext(preload=["rp_preload_probe"])
    q = ctx.Queue()
    ctx.ensure_running()
    zygote = ctx.zygote_pid()
    assert zygote is not None and alive(zygote)
    procs, got = _start_reporting(ctx, q, 3)
    assert {g["pid"] for g in got} == {p.pid for p in procs}
    for g in got:
        assert g["ppid"] == os.getpid()  # forked as our child, not the zygote's
        assert g["preloaded"] and g["probe_pid"] == zygote  # imported once, in the zygote
        # stdio, the boot channel (4 descriptors, kept for package updates), the queue's (4), the
        # parent's resource tracker, the parent's pidfd, _bootstrap's /dev/null stdin and
        # listdir's own: the zygote's control socket and the other workers' descriptors are not
        # inherited.
        assert len(g["fds"]) <= 3 + 4 + 4 + 4, g["fds"]
    assert ctx.zygote_pid() == zygote  # one zygote for all
    ctx.shutdown()
    assert _wait_gone(zygote)


def test_a_worker_starts_from_our_state_at_start_not_the_zygotes(tmp_path, monkeypatch):
    ctx = ringpool.RingpoolContext()
    ctx.ensure_running()
    q = ctx.Queue()
    monkeypatch.setenv("RINGPOOL_T", "after the zygote started")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "extra"))
    p = ctx.Process(target=_state, args=(q,))
    p.start()
    got = q.get(timeout=60)
    p.join(30)
    assert got["env"] == "after the zygote started"
    assert got["cwd"] == str(tmp_path)
    assert str(tmp_path / "extra") in got["path"]
    ctx.shutdown()


@pytest.mark.parametrize("zygote", [True, False])
def test_torch_sharing_strategy_and_threads_are_propagated(zygote):
    torch = pytest.importorskip("torch")
    import torch.multiprocessing as tmp

    ctx = ringpool.RingpoolContext(zygote=zygote)
    q = ctx.Queue()
    old = (tmp.get_sharing_strategy(), torch.get_num_threads())
    tmp.set_sharing_strategy("file_system")
    torch.set_num_threads(3)
    try:
        p = ctx.Process(target=_torch_state, args=(q,))
        p.start()
        assert q.get(timeout=60) == ("file_system", 3)
        p.join(30)
    finally:
        tmp.set_sharing_strategy(old[0])
        torch.set_num_threads(old[1])
        ctx.shutdown()


def _torch_pool_probe(q):
    import torch

    from ringpool import _zygote

    torch.set_num_threads(1)  # what DataLoader does first in each of its workers
    q.put((_zygote.TORCH_POOL_SETTLED, torch.get_num_threads()))


@pytest.mark.parametrize("omp, settled", [("1", True), ("2", False)])
def test_the_zygote_sizes_torchs_thread_pool_only_when_torch_runs_one_thread(omp, settled, monkeypatch):
    # With one intra-op thread the zygote makes torch's pthreadpool at that size, so a worker's
    # set_num_threads(1) starts no pool threads; with more it leaves the pool alone (it would
    # keep threads, and a zygote with threads cannot fork). Either way the zygote serves.
    pytest.importorskip("torch")
    monkeypatch.setenv("OMP_NUM_THREADS", omp)  # the zygote's environment, taken at its start
    ctx = ringpool.RingpoolContext(preload=["torch"])
    q = ctx.Queue()
    try:
        p = ctx.Process(target=_torch_pool_probe, args=(q,))
        p.start()
        assert q.get(timeout=120) == (settled, 1)
        p.join(30)
        assert p.exitcode == 0
    finally:
        ctx.shutdown()


def _heap_probe(q):
    """Whether a 24 MiB malloc came from the heap, and whether its memory stayed there once freed
    (glibc's mallinfo2: hblkhd counts mmap-served bytes, keepcost the releasable heap top)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n = 24 << 20
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(n)
    from_heap = libc.mallinfo2().hblkhd - before < n
    ctypes.memset(p, 1, n)
    libc.free(p)
    q.put((from_heap, libc.mallinfo2().keepcost >= n))


@pytest.mark.parametrize("zygote", [True, False])
@pytest.mark.parametrize("env, expected", [
    ({}, (True, True)),                                  # kept for reuse: no fresh pages next time
    ({"RINGPOOL_WORKER_HEAP": "0"}, (False, False)),     # glibc's defaults
    ({"MALLOC_TOP_PAD_": "0"}, (False, False)),          # the user tuned malloc: left alone
    ({"RINGPOOL_WORKER_HEAP": "lots"}, (False, False)),  # not a number: reported, defaults kept
])
def test_workers_keep_the_memory_they_free_unless_told_otherwise(zygote, env, expected, monkeypatch):
    for k in ("RINGPOOL_WORKER_HEAP", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(k, raising=False)
    ctx = ringpool.RingpoolContext(zygote=zygote)
    try:
        ctx.Process(target=_sleep, args=(0,)).start()  # the zygote starts without the variables
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        q = ctx.SimpleQueue()
        p = ctx.Process(target=_heap_probe, args=(q,))
        p.start()
        assert q.get() == expected
        p.join(30)
        assert p.exitcode == 0
    finally:
        ctx.shutdown()


def test_the_modules_the_zygote_imports_for_its_workers_exist():
    # _zygote imports them before forking and skips what fails to import: a misspelt name would
    # quietly bring back their import (milliseconds of CPU) into every worker's start.
    import importlib

    from ringpool import _zygote

    for name in _zygote._WORKER_MODULES:
        importlib.import_module(name)


def test_a_failed_preload_raises_in_start_with_the_zygotes_traceback():
    ctx = ringpool.RingpoolContext(preload=["rp_no_such_module_anywhere"])
    p = ctx.Process(target=_sleep, args=(0,))
    with pytest.raises(RuntimeError, match="(?s)failed to preload.*No module named 'rp_no_such_module_anywhere'"):
        p.start()
    with pytest.raises(RuntimeError, match="failed to preload"):
        ctx.ensure_running()
    assert ctx.zygote_pid() is None


def test_a_preload_that_starts_threads_is_refused(tmp_path, monkeypatch):
    (tmp_path / "rp_threads_probe.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ctx = ringpool.RingpoolContext(preload=["rp_threads_probe"])
    with pytest.raises(RuntimeError, match="cannot be forked safely"):
        ctx.ensure_running()


def _start_and_check(ctx):
    """A process of ctx starts, reports its own pid and exits cleanly."""
    q = ctx.Queue()
    p = ctx.Process(target=_state, args=(q,))
    p.start()
    assert q.get(timeout=60)["pid"] == p.pid
    p.join(30)
    assert p.exitcode == 0


def test_sigkilled_zygote_ends_its_workers_and_a_new_one_takes_over():
    ctx = ringpool.RingpoolContext()
    p = ctx.Process(target=_sleep, args=(60,))
    p.start()
    zygote = ctx.zygote_pid()
    os.kill(zygote, signal.SIGKILL)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL  # killed with its zygote: join() returned
    assert p.sentinel is not None
    _start_and_check(ctx)
    assert ctx.zygote_pid() not in (None, zygote)
    ctx.shutdown()


def test_zygote_start_and_restart_are_logged(caplog):
    # ringpool.spawner: the first zygote and the one that replaces it after a SIGKILL (INFO), the
    # death itself (WARNING; all three from the C++ supervisor, through ringpool._runtime_log), and
    # each worker's start (DEBUG).
    from ringpool import _runtime_log  # private: flush() makes the supervisor's records appear now

    ctx = ringpool.RingpoolContext(preload=())
    try:
        with caplog.at_level("DEBUG", logger="ringpool"):
            p = ctx.Process(target=_sleep, args=(60,))
            p.start()
            first = ctx.zygote_pid()
            os.kill(first, signal.SIGKILL)
            p.join(10)
            q = ctx.Process(target=_sleep, args=(0,))
            q.start()
            q.join(30)
            second = ctx.zygote_pid()
            _runtime_log.flush()  # the restart was queued before q.start() returned
    finally:
        ctx.shutdown()
    assert p.exitcode == -signal.SIGKILL and q.exitcode == 0 and second not in (None, first)
    spawner = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "ringpool.spawner"]
    infos = [m for level, m in spawner if level == "INFO"]
    assert len(infos) == 2, spawner
    assert infos[0].startswith(f"zygote started (pid {first}) for <ringpool context (zygote, preload=[])>")
    assert infos[1].startswith(f"zygote restarted (pid {second}) ") and f"(pid {first}) died" in infos[1]
    died = [r for r in caplog.records if getattr(r, "event", None) == "zygote_died"]
    assert len(died) == 1 and died[0].levelname == "WARNING" and died[0].ringpool_pid == first, spawner
    assert f"ringpool zygote (pid {first}) " in died[0].getMessage()
    started = [m for level, m in spawner if level == "DEBUG" and m.startswith("started ")]
    assert [m.split("(pid ")[1].split(",")[0] for m in started] == [str(p.pid), str(q.pid)], spawner


def test_a_start_whose_zygote_dies_meanwhile_is_served_by_the_next_zygote():
    # The zygote dies while it serves a start (killed at that moment): the start goes to the
    # zygote that replaces it, with a fresh boot channel, instead of failing.
    ctx = ringpool.RingpoolContext()
    try:
        warm = ctx.Process(target=_sleep, args=(0,))
        warm.start()  # the zygote is up
        warm.join(30)
        sup = ctx._supervisor()
        calls = []

        class DyingOnce:
            def __getattr__(self, name):
                return getattr(sup, name)

            def spawn(self, fds, *rest):
                calls.append(list(fds))
                if len(calls) == 1:
                    os.kill(ctx.zygote_pid(), signal.SIGKILL)  # a real death, then its error
                    raise RuntimeError(f"ringpool zygote (pid {ctx.zygote_pid()}) exited with code -9")
                return sup.spawn(fds, *rest)

        ctx._supervisor = lambda spawning=False: DyingOnce()
        _start_and_check(ctx)
        assert len(calls) >= 2 and calls[0][:4] != calls[-1][:4]  # asked again, with a new boot channel
        # A child the dying zygote forked (too late to report) took the boot frame: it may be
        # running the target, so the start is not asked again (the target runs at most once).
        class TakenThenDied:
            def spawn(self, fds, *rest):
                calls.append(list(fds))
                child_side = _core.Channel.attach(*(os.dup(fd) for fd in fds[:4]))
                assert child_side.get(0.0) is not None
                raise RuntimeError("ringpool zygote (pid 1) exited with code -9")

        calls.clear()
        ctx._supervisor = lambda spawning=False: TakenThenDied()
        with pytest.raises(RuntimeError, match="exited with code -9"):
            ctx.Process(target=_sleep, args=(1,)).start()
        assert len(calls) == 1
        # Any other spawn error is not retried.
        attempts = []

        class Broken:
            def spawn(self, fds, *rest):
                attempts.append(1)
                raise RuntimeError("ringpool: could not start the zygote: no such interpreter")

        ctx._supervisor = lambda spawning=False: Broken()
        with pytest.raises(RuntimeError, match="no such interpreter"):
            ctx.Process(target=_sleep, args=(1,)).start()
        assert attempts == [1]
    finally:
        del ctx._supervisor
        ctx.shutdown()


def _started_then_sleep(q):
    q.put("running")
    time.sleep(60)


def test_the_zygote_ignores_ctrl_c_and_workers_do_not():
    ctx = ringpool.RingpoolContext()
    q = ctx.Queue()
    p = ctx.Process(target=_started_then_sleep, args=(q,))
    p.start()
    assert q.get(timeout=60) == "running"
    zygote = ctx.zygote_pid()
    os.kill(zygote, signal.SIGINT)
    os.kill(p.pid, signal.SIGINT)
    p.join(10)
    assert p.exitcode == 1  # KeyboardInterrupt in the worker, like a spawn child
    time.sleep(0.2)
    assert alive(zygote)
    ctx.shutdown()


def test_a_worker_started_from_a_short_lived_thread_outlives_the_thread():
    # PR_SET_PDEATHSIG follows the thread that started a process; the supervisor's thread does.
    for ctx in (ringpool.RingpoolContext(), ringpool.RingpoolContext(zygote=False)):
        q = ctx.Queue()
        box = []
        t = threading.Thread(target=lambda: (box.append(ctx.Process(target=_sleep, args=(1.0,))), box[0].start()))
        t.start()
        t.join()
        time.sleep(0.3)
        p = box[0]
        assert p.is_alive()
        p.join(30)
        assert p.exitcode == 0
        ctx.shutdown()
        del q


def test_supervisor_observes_exits_without_reaping():
    ctx = ringpool.RingpoolContext()
    p = ctx.Process(target=os._exit, args=(7,))
    p.start()
    sup = ctx._supervisor()
    deadline = time.monotonic() + 10
    while sup.exit_code(p.pid) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sup.exit_code(p.pid) == 7
    assert p.pid not in sup.live_workers()
    p.join(5)  # still ours to reap
    assert p.exitcode == 7
    ctx.shutdown()


_FORKED_CHILD = textwrap.dedent(r"""
    import os, sys
    sys.path.insert(0, {bindings!r})
    import ringpool

    def report(q):
        q.put((os.getpid(), os.getppid()))

    if __name__ == "__main__":
        ctx = ringpool.get_context()
        q = ctx.Queue()
        p = ctx.Process(target=report, args=(q,)); p.start(); p.join()
        parent_zygote = ctx.zygote_pid()
        pid = os.fork()
        if pid == 0:
            q2 = ctx.Queue()
            c = ctx.Process(target=report, args=(q2,)); c.start()
            wpid, wppid = q2.get(timeout=60)
            c.join(30)
            ok = wppid == os.getpid() and ctx.zygote_pid() not in (None, parent_zygote) and c.exitcode == 0
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
""")


def test_a_forked_child_gets_its_own_zygote(tmp_path):
    script = tmp_path / "forked.py"
    script.write_text(_FORKED_CHILD.format(bindings=os.path.dirname(os.path.dirname(ringpool.__file__))))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert out.stdout.strip() == "0", out.stderr


def test_zygote_protocol_errors_are_clear():
    with pytest.raises(OSError):
        _core.Supervisor.exec_mode().spawn([], [-1, -1, -1], "/nonexistent/python", ["x"], [], "")




def _zombies():
    return [k for k in our_children() if not alive(k) and os.path.exists(f"/proc/{k}")]


@pytest.mark.parametrize("spares", [0, 2])
def test_spares_are_used_and_reaped(spares):
    others = our_children()  # other contexts' zygotes and spares
    ctx = ringpool.RingpoolContext(spares=spares)
    ctx.ensure_running()
    zygote = ctx.zygote_pid()
    me = os.getpid()

    def kids():
        return our_children() - others

    deadline = time.monotonic() + 10
    while len(kids() - {zygote}) < spares and time.monotonic() < deadline:
        time.sleep(0.02)
    idle = kids() - {zygote}
    q = ctx.Queue()
    procs, got = _start_reporting(ctx, q, 3)
    if spares:
        # The first starts took the spares forked ahead (our children already, before start()).
        assert {p.pid for p in procs} & idle
    assert all(g["ppid"] == me for g in got)
    ctx.shutdown()  # the zygote ends; unused spares follow it and are reaped
    assert _wait_gone(zygote)
    deadline = time.monotonic() + 10
    while (_zombies() or (kids() & idle) - {p.pid for p in procs}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _zombies()
    assert not (kids() & idle)
    assert len(idle) == spares


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "exec"])
def test_shutdown_releases_the_supervisor_once_no_worker_runs(zygote):
    ctx = ringpool.RingpoolContext(zygote=zygote)
    q = ctx.Queue()
    threads, fds = set(os.listdir("/proc/self/task")), set(os.listdir("/proc/self/fd"))
    procs, _ = _start_reporting(ctx, q, 2)
    sleeper = ctx.Process(target=_sleep, args=(1.0,))
    sleeper.start()
    ctx.shutdown()  # a worker runs: it and its supervisor stay
    assert sleeper.is_alive()
    assert set(os.listdir("/proc/self/task")) - threads
    sleeper.join(30)
    assert sleeper.exitcode == 0
    for p in (*procs, sleeper):
        p.close()
    ctx.shutdown()  # none runs now: the supervisor's thread ends and its descriptors close
    assert set(os.listdir("/proc/self/task")) - threads == set()
    assert set(os.listdir("/proc/self/fd")) - fds == set()
    assert not _zombies()
    # The context works on: the next start() brings up a new supervisor (and zygote).
    _, got = _start_reporting(ctx, q, 1)
    assert got[0]["ppid"] == os.getpid()
    ctx.shutdown()
    assert set(os.listdir("/proc/self/task")) - threads == set()


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _big_range_flags(pid, start):
    """(AnonHugePages kB, VmFlags) of the mapping of pid that holds address start."""
    with open(f"/proc/{pid}/smaps") as f:
        lines = f.read().splitlines()
    inside, huge, flags = False, None, None
    for line in lines:
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= start < hi
        elif inside and line.startswith("AnonHugePages:"):
            huge = int(line.split()[1])
        elif inside and line.startswith("VmFlags:"):
            flags = line.split()[1:]
    return huge, flags


def _report_big(q, done):
    import rp_big_probe

    q.put((os.getpid(), rp_big_probe.address() + (8 << 20)))  # inside its 2 MiB-aligned part
    done.wait(30)


@pytest.mark.skipif(_thp_mode() != "madvise", reason="transparent huge pages are not in madvise mode")
@pytest.mark.parametrize("enabled", [True, False], ids=["default", "RINGPOOL_ZYGOTE_HUGEPAGES=0"])
def test_the_zygotes_memory_is_in_huge_pages_and_its_workers_do_not_add_any(enabled, tmp_path, monkeypatch):
    # A preloaded module holding 16 MiB of anonymous memory: in the zygote it is backed by huge
    # pages (fewer page-table entries to copy per fork and to tear down per worker exit); a worker
    # inherits those mappings but clears the advice on its own ranges.
    (tmp_path / "rp_big_probe.py").write_text(
        "import ctypes\nBUF = bytearray(16 << 20)\n"
        "def address():\n    return ctypes.addressof((ctypes.c_char * 1).from_buffer(BUF))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    if not enabled:
        monkeypatch.setenv("RINGPOOL_ZYGOTE_HUGEPAGES", "0")
    ctx = ringpool.RingpoolContext(preload=["rp_big_probe"], spares=0)
    try:
        q, done = ctx.SimpleQueue(), ctx.Event()
        p = ctx.Process(target=_report_big, args=(q, done))
        p.start()
        wpid, addr = q.get()
        zhuge, zflags = _big_range_flags(ctx.zygote_pid(), addr)
        whuge, wflags = _big_range_flags(wpid, addr)
        done.set()
        p.join(30)
        assert p.exitcode == 0
        if enabled:
            assert "hg" in zflags and zhuge >= 2048, (zhuge, zflags)  # collapsed (Linux 6.1+)
            assert "nh" in wflags and "hg" not in wflags, wflags
        else:
            assert "hg" not in zflags and zhuge == 0, (zhuge, zflags)
            assert "hg" not in wflags and "nh" not in wflags, wflags
    finally:
        ctx.shutdown()


_MAIN_SCRIPT = textwrap.dedent(r"""
    import os, sys
    sys.path.insert(0, {bindings!r})
    import ringpool

    IMPORTED_IN = os.getpid()

    def report(q):
        import sys
        q.put(sys.modules["__mp_main__"].IMPORTED_IN)

    if __name__ == "__main__":
        for preload_main in (True, False):
            ctx = ringpool.RingpoolContext(preload_main=preload_main)
            q = ctx.Queue()
            p = ctx.Process(target=report, args=(q,)); p.start()
            imported_in = q.get(timeout=60)
            p.join(30)
            print(preload_main, imported_in == ctx.zygote_pid(), imported_in == p.pid, flush=True)
            ctx.shutdown()
""")


def test_the_zygote_imports_the_main_module_once(tmp_path):
    script = tmp_path / "main_once.py"
    script.write_text(_MAIN_SCRIPT.format(bindings=os.path.dirname(os.path.dirname(ringpool.__file__))))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert out.stdout.split("\n")[:2] == ["True True False", "False False True"], out.stdout + out.stderr


# -- the automatic preload (get_context() without preload) ---------------------------------------

def _modules_state(q, names):
    import sys as s

    # Read before anything here imports them: present means inherited from the zygote.
    q.put({n: getattr(s.modules.get(n), "IMPORTED_IN", None) if n in s.modules else "absent" for n in names})


def _probe(tmp_path, name, body="import os\nIMPORTED_IN = os.getpid()\n"):
    (tmp_path / f"{name}.py").write_text(body)


@pytest.fixture
def imported_probes(tmp_path, monkeypatch):
    """Imports modules written on a sys.path entry of ours (as a parent imports its libraries);
    removes them from sys.modules afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def imp(name, body="import os\nIMPORTED_IN = os.getpid()\n"):
        import importlib

        _probe(tmp_path, name, body)
        names.append(name)
        return importlib.import_module(name)

    yield imp
    for n in names:
        sys.modules.pop(n, None)


def _worker_modules(ctx, names):
    q = ctx.Queue()
    p = ctx.Process(target=_modules_state, args=(q, names))
    p.start()
    got = q.get(timeout=60)
    p.join(30)
    assert p.exitcode == 0
    return got


def test_the_default_preload_is_automatic_and_survives_pickling_and_registration():
    import pickle

    ctx = ringpool.get_context()
    assert ctx.preload is None and "automatic" in repr(ctx)
    assert ringpool.get_context(preload=()) is not ctx and ringpool.get_context(preload=()).preload == ()
    assert pickle.loads(pickle.dumps(ctx)) is ctx
    assert ringpool.register_start_method() is ctx
    assert ringpool.get_context(zygote=False).preload == ()  # exec mode has no preload
    assert ringpool.RingpoolContext().preload is None


def test_the_default_context_preloads_what_we_imported_and_an_empty_preload_does_not(imported_probes):
    imported_probes("rp_auto_probe")
    auto, empty = ringpool.RingpoolContext(), ringpool.RingpoolContext(preload=())
    try:
        got = _worker_modules(auto, ["rp_auto_probe"])
        assert got["rp_auto_probe"] == auto.zygote_pid()  # imported once, in the zygote
        assert _worker_modules(empty, ["rp_auto_probe"]) == {"rp_auto_probe": "absent"}
    finally:
        auto.shutdown()
        empty.shutdown()


def test_only_modules_a_fresh_interpreter_imports_by_name_are_preloaded(tmp_path, imported_probes):
    import importlib.util
    import types

    from ringpool import context

    imported_probes("rp_auto_plain")
    elsewhere = tmp_path / "not_on_path"
    elsewhere.mkdir()
    _probe(elsewhere, "rp_auto_by_hand")
    spec = importlib.util.spec_from_file_location("rp_auto_by_hand", elsewhere / "rp_auto_by_hand.py")
    by_hand = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(by_hand)
    sys.modules["rp_auto_by_hand"] = by_hand
    sys.modules["rp_auto_nospec"] = types.ModuleType("rp_auto_nospec")
    try:
        names = context._preloadable_modules()
        assert "rp_auto_plain" in names
        assert "rp_auto_by_hand" not in names and "rp_auto_nospec" not in names
        assert "os.path" not in names and "posixpath" in names  # an alias: its real name is there
        assert "conftest" not in names and __name__ not in names  # pytest's rewritten modules
        assert names.index("ringpool") < names.index("ringpool.context")  # parents first
        assert "rp_auto_plain" not in context._preloadable_modules({"rp_auto_plain"})  # a bundle's
    finally:
        sys.modules.pop("rp_auto_by_hand", None)
        sys.modules.pop("rp_auto_nospec", None)


def test_a_module_that_fails_in_the_zygote_is_logged_once_and_workers_start(imported_probes, caplog):
    imported_probes("rp_auto_fails", f"import os\nif os.getpid() != {os.getpid()}:\n"
                                     "    raise RuntimeError('only in the parent')\n")
    imported_probes("rp_auto_fine")
    ctx = ringpool.RingpoolContext()
    try:
        with caplog.at_level("WARNING", logger="ringpool"):
            ctx.ensure_running()
            for _ in range(2):
                got = _worker_modules(ctx, ["rp_auto_fails", "rp_auto_fine"])
                assert got == {"rp_auto_fails": "absent", "rp_auto_fine": ctx.zygote_pid()}
        warned = [r.getMessage() for r in caplog.records if "rp_auto_fails" in r.getMessage()]
        assert len(warned) == 1 and "RuntimeError: only in the parent" in warned[0], warned
        assert all(r.name == "ringpool.spawner" for r in caplog.records if "rp_auto" in r.getMessage())
    finally:
        ctx.shutdown()


def test_a_module_that_starts_a_thread_in_the_zygote_is_left_out_and_the_context_works(tmp_path, imported_probes,
                                                                                       caplog):
    imported_probes("rp_auto_before")
    # Imported by rp_auto_thread's import, and only outside this process: in the zygote, where that
    # import also starts the thread. (sys.modules lists a module once its import is done, so a
    # dependency the parent imported too comes first in the list and is preloaded on its own.)
    _probe(tmp_path, "rp_auto_thread_dep")
    imported_probes("rp_auto_thread", f"import os, threading, time\n"
                                      f"if os.getpid() != {os.getpid()}:\n"
                                      "    import rp_auto_thread_dep\n"
                                      "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    imported_probes("rp_auto_after")
    ctx = ringpool.RingpoolContext()
    try:
        with caplog.at_level("WARNING", logger="ringpool"):
            names = ["rp_auto_before", "rp_auto_thread", "rp_auto_thread_dep", "rp_auto_after"]
            got = _worker_modules(ctx, names)
        zygote = ctx.zygote_pid()
        # The zygote started over (an exec: the same pid) without the module and what it imported.
        assert got == {"rp_auto_before": zygote, "rp_auto_thread": "absent", "rp_auto_thread_dep": "absent",
                       "rp_auto_after": zygote}
        assert len(os.listdir(f"/proc/{zygote}/task")) == 1
        warned = [r.getMessage() for r in caplog.records if "rp_auto_thread" in r.getMessage()]
        assert len(warned) == 1 and "thread" in warned[0], warned
    finally:
        ctx.shutdown()
        sys.modules.pop("rp_auto_thread_dep", None)


_THREADS_SCRIPT = textwrap.dedent(r"""
    import logging, os, sys
    sys.path.insert(0, {bindings!r})
    sys.path.insert(0, {probes!r})
    import ringpool

    def report(q):
        import sys
        q.put([n in sys.modules for n in ("rp_auto_t0", "rp_auto_last")])

    if __name__ == "__main__":  # (not in the zygote, which imports this file as __mp_main__)
        os.environ["RP_PARENT"] = str(os.getpid())  # the zygote's environment is ours
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stdout)
        for i in range({n}):
            __import__(f"rp_auto_t{{i}}")
        import rp_auto_last
        ctx = ringpool.get_context()
        q = ctx.Queue()
        p = ctx.Process(target=report, args=(q,)); p.start()
        print(q.get(timeout=60), flush=True)
        p.join(30)
        print(p.exitcode, flush=True)
""")


def test_too_many_thread_starting_modules_turn_the_automatic_preload_off(tmp_path):
    # In a bare parent of its own: each start over repeats the imports done so far.
    from ringpool import _zygote

    n = _zygote._AUTO_RESTARTS + 1
    for i in range(n):
        _probe(tmp_path, f"rp_auto_t{i}", "import os, threading, time\nif os.getpid() != int(os.environ['RP_PARENT']):\n"
                                          "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    _probe(tmp_path, "rp_auto_last")
    script = tmp_path / "threads.py"
    script.write_text(_THREADS_SCRIPT.format(bindings=os.path.dirname(os.path.dirname(ringpool.__file__)),
                                             probes=str(tmp_path), n=n))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    lines = out.stdout.splitlines()
    assert lines[-2:] == ["[False, False]", "0"], out.stdout + out.stderr
    assert sum("left a thread running" in line for line in lines) == n, out.stdout
    assert sum("automatic preload is off" in line for line in lines) == 1, out.stdout


_LOW_NOFILE = r"""
import resource, sys
import ringpool
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def work():
    sys.exit(0)


if __name__ == "__main__":
    for ctx in (ringpool.get_context(preload=()), ringpool.get_context(zygote=False)):
        p = ctx.Process(target=work)
        p.start()
        p.join(60)
        print(p.exitcode, flush=True)
"""


@pytest.mark.parametrize("limit", [32, 24])
def test_workers_start_with_a_low_descriptor_limit(tmp_path, limit):
    # The exec spawner moved the child's descriptors above a fixed 64 ("launch: Invalid argument"
    # with RLIMIT_NOFILE <= 64), the zygote above every open one; both start modes must work whenever
    # the descriptors they need fit (24 do here; below about 22 the parent itself runs out: EMFILE).
    script = tmp_path / "low_nofile.py"
    script.write_text(_LOW_NOFILE)
    out = subprocess.run([sys.executable, str(script), str(limit)], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["0", "0"], out.stderr[-3000:]
