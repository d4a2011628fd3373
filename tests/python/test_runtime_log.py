"""ringpool._runtime_log: the C++ supervisor's lifecycle events in ``logging``."""
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

import ringpool
from ringpool import _runtime_log

pytestmark = pytest.mark.integration

BINDINGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bindings")


def _sleep(t):
    time.sleep(t)


def _wait_for(caplog, event, deadline=60):
    """The records of `event`, once there is one (logged by the "ringpool-log" thread: no flush)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        got = [r for r in caplog.records if getattr(r, "event", None) == event]
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"no {event} record in {[r.getMessage() for r in caplog.records]}")


def _kill_zygote(ctx):
    p = ctx.Process(target=_sleep, args=(60,))
    p.start()
    zygote = ctx.zygote_pid()
    os.kill(zygote, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL  # killed with its zygote
    return zygote


def test_a_zygote_death_is_logged_by_the_log_thread_with_its_pid_and_status(caplog):
    ctx = ringpool.RingpoolContext(preload=())
    try:
        with caplog.at_level("WARNING", logger="ringpool"):
            zygote = _kill_zygote(ctx)
            (died,) = _wait_for(caplog, "zygote_died")
    finally:
        ctx.shutdown()
    assert (died.name, died.levelname, died.ringpool_pid, died.exit_code) == \
        ("ringpool.spawner", "WARNING", zygote, -signal.SIGKILL)
    msg = died.getMessage()
    assert f"ringpool zygote (pid {zygote}) exited with code -9" in msg, msg
    assert "killing the 1 worker(s) it forked" in msg and msg.endswith(f"for {ctx!r}"), msg


def test_a_failing_filter_is_reported_and_the_next_record_still_arrives(caplog, monkeypatch, capsys):
    class Boom(logging.Filter):
        calls = 0  # the runtime's records seen (the first one raises)

        def filter(self, record):
            if getattr(record, "event", "").startswith("zygote_"):  # not Popen's own records
                Boom.calls += 1
                if Boom.calls == 1:
                    raise RuntimeError("a broken filter")
            return True

    log = logging.getLogger("ringpool.spawner")
    boom = Boom()
    log.addFilter(boom)
    ctx = ringpool.RingpoolContext(preload=())
    try:
        with caplog.at_level("DEBUG", logger="ringpool"):
            _kill_zygote(ctx)
            _kill_zygote(ctx)  # the first death went to the broken filter; this one must arrive
            started = _wait_for(caplog, "zygote_restarted")
    finally:
        log.removeFilter(boom)
        ctx.shutdown()
    assert Boom.calls >= 2 and started[0].levelname == "INFO"
    assert "a broken filter" in capsys.readouterr().err  # reported as logging reports its own errors


def test_silent_by_default_and_no_deadlock_with_a_thread_holding_the_gil():
    # An application that configures no logging prints nothing when its zygote dies. The
    # supervisor's records are queued while the main thread, holding the GIL, joins the
    # supervisor's thread (shutdown() dropping the last reference) right after the death: the
    # runtime never waits for the GIL, so this ends; then the same with logging configured and a
    # slow handler.
    code = ("import os, signal, sys, time, logging, ringpool\n"
            "def nap(t): time.sleep(t)\n"
            "def run():\n"
            "    for i in range(3):\n"
            "        ctx = ringpool.RingpoolContext(preload=())\n"
            "        p = ctx.Process(target=nap, args=(0,)); p.start(); p.join(30)\n"
            "        os.kill(ctx.zygote_pid(), signal.SIGKILL)\n"
            "        ctx.shutdown()\n"
            "if __name__ == '__main__':\n"
            "    run()\n"
            "    print('quiet')\n"
            "    class Slow(logging.Handler):\n"
            "        def emit(self, r): time.sleep(0.05); print(r.levelname, getattr(r, 'event', '-'), flush=True)\n"
            "    logging.getLogger('ringpool').addHandler(Slow()); logging.getLogger('ringpool').setLevel('DEBUG')\n"
            "    run()\n"
            "    from ringpool import _runtime_log; _runtime_log.flush()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=150,
                       env={**os.environ, "PYTHONPATH": BINDINGS})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "quiet", lines
    assert "INFO zygote_started" in lines[1:], lines


def test_a_forked_child_logs_its_own_supervisors_events(caplog):
    # The parent's queue and thread are not the child's: it gets its own.
    ctx = ringpool.RingpoolContext(preload=())
    try:
        ctx.ensure_running()  # the parent's log thread runs
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                got = []

                class Keep(logging.Handler):
                    def emit(self, record):
                        got.append(getattr(record, "event", ""))

                logging.getLogger("ringpool").addHandler(Keep())
                logging.getLogger("ringpool").setLevel("INFO")
                child = ringpool.RingpoolContext(preload=())
                child.ensure_running()
                _runtime_log.flush()
                child.shutdown()
                os.write(w, ",".join(got).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            out = f.read().decode()
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        ctx.shutdown()
    assert "zygote_started" in out.split(","), out


def test_a_preload_failure_is_logged_in_one_line_naming_the_error(caplog):
    ctx = ringpool.RingpoolContext(preload=["rp_no_such_module"])
    try:
        with caplog.at_level("WARNING", logger="ringpool"):
            with pytest.raises(RuntimeError, match="rp_no_such_module"):
                ctx.ensure_running()
            (died,) = _wait_for(caplog, "zygote_died")
    finally:
        ctx.shutdown()
    msg = died.getMessage()
    assert "\n" not in msg and "failed to preload" in msg, msg
    assert "ModuleNotFoundError: No module named 'rp_no_such_module' (before it was ready)" in msg, msg
