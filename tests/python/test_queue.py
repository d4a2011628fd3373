"""ringpool.Queue / JoinableQueue / SimpleQueue: stdlib semantics, sizes, batching, pickling."""
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import queue
import threading
import time

import numpy as np
import pytest

import ringpool
from ringpool import _core
from conftest import children, fd_count


def echo_child(q_in, q_out, n):
    for _ in range(n):
        q_out.put(q_in.get(timeout=30))


def producer_child(q, start, n):
    for i in range(start, start + n):
        q.put(i)


# -- stdlib API -------------------------------------------------------------------------------

def test_fifo_and_exceptions():
    q = ringpool.Queue()
    assert q.empty() and q.qsize() == 0
    for i in range(100):
        q.put(i)
    assert q.qsize() == 100 and not q.empty()
    assert [q.get() for _ in range(100)] == list(range(100))
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(False)
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    assert 0.15 <= time.monotonic() - t0 < 2.0


def test_maxsize_full_and_timeout():
    q = ringpool.Queue(maxsize=2)
    q.put(1)
    q.put_nowait(2)
    assert q.full()
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    t0 = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.2)
    assert time.monotonic() - t0 >= 0.15
    assert q.get() == 1
    q.put(3)
    assert [q.get(), q.get()] == [2, 3]
    assert not q.full()


def test_put_blocks_until_a_consumer_frees_a_slot():
    q = ringpool.Queue(maxsize=1)
    q.put("a")
    threading.Timer(0.2, q.get).start()
    t0 = time.monotonic()
    q.put("b", timeout=10)
    assert time.monotonic() - t0 >= 0.1
    assert q.get(timeout=5) == "b"


def test_close_semantics():
    q = ringpool.Queue()
    q.put(1)
    with pytest.raises(AssertionError):
        q.join_thread()
    q.close()
    with pytest.raises(ValueError):
        q.put(2)
    with pytest.raises(ValueError):
        q.get()
    q.join_thread()  # returns: nothing buffered
    q.cancel_join_thread()


def test_joinable_queue_task_done_and_join():
    q = ringpool.JoinableQueue()
    for i in range(5):
        q.put(i)
    done = threading.Event()

    def joiner():
        q.join()
        done.set()

    t = threading.Thread(target=joiner)
    t.start()
    for _ in range(5):
        q.get()
        assert not done.is_set()
        q.task_done()
    assert done.wait(10)
    t.join(10)
    with pytest.raises(ValueError):
        q.task_done()


def test_joinable_queue_across_processes():
    q = ringpool.JoinableQueue()
    out = ringpool.Queue()
    ctx = mp.get_context("fork")
    with children() as procs:
        p = ctx.Process(target=_task_worker, args=(q, out, 50))
        p.start()
        procs.append(p)
        for i in range(50):
            q.put(i)
        q.join()  # returns only after the worker's 50 task_done calls
        assert sorted(out.get(timeout=10) for _ in range(50)) == [i * i for i in range(50)]


def _task_worker(q, out, n):
    for _ in range(n):
        x = q.get(timeout=30)
        out.put(x * x)
        q.task_done()


def test_unpicklable_raises_in_put_and_queue_stays_usable():
    q = ringpool.Queue()
    with pytest.raises(TypeError, match=r"cannot pickle obj\['cfg'\]\[1\] \(a _thread.lock\)"):
        q.put({"cfg": [1, threading.Lock()]})
    with pytest.raises(TypeError):
        q.put(threading.Lock())
    q.put(lambda: "by value")  # the hybrid pickler sends lambdas by value
    assert q.get(timeout=5)() == "by value"
    q.put("fine")
    assert q.get(timeout=5) == "fine"
    assert q.qsize() == 0


@pytest.mark.parametrize("size", [0, 1, 100, 4096])
def test_bytes_sizes_roundtrip(size):
    q = ringpool.Queue()
    data = os.urandom(size)
    q.put(data)
    assert q.get(timeout=5) == data


