"""Exactly-once delivery under load and with processes SIGKILLed mid-operation (tier: stress)."""
import multiprocessing as mp
import os
import queue
import signal
import time

import pytest

import ringpool
from conftest import children

pytestmark = [pytest.mark.stress, pytest.mark.timeout(300)]

CTX = mp.get_context("fork")


def _producer(q, pid_idx, n, batch):
    if batch:
        for start in range(0, n, batch):
            q.put_many([(pid_idx, i) for i in range(start, min(n, start + batch))])
    else:
        for i in range(n):
            q.put((pid_idx, i))


def _consumer(q, results, nprod, batch):
    last = [-1] * nprod
    count = 0
    checksum = 0
    errors = 0
    while True:
        items = q.get_many(batch, timeout=60) if batch else [q.get(timeout=60)]
        stop = 0
        for it in items:
            if it is None:
                stop += 1
                continue
            p, i = it
            if i <= last[p]:
                errors += 1  # duplicated or reordered within one producer
            last[p] = i
            count += 1
            checksum += p * 1_000_003 + i
        if stop:
            for _ in range(stop - 1):
                q.put(None)  # leave the other consumers their sentinel
            break
    results.put((count, checksum, errors))


@pytest.mark.parametrize("n_per, batch", [(250_000, 512), (25_000, 0)], ids=["1M-batched", "100k-plain"])
def test_exactly_once_fifo_4_producers_2_consumers(n_per, batch, no_shm_leak):
    nprod, ncons = 4, 2
    q = ringpool.Queue()
    results = CTX.SimpleQueue()
    with children(timeout=240) as procs:
        cons = [CTX.Process(target=_consumer, args=(q, results, nprod, batch)) for _ in range(ncons)]
        prods = [CTX.Process(target=_producer, args=(q, p, n_per, batch)) for p in range(nprod)]
        for p in cons + prods:
            p.start()
            procs.append(p)
        for p in prods:
            p.join(240)
            assert p.exitcode == 0
        for _ in range(ncons):
            q.put(None)
        got = [results.get() for _ in range(ncons)]
    total = sum(c for c, _, _ in got)
    checksum = sum(s for _, s, _ in got)
    assert sum(e for _, _, e in got) == 0
    assert total == nprod * n_per
    assert checksum == sum(p * 1_000_003 * n_per + n_per * (n_per - 1) // 2 for p in range(nprod))
    assert q.qsize() == 0


def _sized_producer(q, pid_idx, n):
    for i in range(n):
        # Mix inline and out-of-band frames so a kill can land inside either kind of put.
        size = (i * 7919) % 3000 if i % 10 else 300_000
        q.put((pid_idx, i, b"x" * size))


def test_producer_killed_mid_put(no_shm_leak):
    q = ringpool.Queue(capacity=1 << 16)
    n = 3000
    with children() as procs:
        prods = [CTX.Process(target=_sized_producer, args=(q, p, n)) for p in range(3)]
        for p in prods:
            p.start()
            procs.append(p)
        seen = {0: [], 1: [], 2: []}
        victim = prods[0]
        deadline = time.monotonic() + 120
        killed = False
        while (len(seen[1]) < n or len(seen[2]) < n) and time.monotonic() < deadline:
            try:
                p, i, data = q.get(timeout=1)
            except queue.Empty:
                continue
            assert len(data) == ((i * 7919) % 3000 if i % 10 else 300_000)
            seen[p].append(i)
            if not killed and len(seen[0]) > 200:
                os.kill(victim.pid, signal.SIGKILL)
                killed = True
        # Drain whatever the victim committed before it died.
        while True:
            try:
                p, i, _ = q.get(timeout=0.5)
                seen[p].append(i)
            except queue.Empty:
                break
    assert killed and victim.exitcode == -signal.SIGKILL
    assert seen[1] == list(range(n)) and seen[2] == list(range(n))
    assert seen[0] == list(range(len(seen[0])))  # a prefix: nothing duplicated, nothing skipped
    # The ring is still fully usable.
    q.put("after")
    assert q.get(timeout=5) == "after"


def _recording_consumer(q, marks):
    while True:
        i = q.get(timeout=60)
        if i is None:
            return
        marks[i] += 1


def test_consumer_killed_mid_get(no_shm_leak):
    n = 20000
    q = ringpool.Queue(capacity=1 << 16)
    marks = CTX.Array("b", n, lock=False)
    with children() as procs:
        cons = [CTX.Process(target=_recording_consumer, args=(q, marks)) for _ in range(2)]
        for p in cons:
            p.start()
            procs.append(p)
        for i in range(n):
            q.put(i)
            if i == n // 4:
                time.sleep(0.05)
                os.kill(cons[0].pid, signal.SIGKILL)
        q.put(None)
    assert cons[0].exitcode == -signal.SIGKILL and cons[1].exitcode == 0
    counts = list(marks)
    assert max(counts) == 1, "a message was delivered twice"
    assert counts.count(0) <= 1, "more than the message the victim had taken was lost"
