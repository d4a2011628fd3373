#!/usr/bin/python3
"""Transport benchmark: ringpool against the stdlib's multiprocessing, in one run.

What is measured (every transport goes through the same ``Transport`` interface and the same
child-process roles, so the only difference between two rows is the transport):

1. Small messages: the tuple ``(123456, 3.14, 'abcdefgh' * 4)`` (about 63 B pickled), 1->1 (one
   producer process, one consumer process) and 4->1 (four producers, one consumer), in msgs/s.
   ringpool's Queue is also run with ``put_many``/``get_many`` batches. Producers send a warm-up
   share first, which the consumer drains; then every process meets at a barrier, the consumer
   starts its clock when the barrier releases and stops it on the last message. The consumer
   must receive exactly producers * N messages (blocking receives; a deadline turns a lost
   message into a failed scenario), and nothing more (a short poll afterwards).
2. numpy float32 arrays of 1, 16 and 64 MiB, 1->1, in GB/s (10^9 payload bytes per second). Each
   message is ``(seq, array)``; the consumer checks seq, shape, dtype and two sample elements,
   then drops the array before the next receive (so ringpool's shared-memory blocks recycle).
   A few warm-up messages per size run before the barrier (the first ones allocate and fault
   shared memory).
3. Ping-pong round-trip latency between two processes (median and p99, microseconds), a 1-byte
   payload (pickled ``b'x'`` for send/recv, raw for send_bytes and os.pipe). Every round trip is
   timed on its own with ``perf_counter_ns``.
4. Limits, measured in the same run: in-process ``pickle.loads(pickle.dumps(msg, 5))`` of the
   small tuple (msgs/s), and single-thread memcpy bandwidth (``np.copyto`` between two
   pre-faulted 64 MiB arrays, GB/s).

Throughput numbers are the median of 3 repetitions (1 with --quick), each repetition with fresh
processes and a fresh transport; the JSON keeps every repetition. The ratio section checks the
targets (PASS/FAIL). Processes use the "fork" start method. Every child runs under a deadline
(SIGALRM in the child, join/terminate/kill in the parent): a hang, an exception or a wrong count
marks that scenario failed and the run goes on.

Run (from the repository root; the extension must be built in bindings/ringpool):

    /usr/bin/python3 benchmarks/bench_transport.py            # ~2-3 minutes
    /usr/bin/python3 benchmarks/bench_transport.py --quick    # smoke test, well under a minute
    ... [--json PATH] [--markdown PATH]

The Markdown report goes to stdout (and to --markdown PATH), progress to stderr, and the JSON to
--json PATH (default: benchmarks/results/bench_transport[-quick].json).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import platform
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
    reps: int               # repetitions of each throughput scenario (median reported)
    small_msgs: int         # small messages per run, all producers together (scaled per transport)
    batch: int              # put_many/get_many batch size
    array_bytes: int        # payload bytes per array run (messages = array_bytes // size)
    array_min_msgs: int     # ... but at least this many messages per run
    array_warmup: int       # warm-up messages per array run
    pingpong_rounds: int    # timed round trips
    pingpong_warmup: int
    budget: float           # seconds before a scenario's processes are declared hung
    pickle_iters: int
    memcpy_iters: int


DEFAULT = Config(reps=3, small_msgs=400_000, batch=256, array_bytes=512 * MiB, array_min_msgs=8,
                 array_warmup=3, pingpong_rounds=20_000, pingpong_warmup=1_000, budget=45.0,
                 pickle_iters=300_000, memcpy_iters=20)
QUICK = Config(reps=1, small_msgs=40_000, batch=256, array_bytes=64 * MiB, array_min_msgs=2,
               array_warmup=1, pingpong_rounds=2_000, pingpong_warmup=200, budget=15.0,
               pickle_iters=50_000, memcpy_iters=5)

ARRAY_SIZES = (1 * MiB, 16 * MiB, 64 * MiB)


# --------------------------------------------------------------------------------------------
# Transports: one interface, one class per way of moving objects between processes
# --------------------------------------------------------------------------------------------
class Endpoint:
    """One end of a one-way channel (or of a duplex link), as bound methods.

    Bound methods of the real objects, not wrappers, so no transport pays for an extra call.
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
    multi_producer = True  # may several processes send on one channel?
    batch = 0              # > 0: producers use send_many, the consumer recv_many(batch)
    count_scale = 1.0      # small-message count relative to Config.small_msgs (keeps runs ~1 s)

    def __init__(self):
        self._closers = []

    def channel(self):
        raise NotImplementedError

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
    family = "ringpool"

    def __init__(self, batch=0):
        super().__init__()
        self.batch = batch
        self.name = f"ringpool.Queue put_many/get_many({batch})" if batch else "ringpool.Queue"
        self.count_scale = 4.0 if batch else 1.0

    def channel(self):
        q = ringpool.Queue()
        self._closers.append(q.close)
        return _queue_endpoints(q, batched=bool(self.batch))


