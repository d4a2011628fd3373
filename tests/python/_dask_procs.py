"""Real dask schedulers and workers for the cluster tests and benchmark: subprocesses, each in its
own process group, killed with their whole group when the test ends, even on failure. (A process
group, not a session: with the kernel's autogroup scheduling a new session would get its own share
of the CPU, and a benchmark would compare processes with unequal shares.)"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

PY = "/usr/bin/python3"
BINDINGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bindings")
# Quiet logs, no dashboard, short waits: what a test needs from dask's defaults.
_ENV = {
    "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "warning",
    "DASK_DISTRIBUTED__ADMIN__TICK__LIMIT": "60s",
}


def kill_group(proc, timeout=10):
    """SIGTERM the process group, then SIGKILL what is left; reap the leader."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout)
            # The leader is gone; make sure no member of its group is left either.
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


class Procs:
    """Started processes (a test's finalizer calls close())."""

    def __init__(self):
        self.procs = []
        self.tmp = tempfile.TemporaryDirectory(prefix="ringpool-dask-")

    def start(self, argv, env=None, cwd=None, prefix=(), pythonpath=BINDINGS, log="proc"):
        e = dict(os.environ)
        e.update(_ENV)
        e.pop("PYTHONPATH", None)
        if pythonpath:
            e["PYTHONPATH"] = pythonpath
        e.update(env or {})
        out = open(os.path.join(self.tmp.name, f"{log}-{len(self.procs)}.log"), "wb")
        p = subprocess.Popen([*prefix, *argv], env=e, cwd=cwd or self.tmp.name, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, process_group=0)
        p.log_path = out.name
        out.close()
        self.procs.append(p)
        return p

    def scheduler(self, host="127.0.0.1", prefix=(), env=None, pythonpath=BINDINGS):
        f = os.path.join(self.tmp.name, f"scheduler-{len(self.procs)}.json")
        p = self.start([PY, "-m", "distributed.cli.dask_scheduler", "--host", host, "--port", "0",
                        "--no-dashboard", "--scheduler-file", f], prefix=prefix, env=env, pythonpath=pythonpath,
                       log="scheduler")
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if os.path.exists(f):
                try:
                    with open(f) as fh:
                        return p, json.load(fh)["address"]
                except ValueError:
                    pass  # being written
            if p.poll() is not None:
                raise RuntimeError(f"dask scheduler exited with {p.returncode}: {self.log(p)}")
            time.sleep(0.1)
        raise RuntimeError(f"dask scheduler did not start within 60 s: {self.log(p)}")

    def worker(self, address, name, nthreads=1, nanny=True, prefix=(), cwd=None, env=None, pythonpath=BINDINGS,
               extra=()):
        d = cwd or os.path.join(self.tmp.name, name)
        os.makedirs(d, exist_ok=True)
        argv = [PY, "-m", "distributed.cli.dask_worker", address, "--nthreads", str(nthreads), "--name", name,
                "--no-dashboard", "--local-directory", d, "--death-timeout", "60",
                "--nanny" if nanny else "--no-nanny", *extra]
        return self.start(argv, cwd=d, prefix=prefix, env=env, pythonpath=pythonpath, log=name)

    def log(self, p):
        try:
            with open(p.log_path, "rb") as f:
                return f.read()[-4000:].decode(errors="replace")
        except OSError:
            return ""

    def close(self):
        for p in reversed(self.procs):
            kill_group(p)
        self.procs.clear()
        self.tmp.cleanup()


def wait_workers(client, n, timeout=90):
    client.wait_for_workers(n, timeout=timeout)
    return sorted(client.scheduler_info()["workers"])
