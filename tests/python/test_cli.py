"""python -m ringpool: --version, info (ringpool/__main__.py, ringpool/info.py); stress has its own
tests (test_stress_runner.py)."""
import json
import os
import resource
import subprocess
import sys

import pytest

import ringpool
from ringpool import _platform
from conftest import BINDINGS

pytestmark = pytest.mark.timeout(120)


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ringpool", *args], capture_output=True, text=True, timeout=90,
                          env={**os.environ, "PYTHONPATH": BINDINGS, **(env or {})})


def test_version():
    r = _run("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"ringpool {ringpool.__version__}\n", "")


def test_help_lists_every_command():
    r = _run("--help")
    assert r.returncode == 0
    for command in ("info", "stress", "bench", "--version"):
        assert command in r.stdout


def test_info_json_reports_this_system():
    r = _run("info", "--json", env={"RINGPOOL_WORKER_HEAP": "0"})
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["ringpool"] == {"version": ringpool.__version__, "path": os.path.dirname(ringpool.__file__)}
    assert info["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    # Read from metadata without importing them; Debian's python3-cloudpickle is installed here.
    import cloudpickle

    assert info["packages"]["cloudpickle"] == cloudpickle.__version__
    assert info["kernel"] == {"release": os.uname().release, "machine": os.uname().machine, "minimum": "5.11"}
    assert [(f["name"], f["required"], f["present"]) for f in info["features"]] == \
        [(f.name, f.required, not f.errno) for f in _platform.features()]
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        assert f"[{info['transparent_hugepages']['enabled']}]" in f.read()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # raised to the hard limit by _core here too
    assert info["limits"]["RLIMIT_NOFILE"] == {"soft": soft, "hard": hard}
    sm = info["start_method"]
    # A checkout on PYTHONPATH has no .pth: the name resolves only after register_start_method().
    assert sm["registered"] == sm["loaded_at_start"] == (sm["pth_file"] is not None)
    assert info["environment"]["RINGPOOL_WORKER_HEAP"] == "0"


def test_info_text():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith(f"ringpool {ringpool.__version__} (")
    for f in _platform.features():
        line = next(line for line in out.splitlines() if line.strip().startswith(f.name))
        assert ("yes" if not f.errno else "NO (") in line and f"Linux {f.since}" in line
    for needle in ("kernel features, required:", "transparent huge pages: enabled=", "RLIMIT_NOFILE: soft ",
                   "start method 'ringpool': ", "RINGPOOL_* variables: "):
        assert needle in out, out


def test_info_sees_the_start_method_pth(ringpool_venv):
    # A venv with the .pth an install puts in site-packages (conftest's developer venv).
    r = subprocess.run([ringpool_venv, "-I", "-m", "ringpool", "info", "--json"], capture_output=True, text=True,
                       timeout=90)
    assert r.returncode == 0, r.stderr
    sm = json.loads(r.stdout)["start_method"]
    assert sm["loaded_at_start"] and sm["registered"], sm
    assert os.path.basename(sm["pth_file"]) == "ringpool-start-method.pth"
    assert sm["pth_file"].startswith(os.path.dirname(os.path.dirname(ringpool_venv)))


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_bench_quick_report_json_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    r = subprocess.run([sys.executable, "-m", "ringpool", "bench", "--quick", "--json", str(out_json),
                        "--chart", str(out_png)], capture_output=True, text=True, timeout=360,
                       env={**os.environ, "PYTHONPATH": BINDINGS})
    assert r.returncode == 0, r.stderr
    res = json.loads(out_json.read_text())
    assert res["quick"] is True and res["machine"]["python"] and res["machine"]["cpu"]
    kinds = {q["payload"] for q in res["queues"]}
    assert "bytes" in kinds
    for q in res["queues"]:
        assert q["ringpool.Queue"] > 0 and q["multiprocessing.Queue"] > 0
    assert [p["pool"] for p in res["pools"]] == ["ringpool.Executor", "multiprocessing.Pool", "ProcessPoolExecutor"]
    assert all(p["tasks_per_s"] > 0 for p in res["pools"])
    assert [s["method"] for s in res["startup"]] == ["ringpool", "fork", "spawn"]
    assert all(s["seconds"] > 0 for s in res["startup"])
    # The Markdown report has one row per measurement, and names the machine.
    assert r.stdout.count("| `bytes` of ") == 4 and "| ProcessPoolExecutor |" in r.stdout
    assert res["machine"]["cpu"] in r.stdout.splitlines()[0]
    png = out_png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bench_chart_needs_matplotlib(tmp_path):
    # A matplotlib that cannot be imported: the command says what to install, before any run.
    (tmp_path / "matplotlib.py").write_text("raise ImportError('no matplotlib here')\n")
    r = _run("bench", "--quick", "--chart", str(tmp_path / "x.png"),
             env={"PYTHONPATH": os.pathsep.join([str(tmp_path), BINDINGS])})
    assert r.returncode == 2 and "python3-matplotlib" in r.stderr
    assert not (tmp_path / "x.png").exists()