def test_sizes_around_capacity():
    cap = 64 * 1024
    q = ringpool.Queue(capacity=cap)
    r, w = ringpool.Pipe(duplex=False, capacity=cap)
    for size in (0, 1, cap - 1, cap, 10 * cap):
        data = os.urandom(size)
        q.put(data)
        assert q.get(timeout=10) == data
        w.send_bytes(data)
        assert r.recv_bytes() == data


def test_self_fill_beyond_capacity_never_deadlocks():
    # A process may fill its own queue far beyond the ring before reading it.
    q = ringpool.Queue(capacity=4096)
    n = 20000
    for i in range(n):
        q.put(i)
    assert q.qsize() == n
    assert [q.get(timeout=10) for _ in range(n)] == list(range(n))
    q.close()
    q.join_thread()


@pytest.mark.parametrize("backpressure", [True, False])
def test_self_fill_costs_at_most_one_stall(backpressure):
    q = ringpool.Queue(capacity=4096, backpressure=backpressure)
    t0 = time.monotonic()
    for i in range(5000):
        q.put(i)
    # With backpressure only the first put that finds the ring full waits (5 ms) for a consumer.
    assert time.monotonic() - t0 < 2.0
    assert q._feeder.pending  # the rest was buffered locally
    assert [q.get(timeout=10) for _ in range(5000)] == list(range(5000))


def _slow_consumer(q, out, n):
    got = []
    for _ in range(n):
        got.append(q.get(timeout=30))
        if len(got) % 50 == 0:
            time.sleep(0.002)
    out.put(got)


@pytest.mark.parametrize("backpressure", [True, False])
def test_backpressure_follows_a_live_consumer(backpressure):
    q = ringpool.Queue(capacity=4096, backpressure=backpressure)
    out = ringpool.Queue()
    n = 3000  # ~80 ring-fulls
    ctx = mp.get_context("fork")
    with children() as procs:
        p = ctx.Process(target=_slow_consumer, args=(q, out, n))
        p.start()
        procs.append(p)
        time.sleep(0.2)  # let the consumer reach its first get
        buffered = 0
        for i in range(n):
            q.put(i)
            buffered = max(buffered, len(q._feeder.pending))
        assert out.get(timeout=60) == list(range(n))
    if backpressure:
        # The producer waited for the consumer instead of buffering (a consumer descheduled for
        # over 5 ms on a loaded machine may still make it buffer a little).
        assert buffered < n // 3
    else:
        assert buffered > n // 3


def test_pending_items_flush_at_exit_unless_cancelled():
    ctx = mp.get_context("fork")
    q = ringpool.Queue(capacity=4096)
    with children() as procs:
        p = ctx.Process(target=producer_child, args=(q, 0, 3000))  # far more than 4 KiB of frames
        p.start()
        procs.append(p)
        got = [q.get(timeout=30) for _ in range(3000)]
    assert got == list(range(3000))
    assert p.exitcode == 0


def _fill_and_cancel(q):
    for i in range(3000):
        q.put(i)
    q.cancel_join_thread()


