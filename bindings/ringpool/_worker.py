"""The first code a ringpool worker runs, in both start modes (see ringpool.popen).

Does what the stdlib's ``spawn._main`` does, reading from the worker's ringpool channel instead
of a pipe: preparation data first (sys.path, cwd, the parent's ``__main__``, name, authkey, plus
ringpool's own: the environment in zygote mode, torch's sharing strategy and thread count, and
``ringpool._torch``'s recycled shared memory once torch is imported; see ``_retain_heap`` for
the worker's malloc settings), then the process object, then ``_bootstrap`` with a pidfd of the
parent as the parent sentinel.

The worker's descriptors start at ``fd_base``: its channel (4 descriptors), then those the process
object's reducers collected (``Popen.duplicate_for_child``), which ``_InheritedFd.detach`` finds
through ``passed_fd``.
"""
import io
import os
import sys

from . import _core
from . import _torch
from . import modules
from ._pool_worker import serve_pool
from .bundle import _install_environment
from .reduction import loads

EXEC_FD_BASE = 3
CHANNEL_FDS = 4
_fd_base = EXEC_FD_BASE

# Freed heap memory a worker keeps for reuse, in bytes (``RINGPOOL_WORKER_HEAP`` overrides; 0
# keeps glibc's defaults). See _retain_heap.
WORKER_HEAP_DEFAULT = 64 << 20
# glibc settings that, when the user made them, are theirs to keep.
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
_MALLOC_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold", "glibc.malloc.top_pad")


# The outermost ringpool process's pid in a worker (None elsewhere); see _watch_root.
_root = None


def root_pid():
    """In a worker, the pid of the outermost ringpool process (None outside a worker)."""
    return _root


def passed_fd(index):
    """The number of the index-th descriptor the process object carries."""
    return _fd_base + CHANNEL_FDS + index


def main():
    """Exec mode's entry point (descriptors from 3)."""
    run(EXEC_FD_BASE)


def run(fd_base):
    global _fd_base
    _fd_base = fd_base
    from multiprocessing import process, spawn
    from multiprocessing import reduction

    chan = _core.Channel.attach(*range(fd_base, fd_base + CHANNEL_FDS))
    frame = chan.get(60.0)
    if frame is None:
        sys.stderr.write("ringpool worker: no process object arrived from the parent\n")
        os._exit(255)
    if type(frame) is not bytes:
        # Larger than the ring's inline limit (a big process object, many or large registered
        # packages, a bundle): the frame came out of band, as (flags, buffer, descriptors).
        _flags, payload, _fds = frame
        frame = bytes(payload)
    stream = io.BytesIO(frame)
    prep_data = reduction.pickle.load(stream)
    if type(prep_data) is dict and "ringpool_pool" in prep_data:
        # A worker of the C++ ringpool::Pool: a plain configuration instead of a process object,
        # and the producer side of its own result ring as the passed descriptors (segment, the
        # handle socket's sending end, eventfd: the receiving end stays with the pool, -1 here).
        results = _core.Channel.attach(passed_fd(0), passed_fd(1), -1, passed_fd(2))
        os._exit(serve_pool(prep_data["ringpool_pool"], chan, results))
    _apply_state(prep_data.pop("ringpool", {}))
    if prep_data.get("start_method") == "ringpool":
        # The parent named the start method: make the name resolve here too (spawn.prepare sets
        # it), on first use, without importing the parent side (ringpool.context) now.
        import _ringpool_start_method  # noqa: F401  (not ringpool's: the .pth's module, at its import)
    process.current_process()._inheriting = True
    try:
        spawn.prepare(prep_data)
        self = reduction.pickle.load(stream)
    finally:
        del process.current_process()._inheriting
    del frame, stream
    # The boot channel stays: the parent sends new versions of registered packages on it, and
    # every object-level get from a ringpool channel installs them before unpickling.
    global _boot
    _boot = chan
    _core.set_modules_channel(chan, _install_pending_modules)
    del chan
    try:
        parent_sentinel = os.pidfd_open(os.getppid())
    except OSError:
        parent_sentinel = None
    exitcode = self._bootstrap(parent_sentinel=parent_sentinel)
    os._exit(exitcode)


_boot = None


def _install_pending_modules():
    """Install the package versions waiting on the boot channel (called from _core's gets)."""
    chan = _boot
    if chan is None:
        return
    try:
        while True:
            item = chan.get(0.0)
            if item is None:
                return
            kind, blobs = loads(item)
            if kind == "modules":
                for data in blobs:
                    modules.install(modules.Snapshot.from_bytes(data))
    except Exception as exc:
        sys.stderr.write(f"ringpool worker {os.getpid()}: could not install a package update: {exc!r}\n")


