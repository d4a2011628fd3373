#!/usr/bin/python3
"""Transport benchmark: ringpool against the stdlib's multiprocessing, in one run.

What is measured (every transport goes through the same ``Transport`` interface and the same
child-process roles, so the only difference between two rows is the transport):

1. Small messages: the tuple ``(123456, 3.14, 'abcdefgh' * 4)`` (about 63 B pickled), 1->1 (one
   producer process, one consumer process) and 4->1 (four producers, one consumer), in msgs/s.
   ringpool's Queue is also run with ``put_many``/``get_many`` batches. Producers send a warm-up
   share first, which the consumer drains; then every process meets at a barrier. The window
   runs from the first process leaving the barrier to the consumer's last receive
   (``perf_counter`` is CLOCK_MONOTONIC, one clock for all processes). The consumer must receive
   exactly producers * N messages (blocking receives; a deadline turns a lost message into a
   failed row), and nothing more (a short poll afterwards).
2. numpy float32 arrays of 1, 16 and 64 MiB, 1->1, in GB/s (10^9 payload bytes per second). Each
   message is ``(seq, array)``; the consumer checks seq, shape, dtype and two sample elements,
   then drops the array before the next receive (so ringpool's shared-memory blocks recycle).
   Warm-up messages run before the barrier (the first ones allocate and fault shared memory);
   the window is measured as for small messages.
3. Ping-pong round-trip latency between two processes (median and p99, microseconds), a 1-byte
   payload (pickled ``b'x'`` for send/recv, raw for send_bytes and os.pipe). Every round trip is
   timed on its own with ``perf_counter_ns``.
4. Limits, measured in the same run: in-process ``pickle.loads(pickle.dumps(msg, 5))`` of the
   small tuple (msgs/s), and single-thread memcpy bandwidth (``np.copyto`` between two
   pre-faulted 64 MiB arrays, GB/s).

Every row is the median of 3 runs (1 with --quick), each with fresh processes and a fresh
transport; the runs of a section are interleaved (run 1 of every row, then run 2, ...) so that the
drift of a shared machine touches every row alike. The JSON keeps every run. Each row also shows
how much CPU the benchmark did not get meanwhile ("other load": other processes plus hypervisor
steal, from /proc/stat), because on a small shared VM that decides more than anything else. The
ratio section checks the targets (PASS/FAIL). Processes use the "fork" start method. Every child
runs under a deadline (SIGALRM in the child, join/terminate/kill in the parent): a hang, an
exception or a wrong count marks that row failed and the run goes on.

Run (from the repository root; the extension must be built in bindings/ringpool):

    /usr/bin/python3 benchmarks/bench_transport.py            # about 1.5-3 minutes
    /usr/bin/python3 benchmarks/bench_transport.py --quick    # smoke test, well under a minute
    ... [--json PATH] [--markdown PATH]

The Markdown report goes to stdout (and to --markdown PATH), progress to stderr, and the JSON to
--json PATH (default: benchmarks/results/bench_transport[-quick].json).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
try:
    import ringpool
except ImportError:  # run from a checkout without PYTHONPATH: use the in-tree package
    sys.path.insert(0, str(HERE.parent / "bindings"))
    import ringpool

sys.path.insert(0, str(HERE))
import _machine  # noqa: E402

CTX = multiprocessing.get_context("fork")

SMALL_MSG = (123456, 3.14, "abcdefgh" * 4)
PING = b"x"
ARRAY_FILL, ARRAY_LAST = np.float32(1.5), np.float32(7.0)
MiB = 1 << 20


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    reps: int               # runs of each row (the median is reported)
    small_msgs: int         # small messages per run, all producers together (scaled per transport)
    batch: int              # put_many/get_many batch size
    array_bytes: int        # payload bytes per array run (messages = array_bytes // size, scaled)
    array_min_msgs: int     # ... but at least this many messages per run
    array_warmup: int       # warm-up messages per array run
    pingpong_rounds: int    # timed round trips per run
    pingpong_warmup: int
    budget: float           # seconds before a scenario's processes are declared hung
    pickle_iters: int
    memcpy_iters: int


DEFAULT = Config(reps=3, small_msgs=150_000, batch=256, array_bytes=1024 * MiB, array_min_msgs=4,
                 array_warmup=4, pingpong_rounds=10_000, pingpong_warmup=1_000, budget=45.0,
                 pickle_iters=300_000, memcpy_iters=20)
QUICK = Config(reps=1, small_msgs=30_000, batch=256, array_bytes=128 * MiB, array_min_msgs=2,
               array_warmup=2, pingpong_rounds=2_000, pingpong_warmup=200, budget=15.0,
               pickle_iters=50_000, memcpy_iters=5)

ARRAY_SIZES = (1 * MiB, 16 * MiB, 64 * MiB)


# --------------------------------------------------------------------------------------------
# Transports: one interface, one class per way of moving objects between processes
# --------------------------------------------------------------------------------------------
class Endpoint:
    """One end of a one-way channel (or of a duplex link), as bound methods.

    Bound methods of the real objects, not wrappers, so no transport pays for an extra call
    (except os.pipe's send, a lambda, in a scenario measured in microseconds).
    """

    __slots__ = ("send", "recv", "send_many", "recv_many", "poll")

    def __init__(self, send=None, recv=None, send_many=None, recv_many=None, poll=None):
        self.send = send            # send(obj)
        self.recv = recv            # recv() -> obj, blocking
        self.send_many = send_many  # send_many(list of objs), batched transports only
        self.recv_many = recv_many  # recv_many(max) -> list of 1..max objs, batched only
        self.poll = poll            # poll(timeout) -> whether a message is waiting


class Transport:
    """A way to move Python objects between processes created with fork.

    ``channel()`` returns (tx, rx) endpoints of a one-way channel; ``duplex()`` returns two
    endpoints that each send to and receive from the other. ``close()`` releases what the parent
    holds. Children inherit the endpoints through fork.
    """

    name = "?"
    family = "?"           # "ringpool", "stdlib" or "os"
    one_channel = False    # a queue: duplex() is a pair of them
    multi_producer = True  # may several processes send on one channel?
    batch = 0              # > 0: producers use send_many, the consumer recv_many(batch)
    count_scale = 1.0      # message counts relative to the Config (slow transports send fewer,
    array_scale = 1.0      # so every run takes about a second)

    def __init__(self):
        self._closers = []

    def channel(self):
        raise NotImplementedError

    @property
    def pair_name(self):
        return f"{self.name} pair" if self.one_channel else self.name

    def duplex(self):
        a_tx, b_rx = self.channel()
        b_tx, a_rx = self.channel()
        return (Endpoint(send=a_tx.send, recv=a_rx.recv), Endpoint(send=b_tx.send, recv=b_rx.recv))

    def close(self):
        for close in reversed(self._closers):
            try:
                close()
            except Exception:
                pass
        self._closers.clear()


def _poll_by_get(q):
    """poll() for queues without one: a timed get (only used after the measured window)."""
    def poll(timeout):
        try:
            q.get(timeout=timeout)
        except queue.Empty:
            return False
        return True
    return poll


def _queue_endpoints(q, batched=False):
    ep = Endpoint(send=q.put, recv=q.get, poll=_poll_by_get(q))
    if batched:
        ep.send_many, ep.recv_many = q.put_many, q.get_many
    return ep, ep


def _simple_queue_endpoints(q):
    ep = Endpoint(send=q.put, recv=q.get, poll=q._reader.poll)
    return ep, ep


def _pipe_endpoints(reader, writer, raw):
    if raw:
        return Endpoint(send=writer.send_bytes), Endpoint(recv=reader.recv_bytes, poll=reader.poll)
    return Endpoint(send=writer.send), Endpoint(recv=reader.recv, poll=reader.poll)


def _duplex_pipe_endpoints(c1, c2, raw):
    if raw:
        return Endpoint(send=c1.send_bytes, recv=c1.recv_bytes), Endpoint(send=c2.send_bytes, recv=c2.recv_bytes)
    return Endpoint(send=c1.send, recv=c1.recv), Endpoint(send=c2.send, recv=c2.recv)


class RingpoolQueue(Transport):
    family, one_channel = "ringpool", True

    def __init__(self, batch=0):
        super().__init__()
        self.batch = batch
        self.name = f"ringpool.Queue put_many/get_many({batch})" if batch else "ringpool.Queue"
        self.count_scale = 2.0 if batch else 1.0

    def channel(self):
        q = ringpool.Queue()
        self._closers.append(q.close)
        return _queue_endpoints(q, batched=bool(self.batch))


class RingpoolSimpleQueue(Transport):
    name, family, one_channel = "ringpool.SimpleQueue", "ringpool", True

    def channel(self):
        q = ringpool.SimpleQueue()
        self._closers.append(q.close)
        return _simple_queue_endpoints(q)


class RingpoolPipe(Transport):
    family, multi_producer = "ringpool", False

    def __init__(self, raw=False):
        super().__init__()
        self.raw = raw
        self.name = "ringpool.Pipe send_bytes" if raw else "ringpool.Pipe"

    def channel(self):
        reader, writer = ringpool.Pipe(duplex=False)
        self._closers += [reader.close, writer.close]
        return _pipe_endpoints(reader, writer, self.raw)

    def duplex(self):
        c1, c2 = ringpool.Pipe(duplex=True)
        self._closers += [c1.close, c2.close]
        return _duplex_pipe_endpoints(c1, c2, self.raw)


class StdlibQueue(Transport):
    name, family, one_channel = "mp.Queue", "stdlib", True
    count_scale, array_scale = 0.4, 0.25

    def channel(self):
        q = CTX.Queue()
        self._closers.append(q.close)
        return _queue_endpoints(q)


class StdlibSimpleQueue(Transport):
    name, family, one_channel = "mp.SimpleQueue", "stdlib", True
    count_scale, array_scale = 0.4, 0.25

    def channel(self):
        q = CTX.SimpleQueue()
        self._closers.append(q.close)
        return _simple_queue_endpoints(q)


class StdlibPipe(Transport):
    family, multi_producer, count_scale, array_scale = "stdlib", False, 0.5, 0.25

    def __init__(self, raw=False):
        super().__init__()
        self.raw = raw
        self.name = "mp.Pipe send_bytes" if raw else "mp.Pipe"

    def channel(self):
        reader, writer = CTX.Pipe(duplex=False)
        self._closers += [reader.close, writer.close]
        return _pipe_endpoints(reader, writer, self.raw)

    def duplex(self):
        c1, c2 = CTX.Pipe(duplex=True)
        self._closers += [c1.close, c2.close]
        return _duplex_pipe_endpoints(c1, c2, self.raw)


class OsPipe(Transport):
    """Two raw os.pipe()s moving one byte each way: the kernel's wake-up cost, no pickling."""

    name, family, multi_producer = "os.pipe 1 B (baseline)", "os", False

    def channel(self):
        r, w = os.pipe()
        self._closers += [functools.partial(os.close, r), functools.partial(os.close, w)]
        # send ignores its argument's value: it always writes PING (one byte).
        return Endpoint(send=lambda _obj, w=w: os.write(w, PING)), Endpoint(recv=functools.partial(os.read, r, 1))


def small_transports(cfg):
    return [RingpoolQueue(), RingpoolQueue(batch=cfg.batch), RingpoolSimpleQueue(), RingpoolPipe(),
            StdlibQueue(), StdlibSimpleQueue(), StdlibPipe()]


def array_transports():
    return [RingpoolQueue(), RingpoolPipe(), StdlibQueue(), StdlibPipe()]


def pingpong_transports():
    return [RingpoolPipe(), RingpoolPipe(raw=True), RingpoolQueue(), RingpoolSimpleQueue(),
            StdlibPipe(), StdlibPipe(raw=True), StdlibQueue(), OsPipe()]


# --------------------------------------------------------------------------------------------
# Child-process harness: deadlines, reports, cleanup
# --------------------------------------------------------------------------------------------
class Deadline(Exception):
    """Raised in a child (from SIGALRM) when its scenario's budget is spent."""


class ScenarioFailed(Exception):
    pass


def _on_alarm(signum, frame):
    raise Deadline("deadline reached")


def _child_main(report, role, args, budget):
    """Runs one role in a child process and sends ('ok', value) or ('error', text) to the parent."""
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        value = role(*args)
        signal.setitimer(signal.ITIMER_REAL, 0)
        report.send(("ok", value))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        signal.setitimer(signal.ITIMER_REAL, 0)
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        report.send(("error", f"{type(e).__name__}: {e}{where}"))
    finally:
        report.close()


def _machine_busy_seconds():
    """CPU seconds since boot that no process of ours could use: all processes' busy time plus the
    hypervisor's steal time (this VM's vCPUs waiting for a physical core)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _own_busy_seconds():
    """CPU seconds of this process and its reaped children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclasses.dataclass
class Run:
    values: list        # what each role returned, in order
    other_cores: float  # average CPU the benchmark did not get meanwhile: other processes + steal


def run_roles(roles, budget):
    """Starts one child per (name, role, args), waits for every report, reaps every child.

    Returns a Run. Raises ScenarioFailed (after terminating every child) if a child reports an
    error, dies without reporting, or the budget runs out.
    """
    procs, readers, errors = [], {}, []
    values = [None] * len(roles)
    t0, busy0, own0 = time.monotonic(), _machine_busy_seconds(), _own_busy_seconds()
    try:
        for i, (name, role, args) in enumerate(roles):
            r, w = CTX.Pipe(duplex=False)
            p = CTX.Process(target=_child_main, args=(w, role, args, budget), name=name, daemon=True)
            p.start()
            w.close()
            procs.append(p)
            readers[r] = i
        deadline = time.monotonic() + budget + 5.0  # children fail themselves first (SIGALRM)
        while readers:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for r in multiprocessing.connection.wait(list(readers), left):
                i = readers.pop(r)
                try:
                    status, value = r.recv()
                except EOFError:
                    procs[i].join(1.0)
                    status, value = "error", f"died without a report (exit code {procs[i].exitcode})"
                r.close()
                if status == "ok":
                    values[i] = value
                else:
                    errors.append(f"{roles[i][0]}: {value}")
        for r, i in readers.items():
            errors.append(f"{roles[i][0]}: no report within {budget:.0f} s (hung)")
            r.close()
        for p in procs:  # normal exit: stdlib queues flush their feeder threads here
            p.join(0.5 if errors else max(0.5, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                errors.append(f"{p.name}: did not exit after reporting, terminated")
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()
            if p.exitcode not in (0, -signal.SIGTERM, -signal.SIGKILL) and not errors:
                errors.append(f"{p.name}: exit code {p.exitcode}")
    if errors:
        raise ScenarioFailed("; ".join(errors))
    wall = time.monotonic() - t0
    other = max(0.0, (_machine_busy_seconds() - busy0) - (_own_busy_seconds() - own0)) / wall
    return Run(values, other)


# --------------------------------------------------------------------------------------------
# Roles (run in child processes). Clocks: time.perf_counter is CLOCK_MONOTONIC, one clock for
# every process, so a window can start in one process and end in another.
# --------------------------------------------------------------------------------------------
def _receive_exactly(ep, n, batch):
    """Blocking receives of exactly n messages; returns (received, first, last)."""
    got, first, last = 0, None, None
    try:
        if batch:
            recv_many = ep.recv_many
            while got < n:
                items = recv_many(min(batch, n - got))
                if first is None:
                    first = items[0]
                got += len(items)
                last = items[-1]
        else:
            recv = ep.recv
            if n:
                first = last = recv()
                got = 1
            for _ in range(n - got):
                last = recv()
                got += 1
    except Deadline:
        raise Deadline(f"deadline reached after {got} of {n} messages") from None
    return got, first, last


def _send_n(ep, n, batch):
    if batch:
        chunk, send_many = [SMALL_MSG] * batch, ep.send_many
        for _ in range(n // batch):
            send_many(chunk)
    else:
        send, msg = ep.send, SMALL_MSG
        for _ in range(n):
            send(msg)


def small_producer(tx, n, warmup, batch, barrier, budget):
    _send_n(tx, warmup, batch)
    barrier.wait(budget)
    start = time.perf_counter()
    _send_n(tx, n, batch)
    return start


def small_consumer(rx, n, warmup, batch, barrier, budget):
    _receive_exactly(rx, warmup, batch)
    barrier.wait(budget)
    start = time.perf_counter()
    got, first, last = _receive_exactly(rx, n, batch)
    end = time.perf_counter()
    if got != n:
        raise ScenarioFailed(f"received {got} messages, expected {n}")
    if first != SMALL_MSG or last != SMALL_MSG:
        raise ScenarioFailed(f"corrupted message: first={first!r} last={last!r}")
    if rx.poll(0.05):
        raise ScenarioFailed(f"more than the {n} messages sent arrived")
    return start, end


def _make_array(nbytes):
    a = np.full(nbytes // 4, ARRAY_FILL, dtype=np.float32)  # also faults the pages in
    a[-1] = ARRAY_LAST
    return a


def array_producer(tx, nbytes, n, warmup, barrier, budget):
    a, send = _make_array(nbytes), tx.send
    for seq in range(warmup):
        send((seq, a))
    barrier.wait(budget)
    start = time.perf_counter()
    for seq in range(warmup, warmup + n):
        send((seq, a))
    return start


def _check_array(item, seq, nelem):
    got_seq, x = item
    if got_seq != seq:
        raise ScenarioFailed(f"array message {got_seq} arrived, expected {seq} (lost or reordered)")
    if x.dtype != np.float32 or x.shape != (nelem,) or x[0] != ARRAY_FILL or x[-1] != ARRAY_LAST:
        raise ScenarioFailed(f"array {seq} corrupted: dtype={x.dtype} shape={x.shape} "
                             f"x[0]={x[0]} x[-1]={x[-1]}")


def array_consumer(rx, nbytes, n, warmup, barrier, budget):
    recv, nelem = rx.recv, nbytes // 4
    for seq in range(warmup):
        item = recv()
        _check_array(item, seq, nelem)
        del item  # release the shared-memory block before the next receive
    barrier.wait(budget)
    start = time.perf_counter()
    seq = warmup
    try:
        for seq in range(warmup, warmup + n):
            item = recv()
            _check_array(item, seq, nelem)
            del item
    except Deadline:
        raise Deadline(f"deadline reached after {seq - warmup} of {n} arrays") from None
    end = time.perf_counter()
    if rx.poll(0.05):
        raise ScenarioFailed(f"more than the {n + warmup} arrays sent arrived")
    return start, end


def pinger(ep, rounds, warmup, barrier, budget):
    send, recv = ep.send, ep.recv
    reply = PING
    for _ in range(warmup):
        send(PING)
        reply = recv()
    if reply != PING:
        raise ScenarioFailed(f"echo returned {reply!r}")
    barrier.wait(budget)
    clock = time.perf_counter_ns
    samples = [0] * rounds
    i = 0
    try:
        for i in range(rounds):
            t = clock()
            send(PING)
            recv()
            samples[i] = clock() - t
    except Deadline:
        raise Deadline(f"deadline reached after {i} of {rounds} round trips") from None
    return samples


def ponger(ep, rounds, warmup, barrier, budget):
    send, recv = ep.send, ep.recv
    for _ in range(warmup):
        send(recv())
    barrier.wait(budget)
    for _ in range(rounds):
        send(recv())


# --------------------------------------------------------------------------------------------
# Scenarios (run in the parent): one run = fresh transport, fresh processes
# --------------------------------------------------------------------------------------------
def _round_to(n, k):
    return max(k, n // k * k)


def _window(run):
    """Seconds from the first process leaving the start barrier to the consumer's last receive."""
    consumer, *producers = run.values
    return consumer[1] - min([consumer[0], *producers])


def small_run(transport, producers, cfg):
    """One run of the small-message scenario: msgs/s."""
    batch = transport.batch
    unit = batch or 1
    per_producer = _round_to(int(cfg.small_msgs * transport.count_scale) // producers, unit)
    warmup = _round_to(per_producer // 20, unit)
    total = per_producer * producers
    tx, rx = transport.channel()
    barrier = CTX.Barrier(producers + 1)
    try:
        roles = [("consumer", small_consumer, (rx, total, warmup * producers, batch, barrier, cfg.budget))]
        roles += [(f"producer-{i}", small_producer, (tx, per_producer, warmup, batch, barrier, cfg.budget))
                  for i in range(producers)]
        run = run_roles(roles, cfg.budget)
    finally:
        transport.close()
    seconds = _window(run)
    return {"value": total / seconds, "messages": total, "seconds": seconds, "other_cores": run.other_cores}


def array_run(transport, nbytes, cfg):
    """One run of the array scenario: GB/s of array payload."""
    n = max(cfg.array_min_msgs, int(cfg.array_bytes * transport.array_scale) // nbytes)
    tx, rx = transport.channel()
    barrier = CTX.Barrier(2)
    try:
        run = run_roles([("consumer", array_consumer, (rx, nbytes, n, cfg.array_warmup, barrier, cfg.budget)),
                         ("producer", array_producer, (tx, nbytes, n, cfg.array_warmup, barrier, cfg.budget))],
                        cfg.budget)
    finally:
        transport.close()
    seconds = _window(run)
    return {"value": n * nbytes / seconds / 1e9, "messages": n, "seconds": seconds, "other_cores": run.other_cores}


def pingpong_run(transport, cfg):
    """One ping-pong run: round-trip statistics in microseconds."""
    a, b = transport.duplex()
    barrier = CTX.Barrier(2)
    try:
        run = run_roles([("pinger", pinger, (a, cfg.pingpong_rounds, cfg.pingpong_warmup, barrier, cfg.budget)),
                         ("ponger", ponger, (b, cfg.pingpong_rounds, cfg.pingpong_warmup, barrier, cfg.budget))],
                        cfg.budget)
    finally:
        transport.close()
    us = np.array(run.values[0], dtype=np.float64) / 1e3
    return {"value": float(np.median(us)), "p99_us": float(np.percentile(us, 99)), "min_us": float(us.min()),
            "messages": len(us), "seconds": float(us.sum()) / 1e6, "other_cores": run.other_cores}


@dataclasses.dataclass
class Case:
    """One row of a section: a transport in one configuration, measured reps times."""
    label: str
    run: object  # () -> {"value", "messages", "seconds", "other_cores", ...}
    row: dict    # what identifies the row in the report (transport, pattern, size...)


def sweep(cases, reps, unit):
    """Runs every case reps times, interleaved (rep 1 of every case, then rep 2, ...) so that a
    slow drift of the machine touches every row alike. Returns one row per case: the median of
    the runs' values with min/max, or the error of the first failed run (no more runs then)."""
    runs = {id(c): [] for c in cases}
    errors = {}
    for rep in range(reps):
        for c in cases:
            if id(c) in errors:
                continue
            try:
                r = c.run()
            except ScenarioFailed as e:
                errors[id(c)] = str(e)
                log(f"  {c.label}: run {rep + 1}/{reps} FAILED: {e}")
                continue
            runs[id(c)].append(r)
            log(f"  {c.label}: run {rep + 1}/{reps}: {r['value']:,.3f} {unit} "
                f"({r['messages']} msgs, {r['seconds']:.3f} s; other load {r['other_cores']:.2f} cores)")
            gc.collect()
    rows = []
    for c in cases:
        rs = runs[id(c)]
        if id(c) in errors:
            rows.append(dict(c.row, error=errors[id(c)], runs=rs))
            continue
        values = [r["value"] for r in rs]
        rows.append(dict(c.row, median=statistics.median(values), min=min(values), max=max(values),
                         messages=rs[0]["messages"], other_cores=max(r["other_cores"] for r in rs), runs=rs))
    return rows


def measure_pickle_rate(cfg, reps):
    dumps, loads, msg, proto = pickle.dumps, pickle.loads, SMALL_MSG, pickle.HIGHEST_PROTOCOL
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(cfg.pickle_iters):
            loads(dumps(msg, proto))
        rates.append(cfg.pickle_iters / (time.perf_counter() - t0))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "pickled_bytes": len(pickle.dumps(msg, proto)), "iters": cfg.pickle_iters}


def measure_memcpy(cfg, reps):
    src = np.full(64 * MiB // 4, 1.0, dtype=np.float32)
    dst = np.zeros_like(src)
    np.copyto(dst, src)  # fault in and warm up
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(cfg.memcpy_iters):
            np.copyto(dst, src)
        rates.append(cfg.memcpy_iters * src.nbytes / (time.perf_counter() - t0) / 1e9)
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "bytes": src.nbytes}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def log(msg):
    print(msg, file=sys.stderr, flush=True)


def machine_info():
    return {
        **_machine.machine_info(),
        "numpy": np.__version__,
        "ringpool": getattr(ringpool, "__version__", "?"),
        "ringpool_path": str(Path(ringpool.__file__).parent),
        "start_method": CTX.get_start_method(),
    }


def _find(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _ok(row):
    return row is not None and "error" not in row


def evaluate_targets(res):
    """The ratio targets, each {target, measured, threshold, passed}."""
    small, arrays, lat, lim = res["small"], res["arrays"], res["latency"], res["limits"]
    out = []

    def add(desc, num, den, threshold, label, fmt="{:.2f}x", higher_is_better=True):
        if num is None or den is None:
            out.append({"target": desc, "measured": "n/a (scenario failed)", "threshold": label, "passed": False})
            return
        ratio = num / den
        passed = ratio >= threshold if higher_is_better else ratio <= threshold
        out.append({"target": desc, "measured": fmt.format(ratio), "value": ratio, "threshold": label, "passed": passed})

    def median(row):
        return row["median"] if _ok(row) else None

    rq = median(_find(small, transport="ringpool.Queue", pattern="1->1"))
    add("small 1->1: ringpool.Queue / mp.Queue", rq, median(_find(small, transport="mp.Queue", pattern="1->1")),
        6.0, ">= 6x")
    add("small 1->1: ringpool.Queue / in-process pickle rate", rq, lim["pickle"]["median"], 0.40, ">= 40%", "{:.1%}")
    batched = _find(small, family="ringpool", pattern="4->1", batch=res["config"]["batch"])
    add(f"small 4->1: {batched['transport'] if batched else 'ringpool batched'}, msgs/s", median(batched), 1.0,
        1.5e6, ">= 1,500,000", "{:,.0f}")
    for name in ("ringpool.Queue", "ringpool.Pipe"):
        add(f"16 MiB arrays: {name} / memcpy", median(_find(arrays, transport=name, size_mib=16)),
            lim["memcpy"]["median"], 0.25, ">= 25%", "{:.1%}")
    base = median(_find(lat, family="os"))
    for name in ("ringpool.Pipe", "ringpool.Queue pair"):
        add(f"ping-pong median: {name} / os.pipe", median(_find(lat, transport=name)), base,
            0.5, "<= 0.5x", higher_is_better=False)
    return out


def _spread(row, fmt):
    return f"{fmt.format(row['min'])}–{fmt.format(row['max'])}" if len(row.get("runs", ())) > 1 else "–"


def _table(header, aligns, rows):
    return ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"] + \
           ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def render_markdown(res):
    m, cfg, lim = res["machine"], res["config"], res["limits"]
    out = ["# ringpool transport benchmark", ""]
    out += _table(["machine", ""], ["---", "---"], [
        ["CPU", m["cpu"]],
        ["cores", f"{m['cores']} ({m['usable_cores']} usable)"],
        ["memory", f"{m['memory_gib']} GiB"],
        ["kernel", m["kernel"]],
        ["Python / numpy", f"{m['python']} / {m['numpy']}"],
        ["ringpool", f"{m['ringpool']} ({m['ringpool_path']})"],
        ["date", m["date"]],
        ["load average at start / end", " ".join(f"{x:.2f}" for x in m["loadavg_at_start"]) + " / "
         + " ".join(f"{x:.2f}" for x in res["loadavg_at_end"])],
        ["mode", f"{res['mode']}: median of {cfg['reps']} run(s) per row, start method {m['start_method']}"],
    ])

    out += ["## Limits (in-process, same run)", ""]
    out += _table(["limit", "value", "spread"], ["---", "---:", "---"], [
        [f"pickle.dumps+loads of the tuple ({lim['pickle']['pickled_bytes']} B)",
         f"{lim['pickle']['median']:,.0f} msgs/s", _spread(lim["pickle"], "{:,.0f}")],
        ["memcpy, np.copyto 64 MiB", f"{lim['memcpy']['median']:.2f} GB/s", _spread(lim["memcpy"], "{:.2f}")],
    ])

    def failed(row, ncols):
        return [row["transport"], *row["key"], f"FAILED: {row['error']}"] + ["–"] * ncols

    rows = []
    for r in res["small"]:
        r["key"] = [r["pattern"]]
        if not _ok(r):
            rows.append(failed(r, 5))
            continue
        ref = _find(res["small"], transport="mp.Queue", pattern=r["pattern"])
        rows.append([r["transport"], r["pattern"], f"{r['messages']:,}", f"{r['median']:,.0f}",
                     _spread(r, "{:,.0f}"), f"{r['median'] / ref['median']:.2f}" if _ok(ref) else "–",
                     f"{r['median'] / lim['pickle']['median']:.0%}", f"{r['other_cores']:.2f}"])
    out += [f"## Small messages: {SMALL_MSG!r}, msgs/s", ""]
    out += _table(["transport", "pattern", "messages", "msgs/s", "spread", "× mp.Queue", "% pickle rate", "other load"],
                  ["---", "---", "---:", "---:", "---", "---:", "---:", "---:"], rows)

    rows = []
    for r in res["arrays"]:
        r["key"] = [f"{r['size_mib']} MiB"]
        if not _ok(r):
            rows.append(failed(r, 5))
            continue
        ref = _find(res["arrays"], transport="mp.Queue", size_mib=r["size_mib"])
        rows.append([r["transport"], f"{r['size_mib']} MiB", r["messages"], f"{r['median']:.2f}",
                     _spread(r, "{:.2f}"), f"{r['median'] / ref['median']:.1f}" if _ok(ref) else "–",
                     f"{r['median'] / lim['memcpy']['median']:.0%}", f"{r['other_cores']:.2f}"])
    out += ["## numpy float32 arrays, 1->1, GB/s", ""]
    out += _table(["transport", "size", "messages", "GB/s", "spread", "× mp.Queue", "% memcpy", "other load"],
                  ["---", "---:", "---:", "---:", "---", "---:", "---:", "---:"], rows)

    rows = []
    base = _find(res["latency"], family="os")
    for r in res["latency"]:
        r["key"] = []
        if not _ok(r):
            rows.append(failed(r, 5))
            continue
        rows.append([r["transport"], f"{r['messages']:,}", f"{r['median']:.1f}", _spread(r, "{:.1f}"),
                     f"{r['p99_us']:.1f}", f"{r['median'] / base['median']:.2f}" if _ok(base) else "–",
                     f"{r['other_cores']:.2f}"])
    out += ["## Ping-pong round trip, 1-byte payload, µs", ""]
    out += _table(["transport", "round trips", "median µs", "spread", "p99 µs", "× os.pipe median", "other load"],
                  ["---", "---:", "---:", "---", "---:", "---:", "---:"], rows)

    out += ["## Targets", ""]
    out += _table(["target", "measured", "threshold", "result"], ["---", "---:", "---", "---"],
                  [[t["target"], t["measured"], t["threshold"], "PASS" if t["passed"] else "FAIL"] for t in res["targets"]])
    if res["failures"]:
        out += ["## Failed scenarios", ""] + [f"- {f}" for f in res["failures"]] + [""]
    out.append(f"\"other load\": CPU cores the benchmark did not get during the row's runs (worst run): "
               f"other processes' CPU time plus hypervisor steal. Above ~0.2 the row competed for the "
               f"{m['usable_cores']} cores. Total wall time: {res['wall_seconds']:.0f} s.")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts, 1 repetition: a smoke test")
    ap.add_argument("--json", type=Path, help="where to write the JSON results")
    ap.add_argument("--markdown", type=Path, help="also write the Markdown report here")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else DEFAULT
    json_path = args.json or HERE / "results" / f"bench_transport{'-quick' if args.quick else ''}.json"

    t_start = time.monotonic()
    res = {"mode": "quick" if args.quick else "default", "config": dataclasses.asdict(cfg),
           "machine": machine_info(), "small": [], "arrays": [], "latency": [], "failures": []}

    log("limits: in-process pickle round trip and memcpy")
    res["limits"] = {"pickle": measure_pickle_rate(cfg, cfg.reps), "memcpy": measure_memcpy(cfg, cfg.reps)}
    log(f"  pickle {res['limits']['pickle']['median']:,.0f} msgs/s, memcpy {res['limits']['memcpy']['median']:.2f} GB/s")

    for producers in (1, 4):
        pattern = f"{producers}->1"
        log(f"small messages {pattern}")
        res["small"] += sweep([Case(f"{t.name} {pattern}", functools.partial(small_run, t, producers, cfg),
                                    {"transport": t.name, "family": t.family, "pattern": pattern, "batch": t.batch})
                               for t in small_transports(cfg) if producers == 1 or t.multi_producer], cfg.reps, "msgs/s")

    for nbytes in ARRAY_SIZES:
        log(f"numpy arrays {nbytes // MiB} MiB")
        res["arrays"] += sweep([Case(f"{t.name} {nbytes // MiB} MiB", functools.partial(array_run, t, nbytes, cfg),
                                     {"transport": t.name, "family": t.family, "size_mib": nbytes // MiB})
                                for t in array_transports()], cfg.reps, "GB/s")

    log("ping-pong (value: median round trip)")
    res["latency"] = sweep([Case(t.pair_name, functools.partial(pingpong_run, t, cfg),
                                 {"transport": t.pair_name, "family": t.family}) for t in pingpong_transports()],
                           cfg.reps, "µs")
    for r in res["latency"]:  # per-row statistics: the median over runs of each run's statistic
        if _ok(r):
            r["p99_us"] = statistics.median(run["p99_us"] for run in r["runs"])

    for section, what in (("small", "pattern"), ("arrays", "size_mib"), ("latency", None)):
        for r in res[section]:
            if not _ok(r):
                res["failures"].append(f"{section}: {r['transport']} {r.get(what, '')}: {r['error']}")
    res["targets"] = evaluate_targets(res)
    res["loadavg_at_end"] = list(os.getloadavg())
    res["wall_seconds"] = time.monotonic() - t_start

    md = render_markdown(res)
    sys.stdout.write(md)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=2) + "\n")
    log(f"JSON written to {json_path}")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
