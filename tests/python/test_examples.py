"""Each program in examples/python/ runs as a user would run it, as a subprocess with a deadline,
and prints what its docstring promises. Its workers must not outlive it.

The examples are for reading; these tests keep them working. Each runs in its own session, so that
a hang is ended (the whole process group killed) and reported with the output so far.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import BINDINGS

EXAMPLES = os.path.join(os.path.dirname(BINDINGS), "examples", "python")
DEADLINE = 180  # seconds; the slowest (DataLoader, torch import) takes ~5 s on a quiet machine

pytestmark = [pytest.mark.integration, pytest.mark.timeout(DEADLINE + 60)]


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def run_example(name, *args):
    env = dict(os.environ, PYTHONPATH=BINDINGS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, name), *args], env=env, cwd=EXAMPLES,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{name} did not finish within {DEADLINE}s\nstdout:\n{out}\nstderr:\n{err}")
    # Everything the example started is gone soon after it exits (its pgid is its pid).
    end = time.monotonic() + 15
    while group_alive(proc.pid) and time.monotonic() < end:
        time.sleep(0.05)
    leftover = group_alive(proc.pid)
    if leftover:
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    assert not leftover, f"processes of {name} outlived it"
    return out, err


def test_dataloader_training():
    out, _ = run_example("dataloader_training.py", "--epochs", "3", "--workers", "2")
    losses = [float(v) for v in re.findall(r"^epoch \d+: loss ([0-9.]+)$", out, re.M)]
    assert len(losses) == 3, out
    assert losses[-1] < losses[0] and losses[-1] < 0.05, out
    m = re.search(r"^learned y = ([-0-9.]+)x ([-+][0-9.]+) ", out, re.M)
    assert m, out
    assert abs(float(m.group(1)) - 3) < 0.1 and abs(float(m.group(2)) + 1) < 0.1, out


def test_process_pool():
    out, _ = run_example("process_pool.py")
    assert "ProcessPoolExecutor: 9592 primes below 100000" in out  # pi(10^5) = 9592
    assert "Pool.map: [True, False, True, False, True]" in out
    assert "Process + Queue: ('from a worker', 168)" in out  # pi(1000) = 168
    assert "exit code: 0" in out
    assert "start method: ringpool" in out


def test_executor_map_with_progress():
    pytest.importorskip("tqdm")
    out, err = run_example("executor_map.py", "--progress")
    expected_sum = sum((x * 2654435761) % 1000 for x in range(200_000))
    assert re.search(rf"^map: 200000 tasks, sum {expected_sum}, [0-9,]+ tasks/s$", out, re.M), out
    assert "submit: 1024" in out
    assert f"imap_unordered: total length {sum(len(f'line {i}') for i in range(50_000))}" in out
    assert "a worker died: WorkerDied" in out
    assert f"the pool goes on: {(7 * 2654435761) % 1000}" in out
    assert "200000/200000" in err  # tqdm's bar reached the end


def test_code_from_folder():
    out, _ = run_example("code_from_folder.py")
    lines = out.splitlines()
    m = re.match(r"version 1: area 9 \(worker pid (\d+), parent (\d+)\)$", lines[0])
    assert m and m.group(1) != m.group(2), out
    assert lines[1:] == ["version 2: area 16 after reload", "version 2: area 25 with the folder deleted"], out
    # The example edits a copy: the shipped package is unchanged.
    with open(os.path.join(EXAMPLES, "plugins", "geometry", "__init__.py")) as f:
        assert "VERSION = 1" in f.read()


def test_joblib_backend():
    pytest.importorskip("joblib")
    out, _ = run_example("joblib_backend.py")

    def steps(n):
        s = 0
        while n != 1:
            n, s = (3 * n + 1 if n % 2 else n // 2), s + 1
        return s

    all_steps = [steps(n) for n in range(1, 20_001)]
    best = all_steps.index(max(all_steps)) + 1
    assert f"longest Collatz chain below 20001: {best} ({max(all_steps)} steps)" in out
    assert "roots: [1.0, 2.0, 3.0]" in out
    assert "error from a worker: negative input -4" in out