def _forget_boot_channel():
    # A child forked from a worker must not take the worker's updates; and it is a root of its
    # own (the workers it starts die with it).
    global _boot, _root
    _root = None
    if _boot is not None:
        _boot = None
        _core.set_modules_channel(None)


os.register_at_fork(after_in_child=_forget_boot_channel)


def _apply_state(state):
    """The parent's state at start() that spawn's preparation data does not carry."""
    if state.get("modules"):  # before anything is unpickled: classes may come from these
        for data in state["modules"]:
            modules.install(modules.Snapshot.from_bytes(data))
    if state.get("bundle"):  # the context's bundle, when the zygote did not install it
        _install_environment(*state["bundle"])
    _watch_root(state.get("root"), state.get("daemon", False))
    if state.get("tracker") is not None:
        from multiprocessing import resource_tracker

        tracker = resource_tracker._resource_tracker
        inherited = tracker._fd  # a zygote's own tracker, when its preload started one
        tracker._fd = passed_fd(state["tracker"])
        tracker._pid = None  # the tracker is the parent's child, not ours (as under spawn)
        if inherited is not None and inherited != tracker._fd:
            try:
                os.close(inherited)  # else the zygote's tracker sees EOF only when we exit
            except OSError:
                pass
    env = state.get("environ")
    if env is not None and env != dict(os.environ):
        os.environ.clear()
        os.environ.update(env)
    _retain_heap(os.environ)
    torch_state = state.get("torch")

    def on_torch(torch):
        if torch_state is not None:
            _apply_torch(torch_state, torch)
        _torch.install(torch)  # recycled shared memory for the storages collate makes

    if "torch" in sys.modules:
        on_torch(sys.modules["torch"])
    else:
        _after_import("torch", on_torch)


def _watch_root(root, daemon):
    """A non-daemonic worker started by a worker (a nested one) outlives its parent, as under
    spawn, so that it can notice the parent's death through ``parent_process()``; it dies with
    the root instead, so nothing outlives the outermost process. A daemonic one (a Pool's, a
    DataLoader's, an Executor's worker) keeps dying with its parent, as every worker of the root
    does (the parent-death signal the spawner armed): its parent would have ended it at exit, and
    a pool's worker waits on a ring, which has no end-of-file by which to notice a dead parent."""
    global _root
    if root is None:
        return
    _root = root
    if root != os.getppid() and not daemon:
        try:
            _core.die_with(root)
        except ProcessLookupError:  # the root is gone already (ESRCH): so must we be
            os._exit(255)


def _retain_heap(env):
    """Let this worker reuse the memory it frees instead of giving it back to the kernel.

    A data-loading worker allocates and frees about the same memory for every batch (decoded
    samples, the arrays collate stacks). glibc's defaults hand a freed heap top of more than
    ~2x the largest recent block back to the kernel, and serve large blocks by mmap, so every
    batch writes to fresh pages, which the kernel zero-fills on first touch (about 2.5 us per
    4 KiB on these VMs: more than the batch's own work, see docs/design/spawner.md). A worker
    keeps up to WORKER_HEAP_DEFAULT of freed memory instead (``RINGPOOL_WORKER_HEAP`` in the
    parent's environment sets the amount, 0 turns it off); what it holds at any moment is never
    more than its own peak. Malloc settings the user made (glibc's environment variables or
    tunables) are left alone.
    """
    if any(k in env for k in _MALLOC_ENV) or any(t in env.get("GLIBC_TUNABLES", "") for t in _MALLOC_TUNABLES):
        return False
    value = env.get("RINGPOOL_WORKER_HEAP")
    nbytes = WORKER_HEAP_DEFAULT
    if value is not None:
        try:
            nbytes = int(value)
        except ValueError:
            sys.stderr.write(f"ringpool worker: RINGPOOL_WORKER_HEAP={value!r} is not a number of bytes; "
                             f"glibc's malloc defaults kept\n")
            return False
    if nbytes <= 0:
        return False
    return _core.retain_heap(nbytes)


def _apply_torch(state, torch):
    import torch.multiprocessing as tmp

    if tmp.get_sharing_strategy() != state["sharing_strategy"]:
        tmp.set_sharing_strategy(state["sharing_strategy"])
    if torch.get_num_threads() != state["num_threads"]:
        torch.set_num_threads(state["num_threads"])


def _after_import(name, hook):
    """Run hook(module) right after `name` is first imported (no import happens until then)."""
    import importlib.util

    class _Loader:
        def __init__(self, inner):
            self.inner = inner

        def create_module(self, spec):
            return self.inner.create_module(spec)

        def exec_module(self, module):
            self.inner.exec_module(module)
            hook(module)

    class _Finder:
        def find_spec(self, fullname, path=None, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
            return spec

    sys.meta_path.insert(0, _Finder())
