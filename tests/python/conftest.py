"""Shared fixtures: children that can never outlive a test, and leak checks."""
import contextlib
import gc
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import venv

import pytest

BINDINGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bindings")


def shm_entries():
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def fd_count():
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def children(timeout=60):
    """Collects started processes; on exit joins them within `timeout` and kills stragglers,
    failing the test if any had to be killed."""
    procs = []
    try:
        yield procs
    finally:
        stuck = []
        for p in procs:
            p.join(timeout)
            if p.is_alive():
                stuck.append(p)
                p.kill()
                p.join(5)
    assert not stuck, f"children still running after {timeout}s: {stuck}"


@pytest.fixture(params=["fork", "spawn", "forkserver"])
def start_method(request):
    return mp.get_context(request.param)


@pytest.fixture
def no_shm_leak():
    before = shm_entries()
    yield
    # ringpool names nothing in /dev/shm (memfd segments); stdlib named semaphores (sem.mp-*) are
    # the stdlib resource tracker's to clean, at its own exit.
    leaked = {e for e in shm_entries() - before if not e.startswith("sem.mp-")}
    assert not leaked, f"left in /dev/shm: {leaked}"


def alive(pid):
    """True while pid runs (a zombie has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped while we read
        return False


def our_children():
    """Our children, whichever of our threads is their parent (ringpool's workers and spares:
    the supervisor's thread)."""
    kids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            kids |= {int(t) for t in open(f"/proc/self/task/{task}/children").read().split()}
        except (FileNotFoundError, ProcessLookupError):
            pass
    return kids


@pytest.fixture(autouse=True)
def _forget_dataloader_workers():
    """After each test, take every DataLoader iterator's workers out of torch's SIGCHLD check.

    A failed or abandoned iterator stays registered while something holds it (a traceback, a
    cycle); any later child exit then makes torch's handler raise its "worker exited" error at an
    arbitrary point of a later test, or inside pytest itself (an INTERNALERROR)."""
    if "torch" not in sys.modules:  # a test that imports torch itself is covered from the next one
        yield
        return
    import torch.utils.data._utils.signal_handling as sh
    keys = []
    real = sh._set_worker_pids

    def recording(key, pids):
        keys.append(key)
        return real(key, pids)

    sh._set_worker_pids = recording
    try:
        yield
    finally:
        sh._set_worker_pids = real
        gc.collect()
        for key in keys:
            try:
                sh._remove_worker_pids(key)
            except (ValueError, RuntimeError):
                pass  # already removed by its iterator's shutdown


@pytest.fixture(scope="session")
def ringpool_venv(tmp_path_factory):
    """The python of a venv that has this checkout as its ringpool, with nothing compiled again:
    made once per session (``venv --system-site-packages``, no pip), its site-packages gets a
    path .pth naming this checkout's bindings/ (where ``./run build`` put the extension) and the
    very .pth the package installs (bindings/ringpool-start-method.pth). Interpreters started
    from it, also with ``-I`` (PYTHONPATH ignored), import ringpool and know the start method
    "ringpool" with no call first."""
    env_dir = tmp_path_factory.mktemp("ringpool_venv")
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    site_dir = subprocess.run([py, "-I", "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert site_dir.startswith(str(env_dir)), site_dir
    # site reads a folder's .pth files in name order: this one ("_" sorts before "r") puts
    # bindings/ on sys.path before the start-method .pth imports its module from there.
    with open(os.path.join(site_dir, "_ringpool-checkout.pth"), "w") as f:
        f.write(BINDINGS + "\n")
    shutil.copy(os.path.join(BINDINGS, "ringpool-start-method.pth"), site_dir)
    return py


@pytest.fixture
def dask_procs():
    """Real dask schedulers and workers a test starts (tests/python/_dask_procs.py), each process
    group killed when the test ends."""
    import _dask_procs  # here, not at the top: it is only for the cluster tests (conftest's folder is on sys.path)
    procs = _dask_procs.Procs()
    try:
        yield procs
    finally:
        procs.close()


@pytest.fixture(scope="module")
def cluster_tasks_registered():
    """tests/python/_cluster_tasks.py registered with ringpool for one module's tests (the dask
    workers do not have it: registered, it is shipped), purged after: other test modules expect an
    empty registry."""
    import _cluster_tasks  # here, not at the top: only the cluster tests use it
    import ringpool  # here, not at the top: conftest imports ringpool nowhere else (tests import it themselves)
    ringpool.register_module(_cluster_tasks)
    yield _cluster_tasks
    ringpool.modules.purge("_cluster_tasks")
