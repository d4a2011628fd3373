"""ringpool's stress runner: a mixed load, optional fault injection, and the invariants it checks.

``python -m ringpool stress`` (or ``stress.run(...)``, which returns a ``Report``) runs four
channels at once for a given time, all processes started from one ringpool context of its own,
then ends every channel, checks what was delivered against what was committed, and checks that
nothing was left behind (descriptors, /dev/shm entries, children, zombies).

    runner process (threads)                      processes (forked by the run's zygote)
    ────────────────────────                      ──────────────────────────────────────
    queue channel  ── Queue (data) ─────────────► producers ──► consumers
                   ◄─ SimpleQueue (receipts) ───────────────────┘
    pipe channel   ── Pipe (duplex) ────────────► pinger ◄──► echoer
    executor chan. ── Executor.submit ──────────► executor workers
    dataloader ch. ── DataLoader epochs ────────► DataLoader workers
    fault injector ── SIGKILL (pidfd) ──────────► any of the above, or the zygote
    main thread: progress bar, hang watchdog, end-of-run checks

- queue: producers put sequence-numbered, checksummed messages (0 B .. max size); consumers take
  batches with ``get_many``, verify each, and send a receipt per batch on a ``SimpleQueue`` (whose
  ``put`` returns only once published, so a receipt sent is a receipt kept) before taking the
  next. The accounting (``check_queue_ledger``) is held against the ring's own frame counters.
- pipe: a pinger keeps up to ``_PIPE_WINDOW`` messages in flight to an echoer, which verifies
  each and replies with the payload reversed (or its checksum); the pinger checks order and
  contents. A pair with a killed member must notice (EOF) by itself; a new pair replaces it.
- executor: tasks verify their argument's checksum and return it reversed; a killed worker may
  fail only its running task, with ``WorkerDied`` naming a pid that was killed.
- dataloader: epochs of a map-style dataset through ``DataLoader(num_workers=2)``; each epoch
  must yield every index once; an epoch may fail only with a fault injected during it.
- faults: a random producer, consumer, executor worker, DataLoader worker or the zygote gets
  SIGKILL at random intervals. Killed producers, consumers and pipe pairs are restarted.
  Killing the zygote kills every process it forked (docs/design/spawner.md), so one zygote fault
  kills a process in every channel; the accounting expects that.

Deviations from what a user of ringpool would do: the runner reads the data queue's ring
counters (``Queue._chan.committed``/``consumed``: frames ever published and taken), since they
are the ground truth the accounting is checked against; and it signals processes only through
pidfds, after checking that the pid is its own child, so a recycled pid is never hit.

docs/design/stress.md explains the accounting.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import dataclasses
import gc
import json
import math
import mmap
import os
import platform
import queue
import random
import signal
import struct
import sys
import threading
import time
import traceback
import zlib
from multiprocessing import resource_tracker
from multiprocessing.reduction import DupFd

import ringpool

from . import _core

__all__ = ["CHANNELS", "Report", "Invariant", "ChannelStats", "QueueLedger", "check_queue_ledger",
           "draw_size", "run", "main", "add_arguments"]

CHANNELS = ("queue", "pipe", "executor", "dataloader")
FAULT_KINDS = ("producer", "consumer", "executor-worker", "dataloader-worker", "zygote")
MAX_SIZE = 64 << 20
MiB = 1 << 20

# Receipts are sent per batch, so a consumer killed between get_many and its receipt loses at most
# this many messages. Larger batches mean fewer receipts and a looser bound on losses.
_CONSUMER_BATCH = 64
# Messages a pinger keeps in flight. Each side's ring (1 MiB) must hold a full window of inline
# records (128 KiB each at most), or both ends could block in send.
_PIPE_WINDOW = 4
# Executor tasks in flight, and their payload bytes: enough to keep both workers fed.
_EXEC_INFLIGHT, _EXEC_BYTES = 16, 256 * MiB
# A producer puts a message over this size only once the queue holds at most 2 items: large
# messages then cost at most (producers + consumers' batches) x max size of shared memory.
_LARGE = 1 * MiB
_POOL_BYTES = 1 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")
_READER_CACHE = 512 * MiB  # BlockCache's byte budget (runtime/include/ringpool/block.hpp)
_DL_ITEMS, _DL_BATCH = 512, 32


# -- payloads --------------------------------------------------------------------------------------

def draw_size(rng, max_size=MAX_SIZE):
    """A message size: 5% empty, 80% up to 4 KiB, 13.5% up to 1 MiB, 1.5% up to max_size, each
    range log-uniform (so every order of magnitude shows up), capped at max_size."""
    r = rng.random()
    if r < 0.05 or max_size <= 0:
        return 0
    if r < 0.85:
        lo, hi = 1, 4096
    elif r < 0.985:
        lo, hi = 4096, MiB
    else:
        lo, hi = MiB, MAX_SIZE
    hi = min(hi, max_size)
    lo = min(lo, hi)
    return min(int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))), hi)


_pools = {}


def _payload(seed, seq, size):
    """Deterministic bytes for message seq (a window into a per-seed random pool)."""
    pool = _pools.get(seed)
    if pool is None:
        pool = _pools[seed] = random.Random(f"pool:{seed}").randbytes(_POOL_BYTES)
    off = (seq * 7919) % _POOL_BYTES
    if off + size <= _POOL_BYTES:
        return pool[off:off + size]
    reps = (off + size) // _POOL_BYTES + 1
    return (pool * reps)[off:off + size]


def _crc(payload, *key):
    """crc32 of the payload seeded with the message's identity, so a payload delivered under
    another message's header fails too."""
    return zlib.crc32(payload, zlib.crc32(struct.pack(f"<{len(key)}q", *key)))


# -- shared counters -------------------------------------------------------------------------------

class _Shared:
    """int64 counters in a memfd, shared with processes by descriptor (nothing in /dev/shm, no
    resource tracker). One writer per slot; aligned 8-byte stores are not torn on x86-64/arm64."""

    def __init__(self, n, fd=None):
        self.n = n
        own = fd is None
        if own:
            fd = _core.create_memfd("ringpool-stress", n * 8)  # sealed: a peer cannot SIGBUS us
        else:
            _core.check_received_memfd(fd, n * 8, n * 8, "stress counters")
        self._mm = mmap.mmap(fd, n * 8)
        self._a = memoryview(self._mm).cast("q")
        if own:
            self._fd = fd
        else:
            os.close(fd)
            self._fd = None

    def __reduce__(self):
        return (_Shared._attach, (self.n, DupFd(self._fd)))

    @staticmethod
    def _attach(n, token):
        return _Shared(n, token.detach())

    def __getitem__(self, i):
        return self._a[i]

    def __setitem__(self, i, v):
        self._a[i] = v

    def add(self, i, v):
        self._a[i] += v  # single writer per slot

    def close(self):
        self._a.release()
        self._mm.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# -- report ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Invariant:
    name: str
    value: str
    ok: bool


