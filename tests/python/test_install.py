"""pip install --no-build-isolation works offline into a venv that sees Debian's packages."""
import os
import shutil
import subprocess
import sys
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _copy_sources(dst):
    # What git tracks or would track: no build trees, no in-place extension.
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


# (.git is a file in a git worktree)
@pytest.mark.skipif(not shutil.which("git") or not os.path.exists(os.path.join(ROOT, ".git")), reason="needs a git checkout")
def test_pip_install_into_system_site_venv(tmp_path):
    src = tmp_path / "src"
    _copy_sources(src)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # The venv's python is Debian's; pip comes from python3-pip through the system site.
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-index", str(src)],
                       capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    code = ("import ringpool, numpy as np; q = ringpool.Queue(); q.put(np.arange(100000)); "
            "assert q.get().sum() == 4999950000; print(ringpool.__file__)")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert str(env_dir) in r.stdout
    # The start-method name with no call first, in an isolated interpreter (what CPython's own
    # tests start: python -I script.py ringpool), through the .pth pip put in site-packages.
    r = subprocess.run([str(py), "-I", "-c", "import site; print(site.getsitepackages()[0])"],
                       capture_output=True, text=True, timeout=60, check=True)
    assert os.path.isfile(os.path.join(r.stdout.strip(), "ringpool-start-method.pth"))
    r = subprocess.run([str(py), "-I", "-c", _START_METHOD_CHECK], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["ok", "0"]


# set_start_method("ringpool") before anything imports ringpool; a plain multiprocessing.Process
# then runs in a ringpool worker, and the name stands for ringpool's default context.
_START_METHOD_CHECK = """
import multiprocessing as mp, sys
assert "ringpool" not in sys.modules
mp.set_start_method("ringpool")
import ringpool
assert mp.get_context("ringpool") is ringpool.get_context() is mp.get_context()
assert "ringpool" in mp.get_all_start_methods()
q = mp.Queue()
p = mp.Process(target=q.put, args=("ok",))
p.start()
print(q.get(timeout=60))
p.join(60)
print(p.exitcode)
"""