class RingpoolSimpleQueue(Transport):
    name, family = "ringpool.SimpleQueue", "ringpool"

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
    name, family, count_scale = "mp.Queue", "stdlib", 0.25

    def channel(self):
        q = CTX.Queue()
        self._closers.append(q.close)
        return _queue_endpoints(q)


class StdlibSimpleQueue(Transport):
    name, family, count_scale = "mp.SimpleQueue", "stdlib", 0.25

    def channel(self):
        q = CTX.SimpleQueue()
        self._closers.append(q.close)
        return _simple_queue_endpoints(q)


class StdlibPipe(Transport):
    family, multi_producer, count_scale = "stdlib", False, 0.5

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


def run_roles(roles, budget):
    """Starts one child per (name, role, args), waits for every report, reaps every child.

    Returns the reported values in order. Raises ScenarioFailed (after terminating every child)
    if a child reports an error, dies without reporting, or the budget runs out.
    """
    procs, readers = [], {}
    errors = []
    results = [None] * len(roles)
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
                    results[i] = value
                else:
                    errors.append(f"{roles[i][0]}: {value}")
        for r, i in readers.items():
            errors.append(f"{roles[i][0]}: no report within {budget:.0f} s (hung)")
            r.close()
        for p in procs:  # normal exit: stdlib queues flush their feeder threads here
            p.join(max(0.5, deadline - time.monotonic()) if not errors else 0.5)
    finally:
        for p in procs:
            if p.is_alive():
                errors.append(f"{p.name}: still alive after its report, terminated")
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()
            if p.exitcode not in (0, None, -signal.SIGTERM, -signal.SIGKILL) and not errors:
                errors.append(f"{p.name}: exit code {p.exitcode}")
    if errors:
        raise ScenarioFailed("; ".join(errors))
    return results


# --------------------------------------------------------------------------------------------
# Roles (run in child processes)
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
    _send_n(tx, n, batch)


def small_consumer(rx, n, warmup, batch, barrier, budget):
    _receive_exactly(rx, warmup, batch)
    barrier.wait(budget)
    t0 = time.perf_counter()
    got, first, last = _receive_exactly(rx, n, batch)
    seconds = time.perf_counter() - t0
    if got != n:
        raise ScenarioFailed(f"received {got} messages, expected {n}")
    if first != SMALL_MSG or last != SMALL_MSG:
        raise ScenarioFailed(f"corrupted message: first={first!r} last={last!r}")
    if rx.poll(0.05):
        raise ScenarioFailed(f"more than the {n} messages sent arrived")
    return seconds


