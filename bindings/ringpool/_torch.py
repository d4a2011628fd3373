"""Recycled shared memory for torch storages made in ringpool workers (DataLoader batches).

In a worker, DataLoader's collate writes each batch straight into new shared memory
(``storage._new_shared(n)``), and torch's file-descriptor strategy makes that a new shared-memory
file per batch: every page of every batch is a fresh page, zero-filled on its first write (about
2.5 us per 4 KiB on these VMs, slower than copying the batch). Here, in ringpool workers only,
``UntypedStorage._new_shared`` takes its memory from a small pool of shared-memory files that
are reused once nobody holds them any more; everything else is torch's own: the storage is
torch's fd-backed shared storage (``is_shared()`` is true on both sides), it travels by
descriptor as before, and the receiver maps it as before.

When is a file free? Each batch maps a fresh *open* of the pool's file (its own struct file), and
only that open ever leaves the pool: the worker's storage, the descriptor in flight, the
receiver's mapping (and wherever the receiver sends it on) all hold it. The pool keeps the
original open, never mapped, and asks the kernel for a write lease on it: Linux grants one only
when no other open of the file exists anywhere (``F_SETLEASE``, about 4 us). So a file is reused
exactly when every process is done with the memory of its last batch.

Files are unnamed (``O_TMPFILE`` in /dev/shm: leases do not work on memfds), so nothing can be
left behind. ``RINGPOOL_RECYCLE_SHARED=0`` in the environment turns the pool off.

torch's own shared storages are named, briefly: under the file_descriptor strategy
``share_memory_()`` creates ``/dev/shm/torch_<pid>_<random>_<n>``, sizes and maps it, and unlinks
the name at once. A process SIGKILLed between the create and the unlink leaves the name behind for
good. ``remove_left_segments(pid)`` removes them; ringpool's Popen calls it when it reaps a worker
that ended abnormally (docs/design/security.md, "A killed worker leaks nothing").
"""
from __future__ import annotations

import fcntl
import os
import threading

F_SETLEASE = 1024  # fcntl.F_SETLEASE (not exported by Python 3.11's fcntl)
_MADV_POPULATE_WRITE = 23  # Linux 5.14: fault a range in with one call
_MIN_FILE = 64 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _populate():
    """madvise(MADV_POPULATE_WRITE) through ctypes, or None where unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None

    def populate(addr, length):
        start = addr - addr % _PAGE
        madvise(start, length + (addr - start), _MADV_POPULATE_WRITE)  # best effort

    return populate


_populate_write = _populate()


def _size_class(n):
    """At least n, rounded up to 1/8 of its power of two (at least 64 KiB)."""
    p = _MIN_FILE
    while p < n:
        p <<= 1
    granule = max(_MIN_FILE, p // 8)
    return (n + granule - 1) // granule * granule


class SharedFilePool:
    """Shared-memory files of this process, reused once no other open of them exists."""

    def __init__(self, max_bytes=512 << 20, directory="/dev/shm"):
        self._lock = threading.Lock()
        self._files = []  # [fd, capacity]
        self._bytes = 0
        self._max = max_bytes
        self._dir = directory
        self._broken = False

    def open(self, nbytes):
        """A fresh read-write descriptor of a free file of at least nbytes (the caller closes
        it), or None when the pool cannot serve (full, or leases unsupported here)."""
        with self._lock:
            if self._broken:
                return None
            fd = self._take(nbytes)
            if fd is None:
                return None
            return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)

    def _take(self, nbytes):
        for fd, cap in self._files:
            if nbytes <= cap <= _size_class(nbytes) * 5 // 4 and self._free(fd):
                return fd
        cap = _size_class(nbytes)
        if self._bytes + cap > self._max:
            return None
        try:
            fd = os.open(self._dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            self._broken = True
            return None
        try:
            os.ftruncate(fd, cap)
            if not self._free(fd):  # leases unavailable: the pool could never reuse a file
                raise OSError("no lease on a file nobody else has open")
        except OSError:
            os.close(fd)
            self._broken = True
            return None
        self._files.append((fd, cap))
        self._bytes += cap
        return fd

    @staticmethod
    def _free(fd):
        try:
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_WRLCK)
        except OSError:
            return False
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
        return True

    def close(self):
        with self._lock:
            for fd, _ in self._files:
                os.close(fd)
            self._files.clear()
            self._bytes = 0


_pool = SharedFilePool()


def remove_left_segments(pid, directory="/dev/shm"):
    """Unlinks the shared-memory files torch named for process ``pid`` (``torch_<pid>_*``) that no
    process has open or mapped; returns their names.

    Call it for a process that has ended. A file someone holds is left alone: a process that got
    the pid since and is between torch's create and unlink has its file open, and the
    file_system strategy's storages live on under their names while in use. The test is the same
    write lease as SharedFilePool's, held while the name is removed.
    """
    prefix = f"torch_{pid}_"
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile, or not a file of ours
        try:
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_WRLCK)  # fails if any other open of it exists
        except OSError:
            os.close(fd)
            continue
        try:
            os.unlink(path)
            removed.append(name)
        except OSError:
            pass
        finally:
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
            os.close(fd)
    return removed


def install(torch):
    """Make ``torch.UntypedStorage._new_shared`` use the pool for CPU storages under the
    file_descriptor sharing strategy (what DataLoader's collate calls in workers)."""
    if os.environ.get("RINGPOOL_RECYCLE_SHARED", "1") == "0":
        return
    untyped = torch.UntypedStorage
    if getattr(untyped._new_shared, "_ringpool", False):
        return
    original = untyped._new_shared.__func__
    from torch.multiprocessing import get_sharing_strategy

    def _new_shared(cls, size, *, device="cpu"):
        if size > 0 and torch.device(device).type == "cpu" and get_sharing_strategy() == "file_descriptor":
            fd = _pool.open(size)
            if fd is not None:
                try:
                    storage = cls._new_shared_fd_cpu(fd, size)
                finally:
                    os.close(fd)
                # The file's pages are resident (reused): map them all in one call rather than
                # taking a fault per page while collate writes the batch.
                if _populate_write is not None and size >= 16 * _PAGE:
                    _populate_write(storage.data_ptr(), size)
                return storage
        return original(cls, size, device=device)

    _new_shared._ringpool = True
    untyped._new_shared = classmethod(_new_shared)
