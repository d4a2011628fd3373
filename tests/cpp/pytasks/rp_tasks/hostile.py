"""Tasks that make their worker break the C++ Pool's protocol, as a hostile worker would: each
writes into the worker's own result channel, found in the worker loop's frame (ringpool's
_pool_worker.serve), then returns normally. The pool must kill that worker, fail its task with a
ProtocolError, and leave every other worker's task alone (tests/cpp/test_pool.cpp)."""
import os
import struct
import sys
import time


def _loop():
    """The worker loop's names: wid, tid (the running call's: run()'s own), put (a record -> the
    result channel), results and calls (the channels), each from the innermost frame holding it."""
    names = {}
    f = sys._getframe(1)
    while f is not None:
        for k in ("put", "results", "calls", "wid", "tid"):
            if k not in names and k in f.f_locals:
                names[k] = f.f_locals[k]
        f = f.f_back
    if len(names) != 5:
        raise RuntimeError(f"hostile: the worker loop's frames were not found (found {sorted(names)})")
    return names


def _task():
    return sys.modules["ringpool._core"].task  # (not imported by name: see rp_tasks.forge_error)


def garbage():
    """Raw bytes that are no pickle at all."""
    _loop()["results"].put_payload(b"\x80\x05garbage, not a result record" * 3)
    return 0


def forge_tids(around):
    """OK answers for the ids near its own (other workers' tasks), claiming to be their worker too."""
    loc = _loop()
    ok = _task().OK
    for t in range(max(1, loc["tid"] - around), loc["tid"] + around + 1):
        if t != loc["tid"]:
            loc["put"]((loc["wid"], t, ok, "forged", 0.0))
    return 0


def forge_wid(other_wid):
    """Its own task's answer, naming another worker."""
    loc = _loop()
    loc["put"]((other_wid, loc["tid"], _task().OK, "forged", 0.0))
    return 0


def wid_out_of_range():
    """Its own task's answer with a worker id no int holds."""
    loc = _loop()
    loc["put"]((1 << 40, loc["tid"], _task().OK, "forged", 0.0))
    return 0


def _oob(fd, length):
    # An out-of-band frame as ringpool writes one: a 16-byte descriptor (length, reserved) inline,
    # the block as handle 0 (proto/include/ringpool/proto/frame.hpp: flag::kOutOfBand = 1).
    _loop()["results"].put_payload(struct.pack("<QQ", length, 0), 1, [fd])


def unsealed_block():
    """A result block it can still shrink or grow (no seals), holding a valid record."""
    loc = _loop()
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    record = __import__("pickle").dumps((loc["wid"], loc["tid"], _task().OK, "unsealed", 0.0), 5)
    os.ftruncate(fd, 1 << 16)
    os.pwrite(fd, record, 4096)
    _oob(fd, len(record))
    os.close(fd)
    return 0


def _sealed(size):
    import fcntl  # (only here: the seals)

    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


def short_block(claim):
    """A sealed block of 64 KiB whose descriptor claims `claim` bytes."""
    fd = _sealed(1 << 16)
    _oob(fd, claim)
    os.close(fd)
    return 0


def oversized_block(size):
    """A sealed (sparse) block of `size` bytes that claims all of them."""
    fd = _sealed(size)
    _oob(fd, size)
    os.close(fd)
    return 0


def many_handles(n):
    """A result frame carrying n descriptors (copies of stderr)."""
    _loop()["results"].put_payload(b"x" * 16, 0, [2] * n)
    return 0


def restart_clock(seconds, every):
    """Runs `seconds`, reporting STARTED for its own call again every `every` seconds: a pool that
    took each report as a fresh start would push the task timeout's deadline back for ever."""
    loc = _loop()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(every)
        loc["put"]((loc["wid"], loc["tid"], _task().STARTED, None, 0.0))
    return 0


def pid_after(t):
    """Sleeps t seconds, returns the worker's pid (an innocent task)."""
    time.sleep(t)
    return os.getpid()


def fd_table(t):
    """After t seconds (so that calls made together land on different workers): this worker's
    pid and [(fd, what it is, inode)] for every descriptor it holds, what being the link's text
    ('socket:[inode]', '/memfd:name (deleted)', 'anon_inode:[eventfd]', a path, ...)."""
    time.sleep(t)
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            out.append((int(name), os.readlink(f"/proc/self/fd/{name}"), os.stat(f"/proc/self/fd/{name}").st_ino))
        except OSError:
            pass  # the listdir's own descriptor, gone already
    return [os.getpid(), sorted(out)]


def hold_call_lock(t):
    """Takes its own call ring's producer lock (the pool is that ring's only producer) and keeps it,
    sleeping t seconds: an honest worker never touches it; a pool that waited for it would stop
    dispatching to every worker."""
    import ctypes  # (only here: the lock is a pthread mutex in the ring's first page)
    import mmap

    calls = _loop()["calls"]
    memfd = calls.handles()[0]
    page = mmap.mmap(memfd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    prod_lock = ctypes.addressof(ctypes.c_char.from_buffer(page, 64))  # RingControl::prod_lock
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.pthread_mutex_lock(ctypes.c_void_p(prod_lock)) != 0:
        raise RuntimeError("hold_call_lock: the lock was not taken")
    _held.append(page)  # kept mapped (and locked) until the worker dies
    time.sleep(t)
    return 0


_held = []
_CONSUMED = 264  # offsetof(RingControl, consumed): frames ever taken from the ring (a u64)


def hide_and_hang(t):
    """Takes back, in its call ring's shared counter, every record it was sent (as if it had never
    taken them), then sleeps t seconds: a pool that read that counter at the worker's death (the
    task timeout's kill) would requeue this call instead of failing it, and run it again and
    again on worker after worker, never timing out."""
    import mmap  # (only here: the counter is in the ring's first page)

    calls = _loop()["calls"]
    page = mmap.mmap(calls.handles()[0], mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    struct.pack_into("<Q", page, _CONSUMED, 0)  # (not even its configuration record)
    _held.append(page)
    time.sleep(t)
    return 0


def hide_and_exit(code):
    """Sets its call ring's shared counter back to 1 (only the worker's configuration record taken,
    as if it had never taken this call), then exits with `code`: the pool reads that counter at the
    death and, trusting it, would requeue this call to the next worker, which it kills the same
    way, for ever; and, before any worker has answered, three such exits with an error code looked
    like a broken interpreter and made the pool fail everything."""
    import mmap  # (only here: the counter is in the ring's first page)

    calls = _loop()["calls"]
    page = mmap.mmap(calls.handles()[0], mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    struct.pack_into("<Q", page, _CONSUMED, 1)
    os._exit(code)
