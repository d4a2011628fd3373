"""ringpool._platform: the import-time check of the system (Linux, kernel features)."""
import os
import subprocess
import sys
import time

import pytest

from ringpool import _core, _platform
from conftest import BINDINGS

REQUIRED = ["memfd_create(MFD_ALLOW_SEALING)", "fcntl(F_ADD_SEALS)", "clone3(CLONE_PIDFD)", "pidfd_open",
            "pidfd_send_signal", "waitid(P_PIDFD)", "close_range(CLOSE_RANGE_CLOEXEC)"]


def test_every_required_feature_is_probed_and_present_here():
    feats = _platform.features()
    assert [f.name for f in feats if f.required] == REQUIRED
    assert all(not f.errno and f.error == "" for f in feats if f.required)  # this machine runs ringpool
    assert {f.name for f in feats if not f.required} == {
        "madvise(MADV_POPULATE_WRITE)", "madvise(MADV_HUGEPAGE)", "madvise(MADV_COLLAPSE)"}
    assert all(f.since[0].isdigit() and f.use for f in feats)


def test_probes_leave_nothing_open_and_cost_microseconds():
    fds = len(os.listdir("/proc/self/fd"))
    t0 = time.perf_counter()
    for _ in range(200):
        _core.kernel_features()
    each = (time.perf_counter() - t0) / 200
    assert len(os.listdir("/proc/self/fd")) == fds
    assert each < 500e-6, f"{each * 1e6:.0f} us per check"


def test_a_missing_kernel_feature_refuses_the_import_naming_it(monkeypatch):
    probes = [(*f[:4], 38, "Function not implemented") if f[0] == "clone3(CLONE_PIDFD)" else f
              for f in _core.kernel_features()]
    monkeypatch.setattr(_platform, "_probe", lambda: probes)
    with pytest.raises(ImportError) as info:
        _platform.check()
    msg = str(info.value)
    assert "needs Linux 5.11 or later" in msg and os.uname().release in msg
    assert "clone3(CLONE_PIDFD) (Linux 5.3, for starting workers with a pidfd): Function not implemented" in msg
    assert "pidfd_open" not in msg  # only what is missing


def test_another_system_gets_an_import_error_before_the_extension_loads():
    # As on macOS: the package's import fails in _platform.check(), not with the extension's
    # "invalid ELF header" or a missing symbol.
    code = ("import sys; sys.platform = 'darwin'\n"
            "try:\n    import ringpool\nexcept ImportError as e:\n    print(e)\n"
            "print('ringpool._core' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": BINDINGS})
    assert r.returncode == 0, r.stderr
    msg, loaded = r.stdout.strip().split("\n")
    assert msg.startswith("ringpool runs on Linux only (Linux 5.11 or later), not on 'darwin'")
    assert loaded == "False"
