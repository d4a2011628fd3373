"""Tier: CPython's own multiprocessing test suite under the "ringpool" start method.

tests/stdlib/test_multiprocessing_ringpool.py is the suite (CPython's ``_test_multiprocessing``,
from Debian's libpython3.11-testsuite, installed for the "ringpool" start method); this runs it
in a subprocess with a deadline, with the python of a venv where ringpool is installed (its
isolated-mode children must find the start method), and requires 0 failures and 0 errors. The only
skips allowed besides the platform's own (the same tests skip under spawn) are the deviations the
suite module lists.
"""
import ast
import os
import re
import signal
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE_DIR = os.path.join(os.path.dirname(HERE), "stdlib")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

_DEADLINE = 1200.0  # seconds; the suite takes about 100 here


def _have_testsuite():
    try:
        import test._test_multiprocessing  # noqa: F401
    except ImportError:
        return False
    return True


def _deviations():
    """The suite module's DEVIATIONS (read, not imported: importing installs the whole suite)."""
    with open(os.path.join(SUITE_DIR, "test_multiprocessing_ringpool.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["DEVIATIONS"]:
            return ast.literal_eval(node.value)
    raise AssertionError("the suite module has no DEVIATIONS")


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_cpython_multiprocessing_suite_passes_under_ringpool(ringpool_venv, tmp_path):
    assert _have_testsuite(), "CPython's test suite is missing: apt-get install libpython3.11-testsuite (./run does)"
    deviations = set(_deviations())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TMPDIR"] = str(tmp_path)  # whatever the suite leaves behind goes with the test
    # SIGINT as a terminal gives it: a run started in the background by a shell without job
    # control inherits SIGINT ignored, and then Python installs no KeyboardInterrupt handler and
    # the suite's Ctrl-C tests fail (test_wait_result, ..._ignores_sigint) for that reason alone.
    r = subprocess.run([ringpool_venv, "-m", "unittest", "-v", "test_multiprocessing_ringpool"],
                       cwd=SUITE_DIR, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=_DEADLINE, preexec_fn=_default_sigint)
    out = r.stderr
    summary = re.search(r"^Ran (\d+) tests? in ([\d.]+)s", out, re.M)
    assert summary, f"the suite did not finish:\n{out[-6000:]}"
    bad = re.findall(r"^(?:FAIL|ERROR): \w+ \(test_multiprocessing_ringpool\.([\w.]+)\)", out, re.M)
    assert r.returncode == 0 and not bad, f"{len(bad)} failed or errored: {bad}\n{out[-8000:]}"
    # Every test skipped as a ringpool deviation is one the suite module lists (and they are few).
    skipped = set(re.findall(r'\(test_multiprocessing_ringpool\.([\w.]+)\) \.\.\. skipped [\'"]ringpool deviation', out))
    assert skipped == deviations and len(deviations) <= 3, (skipped, deviations)
    print(f"CPython's multiprocessing suite under ringpool: {summary.group(1)} tests in {summary.group(2)} s; "
          f"{out.strip().splitlines()[-1]}")