def test_cancel_join_thread_lets_a_child_exit_with_unsent_data():
    ctx = mp.get_context("fork")
    q = ringpool.Queue(capacity=4096)
    p = ctx.Process(target=_fill_and_cancel, args=(q,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    # What reached the ring is intact and in order.
    got = []
    while True:
        try:
            got.append(q.get(timeout=0.2))
        except queue.Empty:
            break
    assert got == list(range(len(got))) and 0 < len(got) < 3000


def test_put_many_get_many_batches():
    q = ringpool.Queue(capacity=8192)
    items = [(i, "x" * (i % 50)) for i in range(5000)]
    q.put_many(items)
    got = []
    while len(got) < len(items):
        batch = q.get_many(300, timeout=10)
        assert 1 <= len(batch) <= 300
        got.extend(batch)
    assert got == items
    with pytest.raises(queue.Empty):
        q.get_many(10, timeout=0.05)


def test_put_many_mixes_plain_and_special_items_in_order():
    q = ringpool.Queue()
    arr = np.arange(100000, dtype=np.int64)
    items = [1, arr, "two", b"x" * 300000, 3]
    q.put_many(items)
    got = [q.get(timeout=5) for _ in items]
    assert got[0] == 1 and got[2] == "two" and got[3] == items[3] and got[4] == 3
    assert np.array_equal(got[1], arr)


def test_numpy_out_of_band_is_zero_copy_and_recycled():
    q = ringpool.Queue()
    a = np.random.default_rng(0).random((4 << 20) // 8)
    q.put(a)
    b = q.get(timeout=5)
    assert np.array_equal(a, b) and b.flags.writeable
    b[0] = 42.0  # writable, owned by us until dropped
    del b
    before = _core.block_pool_bytes()
    for _ in range(20):
        q.put(a)
        c = q.get(timeout=5)
        assert c[123] == a[123]
        del c
    assert _core.block_pool_bytes() == before  # the same block every time


# -- pickling into children of every start method -------------------------------------------

def test_queue_pickles_into_children(start_method):
    q_in, q_out = ringpool.Queue(), ringpool.Queue()
    with children() as procs:
        p = start_method.Process(target=echo_child, args=(q_in, q_out, 3))
        p.start()
        procs.append(p)
        for x in ("a", [1, 2], {"k": b"v"}):
            q_in.put(x)
            assert q_out.get(timeout=30) == x
    assert p.exitcode == 0


def test_queue_refuses_to_pickle_outside_process_start():
    with pytest.raises(RuntimeError):
        pickle.dumps(ringpool.Queue())
    with pytest.raises(RuntimeError):
        pickle.dumps(ringpool.SimpleQueue())


# -- SimpleQueue as the stdlib Pool / ProcessPoolExecutor use it ----------------------------

def test_simple_queue_reader_writer_interoperate():
    q = ringpool.SimpleQueue()
    q.put(("put", 1))
    assert q._reader.recv() == ("put", 1)
    q._writer.send(("send", 2))
    assert q.get() == ("send", 2)
    q._writer.send_bytes(pickle.dumps("raw"))
    assert q.get() == "raw"
    q.put({"x": 3})
    assert pickle.loads(q._reader.recv_bytes()) == {"x": 3}
    assert q.empty() and not q._reader.poll()
    q.put(4)
    assert q._reader.poll(0.5)
    assert q._rlock.acquire(timeout=1)
    q._rlock.release()
    assert q.get() == 4
    q.close()


def test_readiness_fd_works_with_connection_wait():
    q = ringpool.SimpleQueue()
    assert multiprocessing.connection.wait([q._reader], timeout=0.05) == []
    threading.Timer(0.1, q.put, args=("x",)).start()
    ready = multiprocessing.connection.wait([q._reader], timeout=10)
    assert ready == [q._reader]
    assert q.get() == "x"
    assert multiprocessing.connection.wait([q._reader], timeout=0.05) == []  # not stale


def _ready(reader, timeout=0.0):
    return multiprocessing.connection.wait([reader], timeout=timeout) == [reader]


def test_reader_readiness_tracks_messages_exactly():
    # What ProcessPoolExecutor's manager thread relies on: wait() reports the reader ready only
    # while a message is there (a recv() then never blocks), waiting does not consume the
    # readiness, and taking the last message clears it.
    q = ringpool.SimpleQueue()
    assert not _ready(q._reader)
    q.put(1)
    q.put(2)
    for _ in range(3):  # stays ready until read
        assert _ready(q._reader)
    assert q._reader.recv() == 1
    assert _ready(q._reader)  # one message left
    assert q._reader.recv() == 2
    assert not _ready(q._reader)  # the last one was taken
    q.put(3)  # ready again for the next message (the signal is re-armed)
    assert _ready(q._reader)
    assert q.get() == 3
    assert not _ready(q._reader)


def _burst_producer(q, start, n):
    for i in range(start, start + n):
        q.put(i)
        if i % 7 == 0:
            time.sleep(0.0002)  # let the consumer empty the ring now and then


def test_reader_readiness_with_producers_in_other_processes():
    # Two producer processes race the consumer, which empties the ring again and again: every
    # wake-up of wait() must find a message, and none may be missed.
    q = ringpool.SimpleQueue()
    n = 3000
    with children() as procs:
        for k in range(2):
            p = mp.get_context("fork").Process(target=_burst_producer, args=(q, k * n, n))
            p.start()
            procs.append(p)
        got = []
        while len(got) < 2 * n:
            assert _ready(q._reader, timeout=10), f"no readiness with {len(got)} of {2 * n} received"
            assert q._reader.poll(0), "the reader was reported ready without a message"
            got.append(q._reader.recv())
        for p in procs:
            p.join(10)
    assert sorted(got) == list(range(2 * n))
    assert not _ready(q._reader, timeout=0.05)


def test_waiting_on_an_empty_reader_does_not_spin():
    q = ringpool.SimpleQueue()
    t0 = time.thread_time()
    assert multiprocessing.connection.wait([q._reader], timeout=0.3) == []
    assert time.thread_time() - t0 < 0.05  # asleep in poll, not looping


def test_queue_in_child_keeps_fds_stable():
    q = ringpool.Queue()
    before = fd_count()
    for i in range(1000):
        q.put(i)
        q.get(timeout=5)
    assert fd_count() <= before + 2


def _sq_worker(q_in, q_out):
    while True:
        x = q_in.get()
        if x is None:
            break
        q_out.put(x + 1)


def test_simple_queue_across_processes(start_method):
    a, b = ringpool.SimpleQueue(), ringpool.SimpleQueue()
    with children() as procs:
        p = start_method.Process(target=_sq_worker, args=(a, b))
        p.start()
        procs.append(p)
        for i in range(100):
            a.put(i)
        assert sorted(b.get() for _ in range(100)) == list(range(1, 101))
        a.put(None)


def test_asyncio_waits_on_the_readiness_fd():
    import asyncio

    q = ringpool.SimpleQueue()
    conn_r, conn_w = ringpool.Pipe(duplex=False)

    async def main():
        loop = asyncio.get_running_loop()
        got = []
        for reader, fetch in ((q._reader, q.get), (conn_r, conn_r.recv)):
            ready = asyncio.Event()
            loop.add_reader(reader.fileno(), ready.set)
            try:
                assert not ready.is_set()
                threading.Timer(0.05, q.put if reader is q._reader else conn_w.send, args=("hi",)).start()
                await asyncio.wait_for(ready.wait(), 10)
                got.append(fetch())
            finally:
                loop.remove_reader(reader.fileno())
        return got

    assert asyncio.run(main()) == ["hi", "hi"]


class _Reentrant:
    """Pickling it pickles something else with ringpool on the same thread."""

    def __reduce__(self):
        inner, _, _ = ringpool.reduction.dumps({"inner": [1, 2, 3]})
        return (_Reentrant._rebuild, (inner,))

    @staticmethod
    def _rebuild(inner):
        return ("rebuilt", pickle.loads(inner))


class _Late:
    pass


class _Registering:
    """Pickling it registers a new reducer (the reducer tables change in the middle of a dump)."""

    def __reduce__(self):
        from multiprocessing.reduction import ForkingPickler

        ForkingPickler.register(_Late, lambda o: (_Late, ()))
        return (_Registering, ())


def test_reentrant_pickling_and_reducers_registered_mid_dump():
    import gc

    q = ringpool.Queue()
    arrays = [np.arange(3000) + i for i in range(20)]  # out-of-band buffers in the outer dump
    for _ in range(50):
        q.put([_Reentrant(), arrays, _Registering(), {"k": 1}, _Reentrant()])
        got = q.get(timeout=5)
        assert got[0] == ("rebuilt", {"inner": [1, 2, 3]}) and got[4] == got[0]
        assert all(np.array_equal(a, b) for a, b in zip(got[1], arrays))
        gc.collect()
    q.put(_Late())
    assert isinstance(q.get(timeout=5), _Late)


def _explode():
    raise RuntimeError("cannot rebuild")


class _BadOnLoad:
    def __reduce__(self):
        return (_explode, ())


@pytest.mark.parametrize("bad_at", [0, 3])
def test_get_many_unpickling_error_loses_nothing_else(bad_at):
    q = ringpool.Queue()
    items = list(range(8))
    items[bad_at] = _BadOnLoad()
    q.put_many(items)
    got = []
    raised = 0
    while len(got) < 7:
        try:
            got.extend(q.get_many(100, timeout=5))
        except RuntimeError as e:
            assert "cannot rebuild" in str(e)
            raised += 1
    assert raised == 1
    assert got == [i for i in range(8) if i != bad_at]
    with pytest.raises(queue.Empty):
        q.get_many(10, timeout=0.05)


@pytest.mark.parametrize("timeout", [float("inf"), 1e12])
def test_a_huge_or_infinite_timeout_blocks_until_an_item(timeout):
    # The timeout became int64 nanoseconds without a range check: inf and 1e12 s overflowed to an
    # expired deadline and get() raised Empty at once.
    q = ringpool.Queue()
    a, b = ringpool.Pipe()
    threading.Timer(0.3, q.put, args=("late",)).start()
    threading.Timer(0.3, b.send, args=("late",)).start()
    t0 = time.monotonic()
    assert q.get(timeout=timeout) == "late"
    assert a.poll(timeout)
    assert a.recv() == "late"
    assert time.monotonic() - t0 >= 0.25
    with pytest.raises(ValueError):
        q.get(timeout=float("nan"))


@pytest.mark.parametrize("capacity", [2**63 + 1, 2**64 + 5, 2**41, 0, -1])
def test_absurd_queue_capacities_are_refused(capacity):
    # 2**63 + 1 used to loop forever (rounding up to a power of two overflowed) holding the GIL.
    for make in (lambda: ringpool.Queue(capacity=capacity), lambda: ringpool.SimpleQueue(capacity=capacity),
                 lambda: ringpool.Pipe(capacity=capacity)):
        with pytest.raises(ValueError, match="ring capacity must be 1 to"):
            make()
    q = ringpool.Queue(capacity=1)  # the smallest capacity is still a working ring (one page)
    q.put("x")
    assert q.get(timeout=10) == "x"


# -- received segments are vetted before they are mapped (docs/design/security.md) ----------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _forged_block(capacity, payload=b"", seal=True):
    """A memfd laid out as an out-of-band block (BlockHeader in block.hpp: magic, version, state
    BUSY, reserved, capacity), sealed or not: what a careless or hostile peer could send."""
    import fcntl
    import struct

    fd = os.memfd_create("forged-block", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, _PAGE + capacity)
    os.pwrite(fd, struct.pack("<IIIIQ", _core.BLOCK_MAGIC, _core.BLOCK_VERSION, 1, 0, capacity), 0)
    os.pwrite(fd, payload, _PAGE)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _put_forged(q, fd, length):
    """Publishes a hand-made out-of-band frame naming block fd and claiming length bytes."""
    import struct

    q._chan.put(struct.pack("<QQ", length, 0), _core.FLAG_OUT_OF_BAND, [fd])
    os.close(fd)


def test_unsealed_out_of_band_block_is_refused_and_the_queue_goes_on():
    # Mapped without a look at its seals, the block's sender could later truncate it under the
    # reader (SIGBUS, see the next test); now the frame is refused and only that frame is lost.
    q = ringpool.Queue()
    pickled = pickle.dumps("forged")
    _put_forged(q, _forged_block(64 * 1024, pickled, seal=False), len(pickled))
    q.put("after")
    with pytest.raises(ringpool.ProtocolError, match=r"out-of-band block is not sealed \(F_SEAL_SHRINK and "
                                                     r"F_SEAL_GROW missing\)"):
        q.get(timeout=5)
    assert q.get(timeout=5) == "after"
    # A memfd that merely lacks one of the two seals is no better.
    import fcntl
    fd = _forged_block(64 * 1024, pickled, seal=False)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    _put_forged(q, fd, len(pickled))
    with pytest.raises(ringpool.ProtocolError, match="F_SEAL_GROW missing"):
        q.get(timeout=5)


@pytest.mark.parametrize("capacity,claim,why", [
    (64 * 1024, 64 * 1024 + 1, "too short: 69632 bytes, at least 69633 expected"),
    (16 << 20, 100, "too large"),  # 16 MiB mapped (and populated) for a 100-byte message
])
def test_sealed_block_of_the_wrong_size_is_refused_and_loses_nothing_else(capacity, claim, why):
    q = ringpool.Queue()
    q.put("before")
    _put_forged(q, _forged_block(capacity, pickle.dumps("forged")), claim)
    q.put_many(["after", 1])
    got, errors = [], []
    while len(got) < 3:
        try:
            got.extend(q.get_many(10, timeout=5))
        except ringpool.ProtocolError as e:
            errors.append(str(e))
    assert got == ["before", "after", 1]
    assert len(errors) == 1 and f"out-of-band block is {why}" in errors[0]


_TRUNCATE_AFTER_SEND = r"""
import os, pickle, sys
sys.path.insert(0, os.environ["TESTS_DIR"])
import ringpool
from ringpool import _core
from test_queue import _forged_block
import struct

ch = _core.Channel.create()
data = os.urandom(64 * 1024)
fd = _forged_block(64 * 1024, data, seal=False)
ch.put(struct.pack("<QQ", len(data), 0), _core.FLAG_OUT_OF_BAND, [fd])
try:
    flags, payload, fds = ch.get(5.0)
except ringpool.ProtocolError as e:
    print("refused:", e)
    sys.exit(0)
view = memoryview(payload)
assert bytes(view[:16]) == data[:16]  # mapped and readable
os.ftruncate(fd, 0)                    # the sender shrinks its segment under the reader
print("read after truncation:", bytes(view[-16:]))
"""


def test_a_block_truncated_after_sending_cannot_sigbus_the_reader():
    import subprocess
    import sys

    env = {**os.environ, "TESTS_DIR": os.path.dirname(__file__)}
    r = subprocess.run([sys.executable, "-c", _TRUNCATE_AFTER_SEND], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, f"reader died (signal {-r.returncode})" if r.returncode < 0 else r.stderr
    assert r.stdout.startswith("refused: out-of-band block is not sealed"), r.stdout + r.stderr


def test_received_memfd_check_from_python():
    fd = _core.create_memfd("ours", 8192)
    try:
        assert _core.check_received_memfd(fd, 8192, 8192, "ours") == 8192
        with pytest.raises(ringpool.ProtocolError, match="ours is too short: 8192 bytes, at least 8193"):
            _core.check_received_memfd(fd, 8193, 1 << 20, "ours")
    finally:
        os.close(fd)


# -- a take that blocks, or cannot hold its descriptors (docs/design/security.md, "Descriptors") --

def _run_script(script, timeout=120):
    """Runs script in a fresh interpreter (it may lower its limits or wedge); its stdout."""
    import subprocess
    import sys

    env = {**os.environ, "TESTS_DIR": os.path.dirname(__file__)}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


_OUT_OF_DESCRIPTORS = r"""
import errno, os, resource, socket
import ringpool
from ringpool import _core

q = ringpool.Queue()
a, b = socket.socketpair()
q.put("before")
q.put(a)                       # travels as a descriptor
q.put("after")
a.close()
ch = _core.Channel.create()    # the same at the channel level: bytes plus a pipe's read end
r, w = os.pipe()
os.write(w, b"kept")
ch.put(b"fd item", 0, [r])
os.close(r)

_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
hog = []
try:
    while True:
        hog.append(os.open("/dev/null", os.O_RDONLY))
except OSError as e:
    assert e.errno == errno.EMFILE
assert q.get_many(10, timeout=5) == ["before"]  # what comes before the descriptor still arrives
for get in (lambda: q.get(timeout=5), lambda: q.get_many(10, timeout=5), lambda: ch.get(5.0)):
    for attempt in range(3):   # refused each time, and each time nothing is lost
        try:
            got = get()
        except OSError as e:
            assert e.errno == errno.EMFILE, e
            assert "out of file descriptors" in str(e) and "stays queued" in str(e), e
        else:
            raise AssertionError(f"took {got!r} with no descriptor free")
print("refused")
for fd in hog[:16]:
    os.close(fd)
s = q.get(timeout=5)
s.sendall(b"ping")
assert b.recv(4) == b"ping"
assert q.get(timeout=5) == "after"
flags, payload, fds = ch.get(5.0)
assert payload == b"fd item" and os.read(fds[0], 4) == b"kept"
print("delivered")
"""


def test_an_fd_item_waits_for_a_receiver_out_of_descriptors():
    # Before: the descriptor packet was read with the frame already taken; EMFILE truncated it
    # (MSG_CTRUNC), the frame was gone and a ProtocolError was all that was left of the item.
    out = _run_script(_OUT_OF_DESCRIPTORS)
    assert out.split() == ["refused", "delivered"], out


_GIL_FREE_WHILE_HANDLES_WAIT = r"""
import os, socket, threading, time
from ringpool import _core

ch = _core.Channel.create()
r, w = os.pipe()
os.write(w, b"one")
ch.put(b"first", 0, [r])
ch.put(b"second")
os.close(r)
memfd, tx, rx, event = ch.handles()
# Take the first frame's descriptor packet off the side socket: its reader now waits for it,
# as it would for a producer that sends late (or never).
thief = socket.socket(fileno=os.dup(rx))
packet, ancdata, _, _ = thief.recvmsg(24, socket.CMSG_SPACE(4 * 4))
assert len(packet) == 24 and ancdata

results, native = {}, {}
def take(name):
    native[name] = threading.get_native_id()
    try:
        results[name] = ch.get(60.0)
    except Exception as e:
        results[name] = e

def syscall(name):
    try:
        with open(f"/proc/self/task/{native[name]}/syscall") as f:
            return f.read().split()[0]
    except OSError:
        return None  # the thread has ended

t1 = threading.Thread(target=take, args=("t1",))
t1.start()
deadline = time.monotonic() + 30
# Python runs here while t1 waits for the packet in poll() (7, or ppoll 271): it holds no GIL.
while not (t1.is_alive() and "t1" in native and syscall("t1") in ("7", "271")):
    assert t1.is_alive() or "t1" not in native, f"t1 ended first: {results}"
    assert time.monotonic() < deadline, "t1 never waited in poll"
    time.sleep(0.001)
print("waiting-in-poll")
# A second reader finds the consumer lock held by t1: it must wait for it without the GIL too.
t2 = threading.Thread(target=take, args=("t2",))
t2.start()
time.sleep(0.2)
counter = sum(range(100000))  # more Python while both wait
sender = socket.socket(fileno=os.dup(tx))
sender.sendmsg([packet], ancdata)
t1.join(60)
t2.join(60)
flags, payload, fds = results["t1"]
assert payload == b"first" and os.read(fds[0], 3) == b"one", results
assert results["t2"] == b"second", results
print("delivered")
"""


def test_a_take_waiting_for_handles_or_the_consumer_lock_releases_the_gil():
    # Before: t1 waited for the packet (up to 10 s, then ProtocolError) holding the GIL, so this
    # script's main thread could not run until then, and t2 blocked on the lock holding it too.
    out = _run_script(_GIL_FREE_WHILE_HANDLES_WAIT)
    assert out.split() == ["waiting-in-poll", "delivered"], out
