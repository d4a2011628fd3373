"""Task functions for test_cluster*.py: this module exists only on the client (the dask workers get
it through ringpool's registry), so it imports nothing but the standard library."""
import os
import signal
import time


def _square(x):
    return x * x


def _add(a, b):
    return a + b


def _fail_at(x, bad):
    if x == bad:
        raise ValueError(f"item {x} is bad")
    return x


def _sleep(x):
    time.sleep(x)
    return x


def _kill_my_dask_worker_once(x, marker, at):
    """The dask worker is the parent of the node-local ringpool worker running this."""
    if x == at:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass  # the rerun
        else:
            os.close(fd)
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(60)
    return x * 3


def _kill_my_dask_worker(x):
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(60)


_state = {}  # set in a node-local worker by _set_tag


def _set_tag(value):
    """An initializer: runs in each node-local worker before its first task."""
    _state["tag"] = value


def _tag(x):
    return _state.get("tag")


def _pid(x):
    return os.getpid()


def _raise_in_init():
    raise OSError("no such device")


def _started_by_zygote(x):
    import sys
    return "ringpool._zygote" in sys.modules
