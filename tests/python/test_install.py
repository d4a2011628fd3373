"""The source distribution builds and installs offline into a venv that sees Debian's packages.

One test, since the install compiles the extension (minutes): it makes the sdist with Debian's
setuptools, checks what is in it and its metadata, installs it (with every extra) with
``pip install --no-build-isolation --no-index``, then uses the installed package the way a user
would.
"""
import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import venv

import pytest

import ringpool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# What the sdist must carry for the build to work (every directory setup.py compiles or includes
# from, checked through one file each; setup.py's globs take the rest) and to be a proper release.
_SDIST_MUST_HAVE = [
    "LICENSE", "README.md", "pyproject.toml", "setup.py", "PKG-INFO",
    "bindings/ringpool-start-method.pth", "bindings/_ringpool_start_method.py",
    "bindings/ringpool/__init__.py", "bindings/ringpool/_core.pyi", "bindings/ringpool/py.typed",
    "bindings/src/bindings.h", "bindings/src/module.cpp",
    "runtime/include/ringpool/kernel.hpp", "runtime/include/ringpool/detail/futex.hpp", "runtime/src/kernel.cpp",
    "runtime/src/keyed_hash.hpp",
    "proto/include/ringpool/proto/frame.hpp",
]


def _copy_sources(dst):
    # What git tracks or would track: no build trees, no in-place extension.
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if not os.path.exists(os.path.join(ROOT, f)):  # deleted in the work tree, not yet committed
            continue
        os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


def _make_sdist(src, dist):
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=src,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    (archive,) = dist.iterdir()
    assert archive.name == f"ringpool-{ringpool.__version__}.tar.gz"
    with tarfile.open(archive) as tar:
        top = f"ringpool-{ringpool.__version__}/"
        names = {m.name[len(top):] for m in tar.getmembers() if m.isfile()}
        meta = email.parser.Parser().parsestr(tar.extractfile(top + "PKG-INFO").read().decode())
        # (an sdist's PKG-INFO lists extras but not requirements: setuptools keeps those here)
        requires = tar.extractfile(top + "bindings/ringpool.egg-info/requires.txt").read().decode()
    missing = [f for f in _SDIST_MUST_HAVE if f not in names]
    assert not missing, f"not in the sdist: {missing}"
    assert not [n for n in names if n.endswith((".so", ".pyc"))]  # a checkout's build is not shipped
    assert meta["Version"] == ringpool.__version__
    assert requires.split() == ["cloudpickle>=2.2", "[cluster]", "distributed", "[progress]", "tqdm", "[torch]", "torch"]
    assert meta.get_all("Provides-Extra") == ["cluster", "progress", "torch"]
    assert "Operating System :: POSIX :: Linux" in meta.get_all("Classifier")
    assert meta["License"] == "MIT"
    return archive


# (.git is a file in a git worktree)
@pytest.mark.skipif(not shutil.which("git") or not os.path.exists(os.path.join(ROOT, ".git")), reason="needs a git checkout")
def test_sdist_installs_offline_into_a_system_site_venv_and_works(tmp_path):
    src = tmp_path / "src"
    _copy_sources(src)
    dist = tmp_path / "dist"
    archive = _make_sdist(src, dist)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # The venv's python is Debian's; pip comes from python3-pip through the system site, and so
    # do the dependencies (cloudpickle, torch, tqdm): --no-index proves nothing is downloaded.
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-index",
                        f"ringpool[torch,progress,cluster] @ file://{archive}"],
                       capture_output=True, text=True, timeout=840, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*argv, timeout=120):
        r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                           cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    # The installed package (not the checkout), its metadata, a lambda through a worker (cloudpickle).
    out = run(py, "-c", _INSTALLED_CHECK).split()
    assert out[0].startswith(str(env_dir)) and out[1:] == [ringpool.__version__, ringpool.__version__, "4999950000", "9"]
    assert run(py, "-m", "ringpool", "--version") == f"ringpool {ringpool.__version__}\n"
    info = run(env_dir / "bin" / "ringpool", "info")  # the console script
    assert "start method 'ringpool': registered" in info and "loaded at start" in info, info
    # The start-method name with no call first, in an isolated interpreter (what CPython's own
    # tests start: python -I script.py ringpool), through the .pth pip put in site-packages.
    site = run(py, "-I", "-c", "import site; print(site.getsitepackages()[0])").strip()
    assert os.path.isfile(os.path.join(site, "ringpool-start-method.pth"))
    assert run(py, "-I", "-c", _START_METHOD_CHECK).split() == ["ok", "0"]


_INSTALLED_CHECK = """
import importlib.metadata, ringpool, numpy as np
print(ringpool.__file__)
print(ringpool.__version__, importlib.metadata.version("ringpool"))
from packaging.requirements import Requirement
got = sorted((r.name, str(r.specifier), str(r.marker)) for r in map(Requirement, importlib.metadata.requires("ringpool")))
assert got == [("cloudpickle", ">=2.2", "None"), ("distributed", "", 'extra == "cluster"'),
               ("torch", "", 'extra == "torch"'),
               ("tqdm", "", 'extra == "progress"')], got
q = ringpool.Queue()
q.put(np.arange(100000))
print(q.get().sum())
with ringpool.Executor(1) as ex:
    print(ex.submit(lambda x: x * x, 3).result(60))
"""

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