@dataclasses.dataclass
class ChannelStats:
    name: str
    messages: int = 0
    bytes: int = 0
    faults: int = 0
    notes: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Report:
    duration: float
    elapsed: float
    seed: int
    faults_enabled: bool
    max_size: int
    machine: str
    channels: dict
    invariants: list
    faults: dict

    @property
    def passed(self):
        """True if every invariant held."""
        return all(i.ok for i in self.invariants)

    @property
    def failures(self):
        """The invariants that did not hold."""
        return [i for i in self.invariants if not i.ok]

    def to_dict(self):
        """The report as plain data (for ``--json``), with ``passed``."""
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d

    def to_markdown(self):
        """The report as Markdown: the throughput table per channel and the invariants checked."""
        secs = max(self.elapsed, 1e-9)
        out = [f"ringpool stress: {self.elapsed:.1f} s (asked {self.duration:g} s), seed {self.seed}, "
               f"faults {'on' if self.faults_enabled else 'off'}, max message {_fmt_bytes(self.max_size)}",
               f"machine: {self.machine}", "",
               "| channel | messages/s | MB/s | messages | MB | faults |",
               "|---|---:|---:|---:|---:|---:|"]
        for c in self.channels.values():
            out.append(f"| {c.name} | {c.messages / secs:,.0f} | {c.bytes / secs / 1e6:,.1f} | {c.messages:,} | "
                       f"{c.bytes / 1e6:,.1f} | {c.faults} |")
        if self.faults:
            out += ["", "faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))]
        notes = [f"- {c.name}: {n}" for c in self.channels.values() for n in c.notes]
        if notes:
            out += ["", *notes]
        out += ["", "| invariant | value | result |", "|---|---|---|"]
        for i in self.invariants:
            out.append(f"| {i.name} | {i.value} | {'PASS' if i.ok else 'FAIL'} |")
        out += ["", "PASSED" if self.passed else f"FAILED ({len(self.failures)} invariant(s))"]
        return "\n".join(out)


def _fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024


def _machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 0
    load = os.getloadavg()[0]
    return (f"{model}, {len(os.sched_getaffinity(0))} CPUs, {mem:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}, load {load:.2f} at start")


# -- the queue ledger (pure: unit-tested on synthetic input) ------------------------------------

@dataclasses.dataclass
class QueueLedger:
    """What the queue channel saw. ``delivered`` maps a producer incarnation (slot, inc) to every
    seq delivered for it (duplicates included); ``finished`` maps the incarnations that ended
    normally to their message count; ``killed`` maps killed ones to (their count of puts that had
    returned, the end of the seqs of the call that was running: a ``put_many`` killed midway may
    have published several); ``committed``/``consumed`` are the ring's frame counters at the
    end."""
    delivered: dict
    finished: dict
    killed: dict
    committed: int
    consumed: int
    consumer_deaths: int = 0
    batch: int = _CONSUMER_BATCH
    order_violations: int = 0
    checksum_errors: int = 0


def check_queue_ledger(led):
    """The queue channel's invariants (see docs/design/stress.md, "Accounting").

    Every frame the ring published (``committed``) was taken (``consumed``); each taken frame was
    delivered exactly once, or was in the batch of a consumer killed before it sent its receipt
    (``lost``: at most ``batch`` per consumer death, none without one). Each producer's messages
    are the prefix 0..n-1 of its sequence: all of it for a producer that finished; for a killed
    one, up to the put that was running (its later, unreturned puts may be lost with it).
    """
    inv = []
    receipts = sum(len(s) for s in led.delivered.values())
    dups = sum(len(s) - len(set(s)) for s in led.delivered.values())
    inv.append(Invariant("queue: ring drained (frames consumed == committed)",
                         f"{led.consumed:,} / {led.committed:,}", led.consumed == led.committed))
    inv.append(Invariant("queue: duplicates", str(dups), dups == 0))
    inv.append(Invariant("queue: payload checksums failed", str(led.checksum_errors), led.checksum_errors == 0))
    inv.append(Invariant("queue: FIFO per producer per consumer (violations)", str(led.order_violations),
                         led.order_violations == 0))
    lost = led.consumed - receipts
    bound = led.batch * led.consumer_deaths
    inv.append(Invariant("queue: lost in flight by killed consumers (<= batch x consumer deaths)",
                         f"{lost:,} <= {bound:,} ({led.consumer_deaths} deaths)", 0 <= lost <= bound))
    beyond = 0        # seqs a producer never put (at or past its count)
    missing = 0       # in a producer's known range, not delivered
    known = 0         # frames in the producers' known ranges
    tail_room = 0     # what killed producers may have published past their last delivered seq
    for key in set(led.delivered) | set(led.finished) | set(led.killed):
        seqs = set(led.delivered.get(key, ()))
        if key in led.finished:
            n = led.finished[key]
            beyond += sum(1 for s in seqs if s >= n or s < 0)
            missing += n - sum(1 for s in seqs if 0 <= s < n)
            known += n
        else:
            returned, bound = led.killed.get(key, (0, 1))
            m = max(seqs) + 1 if seqs else 0
            # The call that was running when it died may have published (seqs returned..bound-1).
            if m > bound or any(s < 0 for s in seqs):
                beyond += 1
            missing += m - len(seqs)
            known += m
            tail_room += max(bound - m, 0)
    tail = led.committed - known
    inv.append(Invariant("queue: messages delivered that no producer put", str(beyond), beyond == 0))
    inv.append(Invariant("queue: published past killed producers' last delivery (0 <= tail <= room)",
                         f"{tail:,} <= {tail_room:,}", 0 <= tail <= tail_room))
    inv.append(Invariant("queue: committed == delivered + lost in flight",
                         f"{led.committed:,} == {receipts - dups:,} + {missing + tail:,}",
                         led.committed == receipts - dups + missing + tail))
    return inv


# -- processes (module-level: they run in ringpool workers) --------------------------------------

def _queue_producer(slot, inc, q, reports, shared, idx, seed, max_size, stop_idx):
    rng = random.Random(f"{seed}:producer:{slot}:{inc}")
    pseed = f"{seed}:{slot}"
    np = None
    try:
        import numpy as np
    except ImportError:
        pass
    seq = 0
    nbytes = 0
    while not shared[stop_idx]:
        if rng.random() < 0.2:  # a put_many of small messages
            k = rng.randint(2, 32)
            msgs = []
            for _ in range(k):
                size = min(draw_size(rng, max_size), 4096)
                p = _payload(pseed, seq, size)
                msgs.append((slot, inc, seq, size, _crc(p, slot, inc, seq), p))
                seq += 1
                nbytes += size
            shared[idx + 2] = seq      # the seqs this call may publish end here
            q.put_many(msgs)
        else:
            size = draw_size(rng, max_size)
            if size > _LARGE:
                end = time.monotonic() + 30
                while q.qsize() > 2 and not shared[stop_idx] and time.monotonic() < end:
                    time.sleep(0.005)
            p = _payload(pseed, seq, size)
            crc = _crc(p, slot, inc, seq)
            if np is not None and size >= 64 * 1024 and seq % 2:
                p = np.frombuffer(p, dtype=np.uint8)  # travels as an out-of-band buffer
            shared[idx + 2] = seq + 1
            q.put((slot, inc, seq, size, crc, p))
            seq += 1
            nbytes += size
        shared[idx] = seq          # puts that returned
        shared[idx + 1] = nbytes
    q.close()
    q.join_thread()                # everything put is now in the ring
    reports.put(("pdone", slot, inc, seq))


def _queue_consumer(slot, inc, q, reports, shared, idx, fin_idx, batch):
    while True:
        fin = shared[fin_idx]
        try:
            items = q.get_many(batch, timeout=0.1)
        except queue.Empty:
            if fin:
                break
            continue
        receipts = []
        bad = 0
        nbytes = 0
        for pslot, pinc, seq, size, crc, p in items:
            if len(memoryview(p).cast("B")) != size or _crc(p, pslot, pinc, seq) != crc:
                bad += 1
            receipts.append((pslot, pinc, seq))
            nbytes += size
        del items, p
        reports.put(("rx", slot, inc, receipts, bad))  # published when put returns
        shared.add(idx, len(receipts))
        shared.add(idx + 1, nbytes)
    reports.put(("cdone", slot, inc))


# pipe slots: 0 sent, 1 verified, 2 errors, 3 bytes, 4 peer lost (pinger), 5 echoed, 6 errors (echoer),
# 7 peer lost (echoer), 8 stop
_P_SENT, _P_OK, _P_ERR, _P_BYTES, _P_LOST, _E_ECHO, _E_ERR, _E_LOST, _P_STOP = range(9)
_SMALL_ECHO = 64 * 1024


def _pipe_pinger(conn, shared, seed, inc, max_size):
    rng = random.Random(f"{seed}:pinger:{inc}")
    pseed = f"{seed}:pipe:{inc}"
    out = collections.deque()
    seq = 0
    try:
        while True:
            stopping = shared[_P_STOP]
            while not stopping and len(out) < _PIPE_WINDOW:
                size = draw_size(rng, max_size)
                if size > _LARGE and out:
                    break  # one large message in flight at a time
                p = _payload(pseed, seq, size)
                crc = _crc(p, inc, seq)
                if seq % 2:
                    conn.send_bytes(struct.pack("<qqI", seq, size, crc) + p)
                else:
                    conn.send((seq, size, crc, p))
                out.append((seq, size, crc, p if size <= _SMALL_ECHO else None))
                seq += 1
                shared.add(_P_SENT, 1)
            if not out:
                break
            if not conn.poll(0.5):
                continue
            rseq, rcrc, rev = conn.recv()
            eseq, size, crc, p = out.popleft()
            ok = rseq == eseq and rcrc == crc and (p is None or rev == p[::-1])
            shared.add(_P_OK if ok else _P_ERR, 1)
            shared.add(_P_BYTES, size)
        # Bye, in the form the echoer expects for this seq (it alternates recv and recv_bytes).
        if seq % 2:
            conn.send_bytes(b"")
        else:
            conn.send(None)
        conn.recv()      # the echoer's bye: everything it sent has arrived
    except (EOFError, BrokenPipeError, ConnectionResetError):
        shared[_P_LOST] = 1


def _pipe_echoer(conn, shared, inc):
    seq = 0
    try:
        while True:
            if seq % 2:
                raw = conn.recv_bytes()
                if not raw:
                    conn.send(None)
                    return
                rseq, size, crc = struct.unpack_from("<qqI", raw)
                p = memoryview(raw)[20:]
            else:
                msg = conn.recv()
                if msg is None:
                    conn.send(None)
                    return
                rseq, size, crc, p = msg
            if rseq != seq or len(p) != size or _crc(p, inc, rseq) != crc:
                shared.add(_E_ERR, 1)
            conn.send((rseq, crc, bytes(p)[::-1] if size <= _SMALL_ECHO else None))
            shared.add(_E_ECHO, 1)
            seq += 1
    except (EOFError, BrokenPipeError, ConnectionResetError):
        shared[_E_LOST] = 1


def _exec_task(payload, crc, key):
    """Verify the argument; return it reversed (small) or its checksum (large), and our pid."""
    ok = _crc(payload, *key) == crc
    return os.getpid(), ok, (payload[::-1] if len(payload) <= _SMALL_ECHO else _crc(payload, *key))


class StressDataset:
    """A map-style dataset: item i is its index, our pid, a tensor filled with i, and a checksummed
    blob of 0 B .. 64 KiB."""

    def __init__(self, n, seed, max_size):
        self.n, self.seed, self.max_size = n, seed, min(max_size, 64 * 1024)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch

        size = draw_size(random.Random(f"{self.seed}:dl:{i}"), self.max_size)
        blob = _payload(f"{self.seed}:dl", i, size)
        return {"index": i, "pid": os.getpid(), "x": torch.full((16,), float(i)), "blob": blob,
                "crc": _crc(blob, i)}


# -- the runner ------------------------------------------------------------------------------------

def _child_pids():
    kids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                kids |= {int(t) for t in f.read().split()}
        except (FileNotFoundError, ProcessLookupError):
            pass
    return kids


def _proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return rest[0], int(rest[1])  # state, ppid
    except (OSError, IndexError, ValueError):
        return None, None


def _describe(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"pid {pid} state {_proc_state(pid)[0]} ({cmd[:80]})"


def _kill_child(pid):
    """SIGKILL pid through a pidfd, only if it is our live child (never a recycled pid)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        state, ppid = _proc_state(pid)  # checked after the pidfd pinned the process
        if ppid != os.getpid() or state in (None, "Z", "X"):
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class _Proc:
    """A process we started: its role and incarnation, when we started it, whether we killed it."""

    def __init__(self, proc, role, slot, inc, t_start):
        self.proc, self.role, self.slot, self.inc, self.t_start = proc, role, slot, inc, t_start
        self.killed = False


class _Run:
    def __init__(self, ctx, duration, faults, seed, max_size, hang_timeout):
        self.ctx = ctx
        self.duration, self.faults, self.seed = duration, faults, seed
        self.max_size, self.hang_timeout = max_size, hang_timeout
        self.stop = threading.Event()    # the load phase is over: channels finish
        self.abort = threading.Event()   # something hung: give up waiting
        self.lock = threading.Lock()
        self.zygote_kills = []           # monotonic times
        self.fault_counts = collections.Counter()
        self.unexpected = []             # descriptions of processes that died unasked

    def expected_death(self, p, exitcode):
        """Was this death one we caused (directly, or by killing the zygote that forked it)?"""
        if exitcode != -signal.SIGKILL:
            return False
        with self.lock:
            return p.killed or any(t >= p.t_start for t in self.zygote_kills)

    def start(self, target, args, name):
        """Start a process; retry while the zygote is being replaced. Returns (process, t_start)."""
        end = time.monotonic() + self.hang_timeout
        while True:
            t = time.monotonic()
            proc = self.ctx.Process(target=target, args=args, name=name, daemon=True)
            try:
                proc.start()
                return proc, t
            except Exception:
                if time.monotonic() > end or self.abort.is_set():
                    raise
                time.sleep(0.1)


class _Channel:
    name = ""

    def __init__(self, run):
        self.run = run
        self.stats = ChannelStats(self.name)
        self.lock = threading.Lock()
        self.last_progress = time.monotonic()
        self.errors = []                 # runner-side failures (a hang, an exception)
        self.hung = []
        self.thread = threading.Thread(target=self._main, name=f"stress-{self.name}", daemon=True)

    def _main(self):
        try:
            self.body()
        except BaseException:
            self.errors.append("runner error: " + traceback.format_exc().strip().splitlines()[-1])
            sys.stderr.write(traceback.format_exc())
            self.kill_all()

    def progress(self, n, nbytes):
        with self.lock:
            self.stats.messages += n
            self.stats.bytes += nbytes
            if n:
                self.last_progress = time.monotonic()

    def fault(self, kind):
        with self.lock:
            self.stats.faults += 1
        with self.run.lock:
            self.run.fault_counts[kind] += 1

    def victims(self):
        """[(kind, kill function)] that faults may choose from now."""
        return []

    def kill_all(self):
        pass

    def invariants(self):
        return []

    def _wait_until(self, cond, what, poll):
        """Call poll() until cond() holds; a hang (recorded) after hang_timeout."""
        end = time.monotonic() + self.run.hang_timeout
        while not cond():
            if time.monotonic() > end or self.run.abort.is_set():
                self.hung.append(what)
                return False
            poll()
        return True


class _ProcChannel(_Channel):
    """A channel whose processes (_Proc) it starts itself; faults kill them, one at a time."""

    def _procs(self):
        """The _Procs that may be killed now."""
        raise NotImplementedError

    def victims(self):
        return [(p.role, lambda p=p: self._kill(p)) for p in self._procs()
                if p.proc.exitcode is None and not p.killed]

    def _kill(self, p):
        with self.run.lock:
            p.killed = True
        p.proc.kill()
        self.fault(p.role)

    def kill_all(self):
        for p in self._procs():
            if p.proc.exitcode is None:
                with self.run.lock:
                    p.killed = True
                p.proc.kill()


class _QueueChannel(_ProcChannel):
    name = "queue"

    def __init__(self, run, producers=2, consumers=2):
        super().__init__(run)
        self.np, self.nc = producers, consumers
        self.q = ringpool.Queue()
        self.reports = ringpool.SimpleQueue()
        # slots: 0 stop producers, 1 consumers finish, then 3 per producer (puts returned, bytes,
        # end of the running call's seqs), then 3 per consumer (the third unused)
        self.shared = _Shared(2 + 3 * (producers + consumers))
        self.procs = {}                   # (role, slot) -> _Proc
        self.incs = collections.Counter()
        self.delivered = collections.defaultdict(list)
        self.finished, self.killed = {}, {}
        self.last_seq = {}                # (consumer slot, inc, producer slot, inc) -> last seq
        self.order_violations = self.checksum_errors = self.consumer_deaths = 0
        self.ended = set()                # incarnations that exited normally
        self.finishing = False

    def _idx(self, role, slot):
        return 2 + 3 * slot if role == "producer" else 2 + 3 * (self.np + slot)

    def _spawn(self, role, slot):
        inc = self.incs[(role, slot)]
        self.incs[(role, slot)] += 1
        idx = self._idx(role, slot)
        self.shared[idx] = 0
        self.shared[idx + 1] = 0
        self.shared[idx + 2] = 0
        r = self.run
        if role == "producer":
            args = (slot, inc, self.q, self.reports, self.shared, idx, r.seed, r.max_size, 0)
            target = _queue_producer
        else:
            args = (slot, inc, self.q, self.reports, self.shared, idx, 1, _CONSUMER_BATCH)
            target = _queue_consumer
        proc, t = r.start(target, args, f"stress-{role}-{slot}.{inc}")
        self.procs[(role, slot)] = _Proc(proc, role, slot, inc, t)

    def body(self):
        for s in range(self.np):
            self._spawn("producer", s)
        for s in range(self.nc):
            self._spawn("consumer", s)
        while not self.run.stop.is_set():
            self._pump(0.05)
            self._reap(restart=True)
        self.finishing = True
        self.shared[0] = 1
        self._wait_until(lambda: not any(k[0] == "producer" for k in self.procs), "queue producers did not finish",
                         self._poll)
        self.shared[1] = 1
        self._wait_until(lambda: not self.procs, "queue consumers did not finish", self._poll)
        self.kill_all()
        self._reap(restart=False)
        while self.reports._reader.poll(0.2):
            self._pump(0)
        # Whatever a consumer could not take (it hung, or died at the end) is still in the ring.
        while True:
            try:
                items = self.q.get_many(256, timeout=0.2)
            except queue.Empty:
                break
            self._receipts(("runner", 0), [(a, b, c) for a, b, c, *_ in items],
                           sum(1 for a, b, c, size, crc, p in items if _crc(p, a, b, c) != crc))

    def _poll(self):
        self._pump(0.05)
        self._reap(restart=False)

    def _pump(self, timeout):
        if not self.reports._reader.poll(timeout):
            return
        for rec in self.reports.get_many(1024):
            kind = rec[0]
            if kind == "rx":
                _, slot, inc, receipts, bad = rec
                self._receipts((slot, inc), receipts, bad)
            elif kind == "pdone":
                _, slot, inc, n = rec
                self.finished[(slot, inc)] = n
                self.ended.add(("producer", slot, inc))
            elif kind == "cdone":
                self.ended.add(("consumer", rec[1], rec[2]))

    def _receipts(self, consumer, receipts, bad):
        last = self.last_seq
        for pslot, pinc, seq in receipts:
            self.delivered[(pslot, pinc)].append(seq)
            k = (*consumer, pslot, pinc)
            if last.get(k, -1) >= seq:
                self.order_violations += 1
            last[k] = seq
        self.checksum_errors += bad
        self.progress(len(receipts), 0)  # bytes: from the consumers' counters, when they end

    def _reap(self, restart):
        for key, p in list(self.procs.items()):
            code = p.proc.exitcode
            if code is None:
                continue
            p.proc.join()
            idx = self._idx(p.role, p.slot)
            with self.lock:
                if p.role == "consumer":
                    self.stats.bytes += self.shared[idx + 1]
            if code != 0:
                if not self.run.expected_death(p, code):
                    self.run.unexpected.append(f"queue {p.role} {p.slot}.{p.inc}: exit code {code}")
                if p.role == "producer":
                    returned = self.shared[idx]
                    self.killed[(p.slot, p.inc)] = (returned, max(returned + 1, self.shared[idx + 2]))
                else:
                    self.consumer_deaths += 1
            elif not self.finishing:
                self.run.unexpected.append(f"queue {p.role} {p.slot}.{p.inc}: exited early (code 0)")
            p.proc.close()
            del self.procs[key]
            if restart and not self.run.stop.is_set():
                self._spawn(p.role, p.slot)

    def _procs(self):
        return list(self.procs.values())

    def ledger(self):
        return QueueLedger(delivered=dict(self.delivered), finished=dict(self.finished),
                           killed={k: v for k, v in self.killed.items() if k not in self.finished},
                           committed=self.q._chan.committed, consumed=self.q._chan.consumed,
                           consumer_deaths=self.consumer_deaths, order_violations=self.order_violations,
                           checksum_errors=self.checksum_errors)

    def invariants(self):
        led = self.ledger()
        lost = led.consumed - sum(len(v) for v in led.delivered.values())
        self.stats.notes.append(f"{len(led.finished)} producer incarnations finished, {len(led.killed)} killed; "
                                f"{self.consumer_deaths} consumers killed, {lost} messages lost in flight with them")
        return check_queue_ledger(led)

    def close(self):
        self.shared.close()
        self.q = self.reports = None


class _PipeChannel(_ProcChannel):
    name = "pipe"

    def __init__(self, run):
        super().__init__(run)
        self.inc = 0
        self.pair = None        # (pinger _Proc, echoer _Proc, shared)
        self.totals = collections.Counter()
        self.not_noticed = 0    # a survivor that did not see its peer die
        self.incomplete = 0     # normally ended pairs with replies missing
        self.window_exceeded = 0
        self.seen = 0

    def _spawn(self):
        inc = self.inc
        self.inc += 1
        shared = _Shared(9)
        a, b = ringpool.Pipe()
        r = self.run
        try:
            pa, ta = r.start(_pipe_pinger, (a, shared, r.seed, inc, r.max_size), f"stress-pinger.{inc}")
            pb, tb = r.start(_pipe_echoer, (b, shared, inc), f"stress-echoer.{inc}")
        finally:
            a.close()  # the processes hold the ends now: a dead one must read as EOF
            b.close()
        self.pair = (_Proc(pa, "producer", 0, inc, ta), _Proc(pb, "consumer", 0, inc, tb), shared)

    def body(self):
        self._spawn()
        while not self.run.stop.is_set():
            time.sleep(0.05)
            self._watch(restart=True)
        if self.pair is not None:
            self.pair[2][_P_STOP] = 1
            self._wait_until(lambda: self.pair is None, "pipe pair did not finish",
                             lambda: (time.sleep(0.05), self._watch(restart=False)))
        self.kill_all()
        while self.pair is not None:
            time.sleep(0.05)
            self._watch(restart=False, force=True)

    def _watch(self, restart, force=False):
        pa, pb, sh = self.pair
        ok = sh[_P_OK]
        self.progress(ok - self.seen, 0)
        self.seen = ok
        ca, cb = pa.proc.exitcode, pb.proc.exitcode
        if ca is None and cb is None:
            return
        if not force and (ca is None or cb is None):
            # One end is gone: the other must notice by itself (EOF / BrokenPipeError).
            dead = pa if ca is not None else pb
            live = pb if ca is not None else pa
            if not hasattr(dead, "t_dead"):
                dead.t_dead = time.monotonic()
            if time.monotonic() - dead.t_dead < self.run.hang_timeout:
                return
            self.not_noticed += 1
            with self.run.lock:
                live.killed = True
            live.proc.kill()
            live.proc.join(5)
            ca, cb = pa.proc.exitcode, pb.proc.exitcode
            if ca is None or cb is None:
                return
        killed = False
        for p, code in ((pa, ca), (pb, cb)):
            if code != 0:
                killed = True
                if not self.run.expected_death(p, code):
                    self.run.unexpected.append(f"pipe {'pinger' if p is pa else 'echoer'} {p.inc}: exit code {code}")
        sent, verified = sh[_P_SENT], sh[_P_OK]
        for i, k in enumerate(("sent", "verified", "errors", "bytes", "lost", "echoed", "echo_errors")):
            self.totals[k] += sh[i]
        with self.lock:
            self.stats.bytes += sh[_P_BYTES]
        if not killed and not sh[_P_LOST] and not sh[_E_LOST]:
            if sent != verified + sh[_P_ERR]:
                self.incomplete += 1
        elif sent - verified - sh[_P_ERR] > _PIPE_WINDOW:
            self.window_exceeded += 1
        pa.proc.close()
        pb.proc.close()
        sh.close()
        self.pair = None
        self.seen = 0
        if restart and not self.run.stop.is_set():
            self._spawn()

    def _procs(self):
        pair = self.pair
        return [] if pair is None else list(pair[:2])

    def invariants(self):
        t = self.totals
        self.stats.notes.append(f"{self.inc} pairs, {t['lost']} pingers saw EOF, {t['sent'] - t['verified']} "
                                f"messages in flight at a kill")
        return [
            Invariant("pipe: replies wrong (order, checksum, contents)", f"{t['errors']} (echoer saw {t['echo_errors']})",
                      t["errors"] == 0 and t["echo_errors"] == 0),
            Invariant("pipe: pairs ended normally with replies missing", str(self.incomplete), self.incomplete == 0),
            Invariant("pipe: killed pairs with more than a window lost", str(self.window_exceeded),
                      self.window_exceeded == 0),
            Invariant("pipe: survivor did not notice its peer's death", str(self.not_noticed), self.not_noticed == 0),
        ]


class _ExecutorChannel(_Channel):
    name = "executor"

    def __init__(self, run):
        super().__init__(run)
        self.ex = None
        self.killed_pids = set()
        self.died = collections.Counter()  # pid -> WorkerDied count
        self.died_unexplained = 0
        self.wrong = 0
        self.other_errors = []
        self.stuck = 0
        self.submitted = self.completed = 0

    def body(self):
        r = self.run
        self.ex = ex = ringpool.Executor(2, mp_context=r.ctx)
        rng = random.Random(f"{r.seed}:executor")
        pseed = f"{r.seed}:executor"
        inflight = {}
        nbytes = 0
        seq = 0
        while not r.stop.is_set():
            while len(inflight) < _EXEC_INFLIGHT and nbytes < _EXEC_BYTES:
                size = draw_size(rng, r.max_size)
                p = _payload(pseed, seq, size)
                key = (7, seq)
                f = ex.submit(_exec_task, p, _crc(p, *key), key)
                inflight[f] = (p, key, size, time.monotonic())
                nbytes += size
                seq += 1
                self.submitted += 1
            done, _ = cf.wait(list(inflight), timeout=0.2, return_when=cf.FIRST_COMPLETED)
            for f in done:
                nbytes -= self._check(f, inflight.pop(f))
            now = time.monotonic()
            if inflight and now - min(v[3] for v in inflight.values()) > r.hang_timeout:
                self.hung.append("an executor task did not complete within the hang timeout")
                break
        end = time.monotonic() + r.hang_timeout
        done, pending = cf.wait(list(inflight), timeout=max(end - time.monotonic(), 0))
        for f in done:
            self._check(f, inflight.pop(f))
        if pending:
            self.stuck += len(pending)
            self.hung.append(f"{len(pending)} executor futures never completed")
            self.kill_all()
        t = threading.Thread(target=ex.shutdown, kwargs={"wait": True}, daemon=True)
        t.start()
        t.join(r.hang_timeout)
        if t.is_alive():
            self.hung.append("Executor.shutdown did not return")

    def _check(self, f, info):
        p, key, size, _ = info
        try:
            pid, ok, back = f.result(0)
        except Exception as exc:
            if isinstance(exc, ringpool.WorkerDied):
                self.died[exc.pid] += 1
                with self.run.lock:
                    zygote_killed = bool(self.run.zygote_kills)
                if exc.exitcode != -signal.SIGKILL or not (exc.pid in self.killed_pids or zygote_killed):
                    self.died_unexplained += 1
            else:
                self.other_errors.append(f"{type(exc).__name__}: {exc}")
            return size
        good = ok and (back == p[::-1] if size <= _SMALL_ECHO else back == _crc(p, *key))
        if not good:
            self.wrong += 1
        self.completed += 1
        self.progress(1, size)
        return size

    def victims(self):
        ex = self.ex
        if ex is None or self.run.stop.is_set():
            return []
        return [("executor-worker", lambda pid=pid: self._kill(pid)) for pid in ex.worker_pids()]

    def _kill(self, pid):
        self.killed_pids.add(pid)
        if _kill_child(pid):
            self.fault("executor-worker")

    def kill_all(self):
        if self.ex is not None:
            for pid in self.ex.worker_pids():
                self.killed_pids.add(pid)
                _kill_child(pid)

    def invariants(self):
        dup = sum(n - 1 for n in self.died.values() if n > 1)
        nd = sum(self.died.values())
        self.stats.notes.append(f"{self.submitted} tasks submitted, {self.completed} correct, {nd} failed with WorkerDied")
        return [
            Invariant("executor: futures that never completed", str(self.stuck), self.stuck == 0),
            Invariant("executor: wrong results", str(self.wrong), self.wrong == 0),
            Invariant("executor: WorkerDied not explained by a SIGKILL we sent (or >1 per worker)",
                      f"{self.died_unexplained + dup} of {nd} WorkerDied", self.died_unexplained + dup == 0),
            Invariant("executor: other task errors", str(len(self.other_errors)) +
                      (f" ({self.other_errors[0]})" if self.other_errors else ""), not self.other_errors),
        ]


class _DataLoaderChannel(_Channel):
    name = "dataloader"

    def __init__(self, run):
        super().__init__(run)
        self.epochs = self.failed_expected = 0
        self.bad_epochs = []
        self.unexpected_errors = []
        self.pids = set()
        self.epoch_faults = 0
        self.abandoned = 0

    def body(self):
        import torch
        from torch.utils.data import DataLoader

        r = self.run
        ds = StressDataset(_DL_ITEMS, r.seed, r.max_size)
        g = torch.Generator()
        g.manual_seed(r.seed)
        loader = DataLoader(ds, batch_size=_DL_BATCH, shuffle=True, num_workers=2, generator=g,
                            multiprocessing_context=r.ctx)
        while not r.stop.is_set():
            with self.lock:
                self.epoch_faults = 0
                self.pids = set()
            seen = []
            bad = 0
            try:
                it = iter(loader)
                # DataLoader registers its workers with torch's SIGCHLD handler, which runs in the
                # main thread once any DataLoader there has installed it (earlier code in this
                # process may have): a killed worker of this thread's loader would then raise in
                # the main thread, wherever it is. This loader notices deaths itself (its status
                # poll), so take its workers out of that table.
                from torch.utils.data._utils import signal_handling

                if getattr(it, "_worker_pids_set", False):
                    signal_handling._remove_worker_pids(id(it))
                    it._worker_pids_set = False  # so its shutdown does not remove them again
                for batch in it:
                    idx = batch["index"].tolist()
                    with self.lock:
                        self.pids |= set(batch["pid"].tolist())
                    for j, i in enumerate(idx):
                        blob = batch["blob"][j]
                        if (batch["x"][j] != float(i)).any() or _crc(blob, i) != int(batch["crc"][j]):
                            bad += 1
                    seen += idx
                    self.progress(len(idx), sum(len(b) for b in batch["blob"]) + batch["x"].element_size() * batch["x"].nelement())
                    if r.stop.is_set():
                        break
                del it
            except Exception as exc:
                with self.lock:
                    faulted = self.epoch_faults
                if faulted or r.abort.is_set():
                    self.failed_expected += 1
                else:
                    self.unexpected_errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if r.stop.is_set() and len(seen) < len(ds):
                self.abandoned += 1
                break
            self.epochs += 1
            if bad or sorted(seen) != list(range(len(ds))):
                dups = len(seen) - len(set(seen))
                self.bad_epochs.append(f"epoch {self.epochs}: {len(set(seen))} distinct of {len(ds)}, "
                                       f"{dups} duplicates, {bad} corrupt")

    def victims(self):
        if self.run.stop.is_set():
            return []
        with self.lock:
            pids = list(self.pids)
        return [("dataloader-worker", lambda pid=pid: self._kill(pid)) for pid in pids]

    def _kill(self, pid):
        with self.lock:
            self.epoch_faults += 1
            self.pids.discard(pid)
        if _kill_child(pid):
            self.fault("dataloader-worker")

    def zygote_killed(self):
        with self.lock:
            self.epoch_faults += 1

    def invariants(self):
        self.stats.notes.append(f"{self.epochs} epochs complete, {self.failed_expected} ended by a fault "
                                f"(RuntimeError), {self.abandoned} cut short by the end of the run")
        return [
            Invariant("dataloader: epochs with an index missing, repeated or corrupt",
                      f"{len(self.bad_epochs)} of {self.epochs}" + (f" ({self.bad_epochs[0]})" if self.bad_epochs else ""),
                      not self.bad_epochs),
            Invariant("dataloader: epochs failed without a fault", str(len(self.unexpected_errors)) +
                      (f" ({self.unexpected_errors[0]})" if self.unexpected_errors else ""), not self.unexpected_errors),
        ]


_CHANNEL_CLASSES = {"queue": _QueueChannel, "pipe": _PipeChannel, "executor": _ExecutorChannel,
                    "dataloader": _DataLoaderChannel}


def _inject_faults(run, chans, rng, interval):
    """Until the load phase ends: every interval (0.5x..1.5x at random), SIGKILL one victim.
    The zygote is chosen 1 time in 10 (it takes a process of every channel with it)."""
    while not run.stop.wait(interval * rng.uniform(0.5, 1.5)):
        if rng.random() < 0.1:
            pid = run.ctx.zygote_pid()
            if pid is not None:
                with run.lock:
                    run.zygote_kills.append(time.monotonic())
                for c in chans:
                    if isinstance(c, _DataLoaderChannel):
                        c.zygote_killed()
                if _kill_child(pid):
                    with run.lock:
                        run.fault_counts["zygote"] += 1
                continue
        options = [v for c in chans for v in c.victims()]
        if options:
            rng.choice(options)[1]()


def _load(channels, duration, faults, seed, max_size, progress, hang_timeout, fault_interval, t0):
    """The load phase and the channels' own invariants. Everything it made (the context, the
    channels, their processes) is unreachable once it returns, so run() can check for leftovers."""
    preload = [m for m in ("numpy", "torch") if m in sys.modules and (m != "torch" or "dataloader" in channels)]
    ctx = ringpool.RingpoolContext(preload=preload, ready_timeout=max(hang_timeout, 60.0))
    r = _Run(ctx, duration, faults, seed, max_size, hang_timeout)
    ctx.ensure_running()
    chans = [_CHANNEL_CLASSES[name](r) for name in channels]
    for c in chans:
        c.thread.start()
    injector = None
    if faults:
        injector = threading.Thread(target=_inject_faults, args=(r, chans, random.Random(f"{seed}:faults"),
                                                                 fault_interval), daemon=True)
        injector.start()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(math.ceil(duration)), unit="s", file=sys.stderr, leave=False, desc="stress")
    hangs = []
    try:
        end = t0 + duration
        shown = 0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            time.sleep(min(0.25, end - now))
            now = time.monotonic()
            for c in chans:
                with c.lock:
                    idle = now - c.last_progress
                if idle > hang_timeout and c.thread.is_alive():
                    hangs.append(f"{c.name}: no progress for {idle:.0f} s")
                    c.last_progress = now
            if bar is not None:
                el = int(min(now - t0, duration))
                bar.update(el - shown)
                shown = el
                bar.set_postfix_str(" ".join(f"{c.name}={c.stats.messages}" for c in chans) +
                                    (f" faults={sum(r.fault_counts.values())}" if faults else ""), refresh=False)
    finally:
        r.stop.set()
        if bar is not None:
            bar.close()
    load_end = time.monotonic()
    if injector is not None:
        injector.join()
    # Each channel bounds each of its end steps by hang_timeout; past 2x, give up on it.
    deadline = time.monotonic() + 2 * hang_timeout
    for c in chans:
        c.thread.join(max(deadline - time.monotonic(), 0))
    stuck = [c for c in chans if c.thread.is_alive()]
    if stuck:
        r.abort.set()
        for c in stuck:
            hangs.append(f"{c.name}: did not finish within {2 * hang_timeout:g} s of the end")
            c.kill_all()
        for c in stuck:
            c.thread.join(hang_timeout)
    elapsed = load_end - t0

    invariants = []
    for c in chans:
        if c.thread.is_alive():
            invariants.append(Invariant(f"{c.name}: channel finished", "still running", False))
            continue
        invariants += c.invariants()
        if c.errors:
            invariants.append(Invariant(f"{c.name}: runner errors", "; ".join(c.errors), False))
    for c in chans:
        hangs += [f"{c.name}: {h}" for h in c.hung]
    invariants.append(Invariant("hangs (no progress for hang timeout, or an end step timed out)",
                                "; ".join(hangs) if hangs else "0", not hangs))
    invariants.append(Invariant("processes that died without a fault (or not by SIGKILL)",
                                "; ".join(r.unexpected[:3]) + (f" (+{len(r.unexpected) - 3})" if len(r.unexpected) > 3 else "")
                                if r.unexpected else "0", not r.unexpected))
    stats = {c.name: c.stats for c in chans}
    for c in chans:
        if isinstance(c, _QueueChannel):
            c.close()
    ctx.shutdown()
    return stats, invariants, dict(r.fault_counts), elapsed


def _new_fds(before):
    """Descriptors opened since `before`: (unexplained ones, number of out-of-band block memfds,
    their data bytes). By design (runtime/src/block.cpp) the sender's BlockPool keeps up to 1 GiB
    of blocks it sent, for reuse, and the reader's BlockCache keeps recently received blocks
    mapped, up to 512 MiB; each holds the block's descriptor. The runtime log's eventfd is one per
    process, for its lifetime, made with its first zygote (docs/design/logging.md). Everything
    else is a leak."""
    leaked, pooled, nbytes = [], 0, 0
    log_fd = str(_core.log_fd())
    for fd in sorted(set(os.listdir("/proc/self/fd")) - before - {log_fd}, key=int):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            size = os.fstat(int(fd)).st_size
        except OSError:
            continue  # the listdir's own descriptor, closed since
        if target.startswith("/memfd:ringpool-block"):
            pooled += 1
            nbytes += size - _PAGE  # the pool counts each block's data area, not its header page
        else:
            leaked.append(f"{fd}->{target}")
    return leaked, pooled, nbytes


def _foreign_shm_entry(name):
    """Whether a new /dev/shm entry cannot be this run's: the stdlib's semaphores (``sem.mp-*``,
    named by design), and loky's (``sem.loky-*``, joblib's backend) while loky was never imported
    here (other programs on the machine, e.g. a joblib benchmark, make them during the run)."""
    if name.startswith("sem.mp-"):
        return True
    return name.startswith("sem.loky-") and not any(m == "loky" or m.startswith(("loky.", "joblib.externals.loky"))
                                                   for m in sys.modules)


def _shm_entries():
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def run(duration=30.0, faults=False, seed=None, channels=CHANNELS, max_size=MAX_SIZE, progress=False,
        hang_timeout=30.0, fault_interval=1.0):
    """Run the stress load and return a Report (``report.passed`` says whether every invariant
    held). Call from the main thread of a process that has no other ringpool workers running
    (the leftover-children check counts every child). Ends within duration + about
    3 x hang_timeout even if something hangs."""
    channels = [c for c in CHANNELS if c in set(channels)]
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    max_size = max(0, min(int(max_size), MAX_SIZE))
    notes = {}
    if "dataloader" in channels:
        try:
            import torch  # noqa: F401  (before the descriptor baseline: torch's own are not ours)
            import torch.utils.data  # noqa: F401
        except ImportError as exc:
            channels.remove("dataloader")
            notes["dataloader"] = f"skipped: {exc}"
    try:
        import numpy  # noqa: F401
    except ImportError:
        pass
    machine = _machine()
    # Other contexts of this process (earlier work) refill their zygotes' spare workers about
    # 100 ms after their last start: let that settle, so their spares and pidfds are part of the
    # baseline and not counted as ours.
    settle_end = time.monotonic() + 5.0
    last = None
    while time.monotonic() < settle_end:
        gc.collect()
        now = (_child_pids(), len(os.listdir("/proc/self/fd")))
        if now == last:
            break
        last = now
        time.sleep(0.5)
    # The stdlib's resource tracker (a child process and a pipe) lives until this process exits,
    # by the stdlib's design, once started: the first worker start starts it, as under spawn
    # (every worker shares it), and so do DataLoader's Events (SemLocks). Part of the baseline.
    resource_tracker.ensure_running()
    fds_before = set(os.listdir("/proc/self/fd"))
    pool_before = _core.block_pool_bytes()  # blocks pooled by earlier work of this process
    shm_before = _shm_entries()
    kids_before = _child_pids()

    t0 = time.monotonic()
    stats, invariants, fault_counts, elapsed = _load(channels, duration, faults, seed, max_size, progress,
                                                     hang_timeout, fault_interval, t0)
    for name, note in notes.items():
        stats[name] = ChannelStats(name, notes=[note])

    # -- what must be left behind: nothing (_load has returned: its context is unreachable) ------
    end = time.monotonic() + 10
    while True:
        gc.collect()
        kids = _child_pids() - kids_before
        if not kids or time.monotonic() > end:
            break
        time.sleep(0.1)
    states = {pid: _proc_state(pid)[0] for pid in kids}
    zombies = sorted(p for p, s in states.items() if s == "Z")
    live = sorted(p for p, s in states.items() if s not in ("Z", None))
    invariants.append(Invariant("children left after shutdown (10 s)",
                                f"{len(live)}: " + ", ".join(_describe(p) for p in live[:3]) if live else "0", not live))
    invariants.append(Invariant("zombies", f"{len(zombies)} {zombies[:5]}" if zombies else "0", not zombies))
    leaked_fds, pooled, pooled_bytes = _new_fds(fds_before)
    # Below its 1 GiB budget the pool only grows, so its growth is exactly the blocks added since.
    pool_bytes = _core.block_pool_bytes() - pool_before
    invariants.append(Invariant("descriptors leaked in the runner (besides out-of-band block caches)",
                                f"{len(leaked_fds)} {leaked_fds[:4]}" if leaked_fds else f"0 ({len(fds_before)} before)",
                                not leaked_fds))
    # The reader side keeps the mappings (and descriptors) of recently received blocks, up to its
    # own budget; it has no counter we can read, so its share is bounded, not matched.
    reader = pooled_bytes - pool_bytes
    invariants.append(Invariant("block descriptors: sender pool == block_pool_bytes, reader cache <= 512 MiB",
                                f"{pooled} memfds, {pooled_bytes / MiB:.1f} MiB = {pool_bytes / MiB:.1f} pool + "
                                f"{reader / MiB:.1f} reader cache", 0 <= reader <= _READER_CACHE))
    shm_new = sorted(e for e in _shm_entries() - shm_before if not _foreign_shm_entry(e))
    invariants.append(Invariant("new /dev/shm entries", f"{len(shm_new)} {shm_new[:4]}" if shm_new else "0",
                                not shm_new))
    total = time.monotonic() - t0
    bound = duration + 3 * hang_timeout + 30
    invariants.append(Invariant("run ended in time (duration + 3 x hang timeout + 30 s)",
                                f"{total:.1f} s <= {bound:g} s", total <= bound))
    return Report(duration=duration, elapsed=elapsed, seed=seed, faults_enabled=bool(faults), max_size=max_size,
                  machine=machine, channels=stats, invariants=invariants, faults=fault_counts)


# -- command line ------------------------------------------------------------------------------------

def _size_arg(text):
    t = text.strip().lower()
    mult = 1
    for suffix, m in (("kib", 1 << 10), ("mib", 1 << 20), ("gib", 1 << 30), ("k", 1 << 10), ("m", 1 << 20),
                      ("g", 1 << 30), ("b", 1)):
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], m
            break
    try:
        n = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("size must be >= 0")
    return n


def _channels_arg(text):
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CHANNELS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown channel(s) {bad}; choose from {','.join(CHANNELS)}")
    return names


def _positive(text):
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def add_arguments(p):
    """The ``stress`` command's options."""
    p.add_argument("--duration", type=_positive, default=30.0, metavar="SECONDS",
                   help="length of the load phase (default 30)")
    p.add_argument("--faults", action="store_true",
                   help="SIGKILL random producers, consumers, workers and the zygote during the run")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--channels", type=_channels_arg, default=list(CHANNELS), metavar="LIST",
                   help=f"comma-separated subset of {','.join(CHANNELS)} (default: all)")
    p.add_argument("--max-size", type=_size_arg, default=MAX_SIZE, metavar="BYTES",
                   help="largest message (default 64MiB, which is also the cap; suffixes K, M, G)")
    p.add_argument("--hang-timeout", type=_positive, default=30.0, metavar="SECONDS",
                   help="a channel without progress this long is a hang (default 30)")
    p.add_argument("--fault-interval", type=_positive, default=1.0, metavar="SECONDS",
                   help="mean time between faults (default 1)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--progress", action="store_true", help="progress bar on stderr even if it is not a tty")


def main(args):
    """Run the stress command; exit code 0 if every invariant held, 1 otherwise."""
    rep = run(duration=args.duration, faults=args.faults, seed=args.seed, channels=args.channels,
              max_size=args.max_size, progress=args.progress or sys.stderr.isatty(),
              hang_timeout=args.hang_timeout, fault_interval=args.fault_interval)
    print(rep.to_markdown(), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep.to_dict(), f, indent=2)
    return 0 if rep.passed else 1