def _make_array(nbytes):
    a = np.full(nbytes // 4, ARRAY_FILL, dtype=np.float32)  # also faults the pages in
    a[-1] = ARRAY_LAST
    return a


def array_producer(tx, nbytes, n, warmup, barrier, budget):
    a, send = _make_array(nbytes), tx.send
    for seq in range(warmup):
        send((seq, a))
    barrier.wait(budget)
    for seq in range(warmup, warmup + n):
        send((seq, a))


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
    t0 = time.perf_counter()
    seq = warmup
    try:
        for seq in range(warmup, warmup + n):
            item = recv()
            _check_array(item, seq, nelem)
            del item
    except Deadline:
        raise Deadline(f"deadline reached after {seq - warmup} of {n} arrays") from None
    seconds = time.perf_counter() - t0
    if rx.poll(0.05):
        raise ScenarioFailed(f"more than the {n + warmup} arrays sent arrived")
    return seconds


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
    try:
        for i in range(rounds):
            t = clock()
            send(PING)
            recv()
            samples[i] = clock() - t
    except Deadline:
        raise Deadline(f"deadline reached after {i} of {rounds} round trips") from None
    ns = np.array(samples, dtype=np.float64)
    return {"median_us": float(np.median(ns)) / 1e3, "p99_us": float(np.percentile(ns, 99)) / 1e3,
            "min_us": float(ns.min()) / 1e3, "mean_us": float(ns.mean()) / 1e3}


def ponger(ep, rounds, warmup, barrier, budget):
    send, recv = ep.send, ep.recv
    for _ in range(warmup):
        send(recv())
    barrier.wait(budget)
    for _ in range(rounds):
        send(recv())


# --------------------------------------------------------------------------------------------
# Scenarios (run in the parent)
# --------------------------------------------------------------------------------------------
def _round_to(n, k):
    return max(k, n // k * k)


def small_run(transport, producers, cfg):
    """One run of the small-message scenario; returns msgs/s and the message count."""
    batch = transport.batch
    unit = batch or 1
    per_producer = _round_to(int(cfg.small_msgs * transport.count_scale) // producers, unit)
    warmup = _round_to(per_producer // 20, unit)
    tx, rx = transport.channel()
    barrier = CTX.Barrier(producers + 1)
    try:
        roles = [("consumer", small_consumer, (rx, per_producer * producers, warmup * producers, batch, barrier, cfg.budget))]
        roles += [(f"producer-{i}", small_producer, (tx, per_producer, warmup, batch, barrier, cfg.budget))
                  for i in range(producers)]
        seconds = run_roles(roles, cfg.budget)[0]
    finally:
        transport.close()
    return {"value": per_producer * producers / seconds, "messages": per_producer * producers, "seconds": seconds}


def array_run(transport, nbytes, cfg):
    n = max(cfg.array_min_msgs, cfg.array_bytes // nbytes)
    tx, rx = transport.channel()
    barrier = CTX.Barrier(2)
    try:
        seconds = run_roles([("consumer", array_consumer, (rx, nbytes, n, cfg.array_warmup, barrier, cfg.budget)),
                             ("producer", array_producer, (tx, nbytes, n, cfg.array_warmup, barrier, cfg.budget))],
                            cfg.budget)[0]
    finally:
        transport.close()
    return {"value": n * nbytes / seconds / 1e9, "messages": n, "seconds": seconds}


def pingpong_run(transport, cfg):
    a, b = transport.duplex()
    barrier = CTX.Barrier(2)
    try:
        stats = run_roles([("pinger", pinger, (a, cfg.pingpong_rounds, cfg.pingpong_warmup, barrier, cfg.budget)),
                           ("ponger", ponger, (b, cfg.pingpong_rounds, cfg.pingpong_warmup, barrier, cfg.budget))],
                          cfg.budget)[0]
    finally:
        transport.close()
    return dict(stats, rounds=cfg.pingpong_rounds)


def repeated(run, reps, label, unit):
    """Runs `run()` reps times; the median of 'value' is the result. Stops at the first failure."""
    runs = []
    for rep in range(reps):
        try:
            r = run()
        except ScenarioFailed as e:
            log(f"  {label}: rep {rep + 1}/{reps} FAILED: {e}")
            return {"error": str(e), "runs": runs}
        runs.append(r)
        log(f"  {label}: rep {rep + 1}/{reps}: {r['value']:,.3f} {unit} ({r['messages']} msgs, {r['seconds']:.2f} s)")
        gc.collect()
    values = [r["value"] for r in runs]
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "messages": runs[0]["messages"], "runs": runs}


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
    cpu = "?"
    mem_kib = 0
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
        with open("/proc/meminfo") as f:
            mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "numpy": np.__version__,
        "ringpool": getattr(ringpool, "__version__", "?"),
        "ringpool_path": str(Path(ringpool.__file__).parent),
        "start_method": CTX.get_start_method(),
        "loadavg_at_start": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _find(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def evaluate_targets(res):
    """The ratio targets: (description, measured, threshold, passed or None if not measurable)."""
    small, arrays, lat, lim = res["small"], res["arrays"], res["latency"], res["limits"]
    out = []

    def value(row, key="median"):
        return None if row is None or "error" in row else row[key]

    def add(desc, measured, threshold, higher_is_better=True, fmt="{:.2f}x"):
        if measured is None:
            out.append({"target": desc, "measured": "n/a (scenario failed)", "threshold": threshold[1], "passed": False})
            return
        ok = measured >= threshold[0] if higher_is_better else measured <= threshold[0]
        out.append({"target": desc, "measured": fmt.format(measured), "value": measured,
                    "threshold": threshold[1], "passed": ok})

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    rq11 = value(_find(small, transport="ringpool.Queue", pattern="1->1"))
    mq11 = value(_find(small, transport="mp.Queue", pattern="1->1"))
    add("small 1->1: ringpool.Queue / mp.Queue", ratio(rq11, mq11), (6.0, ">= 6x"))
    add("small 1->1: ringpool.Queue / in-process pickle round trip", ratio(rq11, lim["pickle"]["median"]),
        (0.40, ">= 40%"), fmt="{:.0%}")
    batched = _find(small, family="ringpool", pattern="4->1", batch=res["config"]["batch"])
    add(f"small 4->1 batched: {batched['transport'] if batched else 'ringpool.Queue batched'} (msgs/s)",
        value(batched), (1.5e6, ">= 1.5 M msgs/s"), fmt="{:,.0f}")
    for name in ("ringpool.Queue", "ringpool.Pipe"):
        add(f"16 MiB arrays: {name} / memcpy", ratio(value(_find(arrays, transport=name, size_mib=16)),
                                                       lim["memcpy"]["median"]), (0.25, ">= 25%"), fmt="{:.0%}")
    base = value(_find(lat, family="os"), "median_us")
    for name in ("ringpool.Pipe", "ringpool.Queue pair"):
        add(f"ping-pong median: {name} / os.pipe", ratio(value(_find(lat, transport=name), "median_us"), base),
            (0.5, "<= 0.5x"), higher_is_better=False)
    return out


def _spread(row, fmt):
    return f"{fmt.format(row['min'])}–{fmt.format(row['max'])}" if row.get("runs") and len(row["runs"]) > 1 else "–"


def render_markdown(res):
    m, cfg = res["machine"], res["config"]
    lines = ["# ringpool transport benchmark", ""]
    lines += ["| machine | |", "|---|---|",
              f"| CPU | {m['cpu']} |",
              f"| cores | {m['cores']} ({m['usable_cores']} usable) |",
              f"| memory | {m['memory_gib']} GiB |",
              f"| kernel | {m['kernel']} |",
              f"| Python / numpy | {m['python']} / {m['numpy']} |",
              f"| ringpool | {m['ringpool']} ({m['ringpool_path']}) |",
              f"| date | {m['date']} |",
              f"| load average at start | {' '.join(f'{x:.2f}' for x in m['loadavg_at_start'])} |",
              f"| mode | {res['mode']}: median of {cfg['reps']} run(s), start method {m['start_method']} |", ""]

    lim = res["limits"]
    lines += ["## Limits (in-process, same run)", "", "| limit | value | spread |", "|---|---:|---|",
              f"| pickle.dumps+loads of the tuple ({lim['pickle']['pickled_bytes']} B) | "
              f"{lim['pickle']['median']:,.0f} msgs/s | {_spread(lim['pickle'], '{:,.0f}')} |",
              f"| memcpy, np.copyto 64 MiB | {lim['memcpy']['median']:.2f} GB/s | {_spread(lim['memcpy'], '{:.2f}')} |", ""]

    def cell(row, fmt, key="median"):
        return f"FAILED: {row['error']}" if "error" in row else fmt.format(row[key])

    lines += [f"## Small messages: {SMALL_MSG!r}, msgs/s", "",
              "| transport | pattern | messages | msgs/s | spread | × mp.Queue | % pickle limit |",
              "|---|---|---:|---:|---|---:|---:|"]
    for r in res["small"]:
        ref = _find(res["small"], transport="mp.Queue", pattern=r["pattern"])
        ok = "error" not in r
        vs = f"{r['median'] / ref['median']:.2f}" if ok and ref and "error" not in ref else "–"
        pct = f"{r['median'] / lim['pickle']['median']:.0%}" if ok else "–"
        lines.append(f"| {r['transport']} | {r['pattern']} | {r.get('messages', '–')} | {cell(r, '{:,.0f}')} | "
                     f"{_spread(r, '{:,.0f}') if ok else '–'} | {vs} | {pct} |")
    lines.append("")

    lines += ["## numpy float32 arrays, 1->1, GB/s", "",
              "| transport | size | messages | GB/s | spread | × mp.Queue | % memcpy |",
              "|---|---:|---:|---:|---|---:|---:|"]
    for r in res["arrays"]:
        ref = _find(res["arrays"], transport="mp.Queue", size_mib=r["size_mib"])
        ok = "error" not in r
        vs = f"{r['median'] / ref['median']:.1f}" if ok and ref and "error" not in ref else "–"
        pct = f"{r['median'] / lim['memcpy']['median']:.0%}" if ok else "–"
        lines.append(f"| {r['transport']} | {r['size_mib']} MiB | {r.get('messages', '–')} | {cell(r, '{:.2f}')} | "
                     f"{_spread(r, '{:.2f}') if ok else '–'} | {vs} | {pct} |")
    lines.append("")

    lines += ["## Ping-pong round trip, 1-byte payload, µs", "",
              "| transport | round trips | median µs | p99 µs | × os.pipe median |", "|---|---:|---:|---:|---:|"]
    base = _find(res["latency"], family="os")
    for r in res["latency"]:
        if "error" in r:
            lines.append(f"| {r['transport']} | – | FAILED: {r['error']} | – | – |")
            continue
        vs = f"{r['median_us'] / base['median_us']:.2f}" if base and "error" not in base else "–"
        lines.append(f"| {r['transport']} | {r['rounds']} | {r['median_us']:.1f} | {r['p99_us']:.1f} | {vs} |")
    lines.append("")

    lines += ["## Targets", "", "| target | measured | threshold | result |", "|---|---:|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {t['threshold']} | {'PASS' if t['passed'] else 'FAIL'} |")
    lines.append("")
    if res["failures"]:
        lines += ["## Failed scenarios", ""] + [f"- {f}" for f in res["failures"]] + [""]
    lines.append(f"Total wall time: {res['wall_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


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

    log("small messages")
    for producers in (1, 4):
        for t in small_transports(cfg):
            if producers > 1 and not t.multi_producer:
                continue
            pattern = f"{producers}->1"
            label = f"{t.name} {pattern}"
            row = repeated(functools.partial(small_run, t, producers, cfg), cfg.reps, label, "msgs/s")
            res["small"].append(dict(row, transport=t.name, family=t.family, pattern=pattern, batch=t.batch))

    log("numpy arrays")
    for nbytes in ARRAY_SIZES:
        for t in array_transports():
            label = f"{t.name} {nbytes // MiB} MiB"
            row = repeated(functools.partial(array_run, t, nbytes, cfg), cfg.reps, label, "GB/s")
            res["arrays"].append(dict(row, transport=t.name, family=t.family, size_mib=nbytes // MiB))

    log("ping-pong")
    for t in pingpong_transports():
        name = f"{t.name} pair" if isinstance(t, (RingpoolQueue, RingpoolSimpleQueue, StdlibQueue)) else t.name
        try:
            row = pingpong_run(t, cfg)
            log(f"  {name}: median {row['median_us']:.1f} µs, p99 {row['p99_us']:.1f} µs")
        except ScenarioFailed as e:
            log(f"  {name}: FAILED: {e}")
            row = {"error": str(e)}
        res["latency"].append(dict(row, transport=name, family=t.family))

    for section in ("small", "arrays", "latency"):
        for r in res[section]:
            if "error" in r:
                what = r["pattern"] if section == "small" else f"{r['size_mib']} MiB" if section == "arrays" else "ping-pong"
                res["failures"].append(f"{section}: {r['transport']} {what}: {r['error']}")
    res["targets"] = evaluate_targets(res)
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
