"""ringpool.stress (`python -m ringpool stress`, the stress runner): the accounting checker on
synthetic ledgers, a short faulted run of every channel, and the command line. (test_stress.py
holds the queue's own exactly-once stress tests.)"""
import json
import os
import random
import subprocess
import sys

import pytest

from ringpool import stress
from ringpool.stress import QueueLedger, check_queue_ledger

BINDINGS = os.path.join(os.path.dirname(__file__), "..", "..", "bindings")


def _failed(led):
    return [i.name for i in check_queue_ledger(led) if not i.ok]


def _clean(n=10):
    """Two producers that finished with n messages each, every one delivered once."""
    return QueueLedger(delivered={(0, 0): list(range(n)), (1, 0): list(range(n))},
                       finished={(0, 0): n, (1, 0): n}, killed={}, committed=2 * n, consumed=2 * n)


def test_ledger_clean_run_passes():
    assert _failed(_clean()) == []


def test_ledger_duplicate_fails():
    led = _clean()
    led.delivered[(0, 0)].append(3)
    led.consumed += 1  # a frame delivered twice still counts once in the ring...
    led.committed += 1
    assert "queue: duplicates" in _failed(led)


def test_ledger_missing_message_without_a_consumer_death_fails():
    led = _clean()
    led.delivered[(1, 0)].remove(4)
    failed = _failed(led)
    assert any("lost in flight" in f for f in failed)
    assert any("committed == delivered" in f for f in failed) or failed


def test_ledger_losses_by_a_killed_consumer_are_bounded():
    led = _clean(200)
    for s in range(50, 60):          # one batch taken by a consumer that died before its receipt
        led.delivered[(0, 0)].remove(s)
    led.consumer_deaths = 1
    assert _failed(led) == []
    led.consumer_deaths = 0           # the same gap without a death is a loss
    assert _failed(led)
    led.consumer_deaths = 1
    for s in range(100, 100 + led.batch):  # more than one batch per death
        led.delivered[(1, 0)].remove(s)
    assert any("lost in flight" in f for f in _failed(led))


def test_ledger_killed_producer_prefix_and_tail():
    # Killed after 30 puts returned; 25 delivered; seqs 25..30 may have been published and taken
    # by a killed consumer (tail), or never published (lost with the producer's local buffer).
    led = QueueLedger(delivered={(0, 0): list(range(25))}, finished={}, killed={(0, 0): (30, 31)},
                      committed=28, consumed=28, consumer_deaths=1)
    assert _failed(led) == []
    led.consumer_deaths = 0
    assert _failed(led)               # 3 published frames vanished without a consumer death
    # A delivery past what the producer could have put is never acceptable.
    led = QueueLedger(delivered={(0, 0): [0, 1, 2, 40]}, finished={}, killed={(0, 0): (30, 31)},
                      committed=4, consumed=4)
    assert any("no producer put" in f for f in _failed(led))


def test_ledger_killed_producer_inside_put_many():
    # Killed inside a put_many of seqs 30..39 after 30 puts had returned: it may have published
    # the whole batch, but nothing past it.
    led = QueueLedger(delivered={(0, 0): list(range(40))}, finished={}, killed={(0, 0): (30, 40)},
                      committed=40, consumed=40)
    assert _failed(led) == []
    led = QueueLedger(delivered={(0, 0): list(range(41))}, finished={}, killed={(0, 0): (30, 40)},
                      committed=41, consumed=41)
    assert any("no producer put" in f for f in _failed(led))
    # Counted as a plain put instead, the same batch is reported.
    led = QueueLedger(delivered={(0, 0): list(range(40))}, finished={}, killed={(0, 0): (30, 31)},
                      committed=40, consumed=40)
    assert any("no producer put" in f for f in _failed(led))


def test_ledger_unconsumed_frames_and_order_and_checksums():
    led = _clean()
    led.committed += 2
    assert any("ring drained" in f for f in _failed(led))
    led = _clean()
    led.order_violations = 1
    led.checksum_errors = 2
    failed = _failed(led)
    assert any("FIFO" in f for f in failed) and any("checksums" in f for f in failed)


def test_size_distribution_covers_zero_to_max():
    rng = random.Random(5)
    sizes = [stress.draw_size(rng) for _ in range(20000)]
    assert min(sizes) == 0 and max(sizes) <= stress.MAX_SIZE
    assert sum(s > stress.MiB for s in sizes) > 100          # large ones occur
    assert sum(s <= 4096 for s in sizes) / len(sizes) > 0.8  # mostly small
    assert max(stress.draw_size(rng, 1000) for _ in range(1000)) <= 1000


@pytest.mark.stress
@pytest.mark.timeout(150)
def test_short_run_with_faults_passes_and_moves_data():
    # In a process of its own, as the runner asks ("no other ringpool workers running"): its
    # leftover checks count every child, descriptor and /dev/shm entry of the process, and
    # earlier tests in this one (a zygote's spare exiting late, loky's semaphores) would count.
    code = ("import json, sys; from ringpool import stress\n"
            "rep = stress.run(duration=8, faults=True, seed=1234, max_size=8 << 20, fault_interval=0.4, "
            "hang_timeout=40)\n"
            "print(json.dumps({'report': rep.to_dict(), 'text': rep.to_markdown()}))\n")
    env = dict(os.environ, PYTHONPATH=BINDINGS)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=140, env=env)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    rep, text = out["report"], out["text"]
    assert rep["passed"], text
    for name in stress.CHANNELS:
        assert rep["channels"][name]["messages"] > 0, text
    assert sum(rep["faults"].values()) >= 5, text


def _cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=BINDINGS)
    return subprocess.run([sys.executable, "-m", "ringpool", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.timeout(150)
def test_cli_short_queue_run(tmp_path):
    out = tmp_path / "report.json"
    p = _cli("stress", "--duration", "3", "--channels", "queue", "--max-size", "1M", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| queue |" in p.stdout and "| invariant | value | result |" in p.stdout and "PASSED" in p.stdout
    rep = json.loads(out.read_text())
    assert rep["passed"] and rep["channels"]["queue"]["messages"] > 0


@pytest.mark.timeout(60)
def test_cli_help_and_usage_errors():
    p = _cli("--help")
    assert p.returncode == 0 and "stress" in p.stdout
    p = _cli("stress", "--help")
    assert p.returncode == 0 and "--faults" in p.stdout and "--max-size" in p.stdout
    assert _cli("stress", "--channels", "queue,nope").returncode == 2
    assert _cli("stress", "--duration", "-1").returncode == 2
    assert _cli().returncode == 2
