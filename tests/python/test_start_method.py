"""The start-method name "ringpool" with no call first (bindings/_ringpool_start_method.py and
ringpool-start-method.pth), in fresh interpreters of the ``ringpool_venv`` developer install and of
a broken install whose extension cannot load."""
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import BINDINGS

pytestmark = pytest.mark.integration


def _run(py, code, timeout=120, **kw):
    r = subprocess.run([py, "-I", "-c", code], capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_the_pth_imports_nothing_at_start(ringpool_venv):
    # Only the tiny module: neither multiprocessing nor the package nor its extension.
    out = _run(ringpool_venv, "import sys, json; print(json.dumps(sorted(sys.modules)))")
    mods = json.loads(out)
    assert "_ringpool_start_method" in mods  # the .pth ran
    assert not [m for m in mods if m.startswith(("multiprocessing", "ringpool"))], mods


def test_importing_multiprocessing_does_not_import_ringpool(ringpool_venv):
    out = _run(ringpool_venv, "import multiprocessing, multiprocessing.context as c, sys\n"
                              "print('ringpool' in sys.modules, 'ringpool' in c._concrete_contexts,"
                              " type(c.__loader__).__name__ == type(c.__spec__.loader).__name__ == 'SourceFileLoader')")
    assert out.split() == ["False", "False", "True"]


def test_the_name_resolves_in_an_isolated_interpreter(ringpool_venv):
    out = _run(ringpool_venv, "import multiprocessing as mp\n"
                              "ctx = mp.get_context('ringpool')\n"
                              "import ringpool\n"
                              "assert ctx is ringpool.get_context() is ringpool.register_start_method()\n"
                              "print(ringpool.__file__, mp.get_all_start_methods())")
    assert out.startswith(os.path.join(BINDINGS, "ringpool", "__init__.py"))
    assert "['fork', 'spawn', 'forkserver', 'ringpool']" in out


def test_set_start_method_then_a_plain_process(ringpool_venv, tmp_path):
    # What CPython's tests do (python -I script.py ringpool): the name first, ringpool never imported.
    script = tmp_path / "plain.py"
    script.write_text(
        "import multiprocessing as mp, sys\n"
        "def f(q):\n    q.put(mp.current_process().name)\n"
        "if __name__ == '__main__':\n"
        "    mp.set_start_method(sys.argv[1])\n"
        "    q = mp.Queue(); p = mp.Process(target=f, args=(q,), name='plain'); p.start()\n"
        "    print(q.get(timeout=60)); p.join(60); print(p.exitcode, type(p._popen).__module__)\n")
    r = subprocess.run([ringpool_venv, "-I", str(script), "ringpool"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["plain", "0", "ringpool.popen"]


def test_dataloader_takes_the_name(ringpool_venv):
    out = _run(ringpool_venv,
               "import sys, torch\n"
               "from torch.utils.data import DataLoader\n"
               "dl = DataLoader(list(range(8)), batch_size=2, num_workers=2, multiprocessing_context='ringpool')\n"
               "print([b.tolist() for b in dl], type(dl.multiprocessing_context).__name__)", timeout=240)
    assert out.split("] ")[-1].strip() == "RingpoolContext"
    assert out.startswith("[[0, 1], [2, 3], [4, 5], [6, 7]]")


def _broken_site(tmp_path, core):
    """A site folder with the start-method .pth, its module and the ringpool package whose
    extension file is `core` (bytes written under this interpreter's suffix) or missing (None)."""
    site = tmp_path / "site"
    shutil.copytree(os.path.join(BINDINGS, "ringpool"), site / "ringpool",
                    ignore=shutil.ignore_patterns("_core.*.so", "__pycache__"))
    for f in ("_ringpool_start_method.py", "ringpool-start-method.pth"):
        shutil.copy(os.path.join(BINDINGS, f), site)
    so = site / "ringpool" / ("_core" + importlib.machinery.EXTENSION_SUFFIXES[0])
    if core is not None:
        so.write_bytes(core)
    return site, so


# -I: nothing from PYTHONPATH; addsitedir reads the .pth, as site does for site-packages.
_BROKEN = """
import site, sys
site.addsitedir(sys.argv[1])
import multiprocessing as mp
for method in ("ringpool", "nope"):
    try:
        mp.set_start_method(method)
    except (ImportError, ValueError) as e:
        print(type(e).__name__ + ":", e)
ctx = mp.get_context("spawn")
p = ctx.Process(target=print, args=("spawn works",))
p.start(); p.join(60)
"""


@pytest.mark.parametrize("core", [None, b"not an ELF file\n" * 256], ids=["missing", "garbage"])
def test_an_extension_that_cannot_load(tmp_path, core):
    site, so = _broken_site(tmp_path, core)
    r = subprocess.run([sys.executable, "-I", "-c", _BROKEN, str(site)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ImportError: start method 'ringpool': ringpool's extension ")
    if core is None:
        assert f"is missing from {so.parent} (looked for {so.name}" in lines[0]
    else:
        assert f"{so} did not load; the loader said: " in lines[0]
        assert "invalid ELF header" in lines[0]
    assert "Reinstall ringpool for this interpreter" in lines[0] and "./run build" in lines[0]
    assert lines[1:] == ["ValueError: cannot find context for 'nope'", "spawn works"]
