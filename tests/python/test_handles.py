"""Handles inside ringpool messages: descriptors, Connections, sockets, torch tensors (shared
storage), stdlib queues, ringpool queues and large numpy buffers, between processes.

Every case checks that the handle works on the other side (data flows through it, an in-place
write is seen by the peer), not merely that an object arrived. Children get the ringpool queues
as Process arguments (spawn, forkserver) or inherit them (fork); a child reports a failure as a
("__child_error__", traceback) item on its reply queue, so the parent fails with the traceback.
"""
import contextlib
import gc
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.reduction
import os
import queue
import select
import socket
import stat
import threading
import time
import traceback

import numpy as np
import pytest
import torch  # registers torch's reducers (torch.multiprocessing): storages travel as fds

import ringpool

pytestmark = pytest.mark.integration

# Anything a child has to do (a spawn child imports torch: seconds on a busy 2-core box).
DEADLINE = 90
# Each test's hard limit (pytest-timeout); children are killed in a finally block anyway.
TEST_TIMEOUT = 240

METHODS = ["spawn", "forkserver", "fork"]


# -- helpers ------------------------------------------------------------------------------------

class FdBox:
    """A raw descriptor that pickles through multiprocessing.reduction.DupFd."""

    def __init__(self, fd):
        self.fd = fd

    def __reduce__(self):
        return (_rebuild_fdbox, (multiprocessing.reduction.DupFd(self.fd),))


def _rebuild_fdbox(token):
    return FdBox(token.detach())


class Unclaimed:
    """Carries a descriptor whose token the receiver never detaches (ringpool must close it)."""

    def __init__(self, fd):
        self.fd = fd

    def __reduce__(self):
        return (_rebuild_unclaimed, (multiprocessing.reduction.DupFd(self.fd),))


def _rebuild_unclaimed(token):
    return "unclaimed"


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def _child_main(fn_name, reply, *args):
    """Process target: runs globals()[fn_name](reply, *args), reporting any exception."""
    try:
        globals()[fn_name](reply, *args)
    except BaseException:
        reply.put(("__child_error__", traceback.format_exc()))
        raise


@contextlib.contextmanager
def child(method, fn, *args):
    """Start fn(reply, *args) in a child of the given start method; yields (process, reply).

    On a clean exit of the block the child must exit 0 within DEADLINE; whatever happens it is
    killed if still running.
    """
    ctx = mp.get_context(method)
    reply = ringpool.Queue()
    p = ctx.Process(target=_child_main, args=(fn.__name__, reply) + args, daemon=True)
    p.start()
    try:
        yield p, reply
        p.join(DEADLINE)
        assert not p.is_alive(), "child still running"
        assert p.exitcode == 0, f"child exit code {p.exitcode}"
    finally:
        if p.is_alive():
            p.kill()
        p.join(10)


def recv(reply, proc, timeout=DEADLINE):
    """The next item of reply; fails (instead of hanging) if the child dies or takes too long."""
    deadline = time.monotonic() + timeout
    dead_since = None
    while True:
        try:
            item = reply.get(timeout=0.25)
        except queue.Empty:
            now = time.monotonic()
            if not proc.is_alive():
                dead_since = dead_since or now
                if now - dead_since > 2.0:  # let anything it sent last arrive
                    pytest.fail(f"child exited ({proc.exitcode}) without replying")
            if now > deadline:
                pytest.fail(f"no reply from the child within {timeout}s")
            continue
        if type(item) is tuple and len(item) == 2 and type(item[0]) is str and item[0] == "__child_error__":
            pytest.fail("child failed:\n" + item[1])
        return item


def read_until_eof(fd, timeout=DEADLINE):
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no EOF within {timeout}s; read so far {out!r}"
        r, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return out
        out += chunk


