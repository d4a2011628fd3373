"""Shared fixtures: children that can never outlive a test, and leak checks."""
import contextlib
import multiprocessing as mp
import os

import pytest


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