def recv_exact(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {out!r}"
        out += chunk
    return out


# -- raw descriptors via DupFd ------------------------------------------------------------------

def _child_fd(reply, q):
    box, ino = q.get(timeout=DEADLINE)
    st = os.fstat(box.fd)
    assert stat.S_ISFIFO(st.st_mode) and st.st_ino == ino, "not the parent's pipe"
    os.write(box.fd, b"written by child %d" % os.getpid())
    os.close(box.fd)
    # The other way: the read end of a pipe of our own, which already holds data.
    r, w = os.pipe()
    os.write(w, b"from the child's pipe")
    os.close(w)
    reply.put(FdBox(r))
    os.close(r)  # borrowed by put: the descriptor already travels with the frame
    reply.put("done")


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("method", METHODS)
def test_raw_fd_roundtrip(method):
    q = ringpool.Queue()
    r, w = os.pipe()
    try:
        with child(method, _child_fd, q) as (p, reply):
            q.put((FdBox(w), os.fstat(w).st_ino))
            os.close(w)
            w = None
            box = recv(reply, p)
            try:
                assert box.fd != r
                assert read_until_eof(box.fd) == b"from the child's pipe"
            finally:
                os.close(box.fd)
            assert recv(reply, p) == "done"
        # The child closed its copy and exited (a fork child also held the inherited one).
        assert read_until_eof(r) == b"written by child %d" % p.pid
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


# -- multiprocessing.connection.Connection ------------------------------------------------------

def _child_connection(reply, q):
    conn = q.get(timeout=DEADLINE)
    assert isinstance(conn, multiprocessing.connection.Connection)
    assert conn.poll(DEADLINE)
    tag, n = conn.recv()
    conn.send(("pong", n + 1, os.getpid()))
    conn.send_bytes(b"x" * 200_000)  # more than a pipe buffer: the parent must be reading
    conn.close()
    reply.put("done")


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("method", METHODS)
def test_mp_connection_roundtrip(method):
    q = ringpool.Queue()
    a, b = mp.Pipe()
    try:
        with child(method, _child_connection, q) as (p, reply):
            q.put(b)
            b.close()
            a.send(("ping", 41))
            assert a.poll(DEADLINE), "no answer through the Connection"
            assert a.recv() == ("pong", 42, p.pid)
            assert a.poll(DEADLINE)
            assert a.recv_bytes() == b"x" * 200_000
            assert recv(reply, p) == "done"
        # Every copy of the other end is gone with the child.
        assert a.poll(DEADLINE)
        with pytest.raises(EOFError):
            a.recv()
    finally:
        a.close()


# -- socket.socket ------------------------------------------------------------------------------

def _child_socket(reply, q):
    s = q.get(timeout=DEADLINE)
    assert isinstance(s, socket.socket) and s.family == socket.AF_UNIX
    s.settimeout(DEADLINE)
    data = recv_exact(s, 5)
    s.sendall(b"echo:" + data + b":%d" % os.getpid())
    s.close()
    reply.put("done")


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("method", METHODS)
def test_socket_roundtrip(method):
    q = ringpool.Queue()
    s1, s2 = socket.socketpair()
    try:
        s1.settimeout(DEADLINE)
        with child(method, _child_socket, q) as (p, reply):
            q.put(s2)
            s2.close()
            s1.sendall(b"hello")
            expected = b"echo:hello:%d" % p.pid
            assert recv_exact(s1, len(expected)) == expected
            assert recv(reply, p) == "done"
        assert s1.recv(10) == b""  # the child's end is closed
    finally:
        s1.close()
        s2.close()


# -- torch tensors ------------------------------------------------------------------------------

def _tensor_cases():
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    return {
        "flat": torch.zeros(8, dtype=torch.float32),
        "base": base,
        "view": base[1:, ::2],  # offset 6, strides (6, 2)
        "transposed": base.t(),
        "ints": torch.arange(10, dtype=torch.int64),
        "u8": torch.tensor([1, 2, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "half": torch.ones(5, dtype=torch.float16),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0),
        "empty2d": torch.empty(0, 3, dtype=torch.int32),
        "param": torch.nn.Parameter(torch.ones(3, 3)),
    }


def _describe(t):
    return (str(t.dtype), tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.tolist())


def _child_tensors(reply, q):
    got, expected = q.get(timeout=DEADLINE)
    assert set(got) == set(expected)
    for k, t in got.items():
        assert isinstance(t, torch.Tensor), k
        assert _describe(t) == expected[k], (k, _describe(t), expected[k])
    assert got["view"].storage_offset() == 6 and got["view"].stride() == (6, 2)
    assert isinstance(got["param"], torch.nn.Parameter) and got["param"].requires_grad
    assert got["empty"].numel() == 0 and got["empty"].dtype == torch.float32
    for k in ("flat", "base", "view", "ints", "param"):
        assert got[k].is_shared(), k
    # In place: the parent must see every one of these.
    got["flat"][2] = 7.0
    got["view"].mul_(-1)  # rows 1..3, even columns of "base"
    got["ints"].add_(100)
    got["u8"][0] = 9
    with torch.no_grad():
        got["param"].add_(1.0)
    # Child -> parent: tensors made here.
    fresh = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 3
    reply.put({
        "fresh": fresh,
        "fresh_view": fresh[:, 1::2],
        "empty": torch.empty(0),
        "param": torch.nn.Parameter(torch.full((2,), 5.0), requires_grad=False),
        "long": torch.arange(100_000, dtype=torch.int64),
    })
    reply.put("done")


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("method", METHODS)
def test_torch_tensors_share_storage(method):
    q = ringpool.Queue()
    cases = _tensor_cases()
    expected = {k: _describe(t) for k, t in cases.items()}
    base_before = cases["base"].clone()
    with child(method, _child_tensors, q) as (p, reply):
        q.put((cases, expected))
        back = recv(reply, p)
        assert recv(reply, p) == "done"

    # The child's in-place writes, seen through the parent's own tensors.
    assert cases["flat"].tolist() == [0, 0, 7.0, 0, 0, 0, 0, 0]
    want = base_before.clone()
    want[1:, ::2] *= -1
    assert torch.equal(cases["base"], want)
    assert torch.equal(cases["view"], want[1:, ::2])
    assert cases["ints"].tolist() == list(range(100, 110))
    assert cases["u8"].tolist() == [9, 2, 255]
    assert torch.equal(cases["param"].detach(), torch.full((3, 3), 2.0))

    # Tensors made by the child, alive after it exited.
    fresh = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 3
    assert back["fresh"].dtype == torch.float32 and torch.equal(back["fresh"], fresh)
    v = back["fresh_view"]
    assert v.shape == (3, 2) and v.stride() == (4, 2) and v.storage_offset() == 1
    assert torch.equal(v, fresh[:, 1::2])
    assert back["empty"].shape == (0,) and back["empty"].dtype == torch.float32
    assert isinstance(back["param"], torch.nn.Parameter) and not back["param"].requires_grad
    assert back["param"].tolist() == [5.0, 5.0]
    assert torch.equal(back["long"], torch.arange(100_000, dtype=torch.int64))
    back["fresh"][0, 0] = 1.0  # writable, and the view shares it
    back["fresh"][0, 1] = -1.0
    assert v[0, 0].item() == -1.0


# -- a stdlib queue through a ringpool queue ----------------------------------------------------

def _child_mp_queue(reply, q):
    to_child, from_child = q.get(timeout=DEADLINE)
    assert type(from_child).__module__ == "multiprocessing.queues"
    token = to_child.get(timeout=DEADLINE)
    from_child.put(("reply via the stdlib queue", token, os.getpid()))
    from_child.close()
    from_child.join_thread()
    reply.put("done")


@pytest.mark.timeout(TEST_TIMEOUT)
def test_stdlib_queue_through_ringpool_queue():
    ctx = mp.get_context("spawn")
    to_child, from_child = ctx.Queue(), ctx.Queue()
    q = ringpool.Queue()
    with child("spawn", _child_mp_queue, q) as (p, reply):
        q.put((to_child, from_child))
        to_child.put(1234)  # the child reads it through its copy of the pipe, then answers
        assert from_child.get(timeout=DEADLINE) == ("reply via the stdlib queue", 1234, p.pid)
        assert recv(reply, p) == "done"
    for mpq in (to_child, from_child):
        mpq.close()
        mpq.join_thread()


# -- more descriptors than one sendmsg carries --------------------------------------------------

N_MANY = 300  # the kernel passes at most 253 descriptors per sendmsg (SCM_MAX_FD)


def _child_many_tensors(reply, q):
    ts = q.get(timeout=DEADLINE)
    assert len(ts) == N_MANY
    for i, t in enumerate(ts):
        assert t.dtype == torch.int64 and t.tolist() == [i] * 4, (i, t)
    for t in ts:
        t.add_(1000)
    reply.put([torch.full((3,), -i, dtype=torch.int32) for i in range(N_MANY)])
    reply.put("done")


@pytest.mark.timeout(TEST_TIMEOUT)
def test_300_tensors_in_one_message():
    q = ringpool.Queue()
    ts = [torch.full((4,), i, dtype=torch.int64) for i in range(N_MANY)]
    with child("spawn", _child_many_tensors, q) as (p, reply):
        q.put(ts)
        back = recv(reply, p)
        assert recv(reply, p) == "done"
    assert len(back) == N_MANY
    for i, t in enumerate(back):
        assert t.dtype == torch.int32 and t.tolist() == [-i] * 3, (i, t)
    for i, t in enumerate(ts):  # the child's in-place writes
        assert t.tolist() == [i + 1000] * 4, (i, t)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_600_descriptors_in_one_message_same_process():
    q = ringpool.Queue()
    r, w = os.pipe()
    try:
        q.put([FdBox(w) for _ in range(600)])
        boxes = q.get(timeout=30)
        assert len(boxes) == 600 and len({b.fd for b in boxes}) == 600
        try:
            for i, b in enumerate(boxes):
                assert os.fstat(b.fd).st_ino == os.fstat(w).st_ino
                os.write(b.fd, bytes([i % 256]))
        finally:
            for b in boxes:
                os.close(b.fd)
        os.close(w)
        w = None
        assert read_until_eof(r) == bytes(i % 256 for i in range(600))
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


# -- ringpool queues (and a ringpool Pipe) inside ringpool messages -----------------------------

def _child_ringpool_in_ringpool(reply, q):
    inner, jq, sq, conn = q.get(timeout=DEADLINE)
    assert isinstance(inner, ringpool.Queue) and isinstance(jq, ringpool.JoinableQueue)
    assert isinstance(sq, ringpool.SimpleQueue) and isinstance(conn, ringpool.Connection)
    inner.put(("via inner", os.getpid()))
    for _ in range(3):
        jq.get(timeout=DEADLINE)
        jq.task_done()
    sq.put(sq.get() * 2)  # the parent reads the answer only after "done"
    assert conn.poll(DEADLINE)
    conn.send(conn.recv() + 1)
    # The other way: a queue made here, used after we are gone.
    mine = ringpool.Queue()
    reply.put(mine)
    for i in range(5):
        mine.put(i)
    reply.put("done")


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_ringpool_queue_inside_ringpool_queue(method):
    q = ringpool.Queue()
    inner, jq, sq = ringpool.Queue(), ringpool.JoinableQueue(), ringpool.SimpleQueue()
    a, b = ringpool.Pipe()
    with child(method, _child_ringpool_in_ringpool, q) as (p, reply):
        sq.put(21)
        q.put((inner, jq, sq, b))
        assert inner.get(timeout=DEADLINE) == ("via inner", p.pid)
        for i in range(3):
            jq.put(i)
        jq.join()
        a.send(99)
        assert a.poll(DEADLINE)
        assert a.recv() == 100
        mine = recv(reply, p)
        assert recv(reply, p) == "done"
        assert sq.get() == 42
    assert [mine.get(timeout=10) for _ in range(5)] == list(range(5))
    mine.put("still usable")
    assert mine.get(timeout=10) == "still usable"


# -- the sender exits right after put -----------------------------------------------------------

def _child_put_and_exit(reply):
    r, w = os.pipe()
    os.write(w, b"pipe of a dead process")
    os.close(w)
    reply.put({
        "tensors": [torch.arange(i, i + 1000, dtype=torch.float32) for i in range(20)],
        "big_tensor": torch.full((1 << 20,), 2.5),  # 4 MiB
        "array": np.arange(1 << 22, dtype=np.float32),  # 16 MiB, out of band
        "fd": FdBox(r),
    })
    os.close(r)
    # and return at once: the process exits


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_sender_exits_right_after_put(method):
    with child(method, _child_put_and_exit) as (p, reply):
        p.join(DEADLINE)
        assert p.exitcode == 0
        item = recv(reply, p, timeout=30)
    for i, t in enumerate(item["tensors"]):
        assert torch.equal(t, torch.arange(i, i + 1000, dtype=torch.float32)), i
    assert torch.equal(item["big_tensor"], torch.full((1 << 20,), 2.5))
    item["big_tensor"][0] = 1.0  # still mapped and writable
    assert item["big_tensor"][0].item() == 1.0
    a = item["array"]
    assert a.dtype == np.float32 and a.shape == (1 << 22,)
    assert np.array_equal(a, np.arange(1 << 22, dtype=np.float32))
    try:
        assert read_until_eof(item["fd"].fd) == b"pipe of a dead process"
    finally:
        os.close(item["fd"].fd)


# -- no descriptor leak -------------------------------------------------------------------------

@pytest.mark.timeout(TEST_TIMEOUT)
def test_no_fd_leak_over_1000_messages():
    q = ringpool.Queue()
    r, w = os.pipe()
    s1, s2 = socket.socketpair()
    a, b = mp.Pipe()
    tensor = torch.arange(16.0)
    try:
        def one_each():
            q.put(FdBox(w))
            box = q.get(timeout=10)
            assert box.fd != w
            os.close(box.fd)

        for _ in range(20):  # warm up: lazily allocated state is not a leak
            one_each()
        q.put(tensor)
        q.get(timeout=10)
        gc.collect()
        before = fd_count()

        for _ in range(1000):
            one_each()
        # Many descriptors in flight at once.
        for _ in range(4):
            for _ in range(100):
                q.put(FdBox(w))
            for _ in range(100):
                os.close(q.get(timeout=10).fd)
        # Tokens the receiver never detaches: ringpool closes them.
        for _ in range(200):
            q.put(Unclaimed(w))
            assert q.get(timeout=10) == "unclaimed"
        # Sockets, Connections, tensors: closed or dropped by the receiver.
        for _ in range(100):
            q.put(s2)
            q.get(timeout=10).close()
            q.put(b)
            q.get(timeout=10).close()
            q.put(tensor)
            t = q.get(timeout=10)
            assert torch.equal(t, tensor)
            del t
        with pytest.raises(queue.Empty):
            q.get(timeout=0.05)
        gc.collect()
        after = fd_count()
        assert after <= before + 5, f"descriptors: {before} before, {after} after"
        assert os.fstat(w) and os.fstat(s2.fileno()) and os.fstat(b.fileno())  # borrowed, not taken
    finally:
        os.close(r)
        os.close(w)
        s1.close()
        s2.close()
        a.close()
        b.close()


# -- large numpy arrays -------------------------------------------------------------------------

N_BIG = 4 << 20  # 16 MiB of float32


def _expected_arrays():
    return {
        "big": np.arange(N_BIG, dtype=np.float32),
        "random": np.random.default_rng(7).standard_normal((2048, 2048), dtype=np.float32),
        "fortran": np.asfortranarray(np.arange(512 * 1024, dtype=np.float64).reshape(512, 1024)),
        "strided": np.arange(3 * 100_000, dtype=np.int32)[::3],  # not contiguous: copied in band
        "small": np.arange(100, dtype=np.uint8),
    }


def _check_arrays(got, want, plus):
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert isinstance(g, np.ndarray), k
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, g.shape)
        assert g.flags.writeable, k
        assert np.array_equal(g, w + plus), k
    assert got["fortran"].flags.f_contiguous


def _child_numpy(reply, q):
    got = q.get(timeout=DEADLINE)
    _check_arrays(got, _expected_arrays(), 0)
    for a in got.values():
        a += 1  # received arrays are writable
    reply.put(got)  # arrays over received memory travel on
    reply.put("done")


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_large_numpy_arrays_roundtrip(method):
    q = ringpool.Queue()
    want = _expected_arrays()
    with child(method, _child_numpy, q) as (p, reply):
        q.put(_expected_arrays())
        back = recv(reply, p)
        assert recv(reply, p) == "done"
    _check_arrays(back, want, 1)
    back["big"][:] = 0  # writable on this side too
    assert not back["big"].any()


# -- a put whose pickling fails must not affect the next put ------------------------------------

def _in_fresh_thread(fn):
    """Run fn in a new thread (ringpool's pickler state is per thread, so whatever a failure
    leaves behind dies with it) and re-raise its exception here."""
    import threading

    err = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            err.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "stuck"
    if err:
        raise err[0]


@pytest.mark.timeout(TEST_TIMEOUT)
def test_failed_pickling_leaves_no_descriptors_for_the_next_put():
    def body():
        q = ringpool.Queue()
        r, w = os.pipe()
        with pytest.raises(Exception):
            q.put([FdBox(w), threading.Lock()])  # locks do not pickle
        os.close(r)
        os.close(w)
        q.put("plain")  # carries nothing: must not touch the closed descriptor
        assert q.get(timeout=10) == "plain"

    _in_fresh_thread(body)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_failed_pickling_leaves_no_buffers_for_the_next_put():
    def body():
        q = ringpool.Queue()
        zeros = np.zeros(1 << 16, dtype=np.float32)  # 256 KiB: out of band
        ones = np.ones(1 << 16, dtype=np.float32)
        with pytest.raises(Exception):
            q.put([zeros, threading.Lock()])
        q.put(ones)
        got = q.get(timeout=10)
        assert np.array_equal(got, ones), f"sent ones, received {got[:4]}..."

    _in_fresh_thread(body)
