"""Tests for bindings/ringpool/modules.py: the code-shipping registry, snapshots and their finder.

Packages are written into ``tmp_path`` (never on sys.path) under names unique to each test; the
``mods`` fixture purges every registration afterwards and checks that no finder is left behind.
The subprocess test loads modules.py by file path, so the receiving side is shown to need neither
the ringpool package nor its compiled extension.
"""
import base64
import importlib
import inspect
import itertools
import json
import linecache
import os
import pathlib
import pickle
import shutil
import time
import struct
import subprocess
import sys
import textwrap
import threading
import traceback
import types

import cloudpickle
import pytest

import ringpool
from ringpool import modules as M

MODULES_PY = pathlib.Path(M.__file__).resolve()
_counter = itertools.count()


@pytest.fixture
def mods():
    assert M._FINDER not in sys.meta_path, "a previous test leaked an installed snapshot"
    yield M
    M._reset_for_tests()
    assert M._FINDER not in sys.meta_path
    assert M.installed() == {}


@pytest.fixture
def name(request):
    return f"rpmod_{request.node.name.split('[')[0][5:25]}_{next(_counter)}"


def write_tree(root, files):
    """Write ``{relative path: source}`` under ``root`` (sources dedented)."""
    root = pathlib.Path(root)
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_text(textwrap.dedent(text))
    return root


def make_pkg(tmp_path, name, files, folder=None):
    return write_tree(tmp_path / (folder or name), files)


def owned(name):
    return sorted(k for k in sys.modules if k == name or k.startswith(name + "."))


BASIC = {
    "__init__.py": """\
        X = 1

        def deferred():
            import {name}.sub.mod
            return {name}.sub.mod.VALUE

        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y
        """,
    "sub/__init__.py": "",
    "sub/mod.py": "VALUE = 'from mod'\n",
}


def basic(tmp_path, name, **kw):
    return make_pkg(tmp_path, name, {k: v.replace("{name}", name) for k, v in BASIC.items()},
                    **kw)


# --- import_module_from_path ---


def test_import_lazy_submodule_and_deferred_import(mods, tmp_path, name):
    root = basic(tmp_path, name)
    assert str(tmp_path) not in sys.path
    pkg = ringpool.import_module_from_path(name, root)
    assert pkg.X == 1
    assert pkg.__file__ == str(root / "__init__.py")
    assert pkg.__path__ == [str(root)]
    assert owned(name) == [name]  # submodules are imported when asked for, not before
    assert pkg.deferred() == "from mod"
    assert owned(name) == [name, f"{name}.sub", f"{name}.sub.mod"]
    assert sys.modules[f"{name}.sub.mod"].__file__ == str(root / "sub" / "mod.py")
    assert importlib.import_module(name) is pkg
    assert mods.installed() == {name: mods.snapshots()[0].hash}


def test_data_files_through_importlib_resources(mods, tmp_path, name):
    import importlib.resources
    root = make_pkg(tmp_path, name, {"__init__.py": "", "data.txt": "payload\n"})
    pkg = mods.import_module_from_path(name, root)
    assert importlib.resources.files(pkg).joinpath("data.txt").read_text() == "payload\n"
    assert "data.txt" not in mods.snapshots()[0].files  # read from the folder, not shipped


def test_same_path_returns_cached_module_and_other_path_raises(mods, tmp_path, name):
    root = basic(tmp_path, name)
    pkg = mods.import_module_from_path(name, root)
    version = mods.registry_version()
    assert mods.import_module_from_path(name, str(root)) is pkg
    assert mods.import_module_from_path(name, tmp_path / name / "sub" / "..") is pkg
    assert mods.registry_version() == version
    other = basic(tmp_path, name, folder="other")
    with pytest.raises(ValueError, match="already registered"):
        mods.import_module_from_path(name, other)
    assert sys.modules[name] is pkg


def test_path_errors(mods, tmp_path, name):
    make_pkg(tmp_path, name, {"mod.py": "x = 1\n"})
    with pytest.raises(FileNotFoundError, match="__init__.py"):
        mods.import_module_from_path(name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(NotADirectoryError, match="notes.txt"):
        mods.import_module_from_path(name, tmp_path / "notes.txt")
    with pytest.raises(NotADirectoryError):
        mods.import_module_from_path(name, tmp_path / name / "mod.py")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mods.import_module_from_path(name, tmp_path / "missing")
    assert mods.installed() == {} and owned(name) == []


@pytest.mark.parametrize("bad", ["a.b", "1x", "class", "", "my-pkg", "__init__", "__main__", 3])
def test_invalid_names(mods, tmp_path, bad):
    root = make_pkg(tmp_path, "p", {"__init__.py": ""})
    with pytest.raises(ValueError, match="not a valid top-level module name"):
        mods.import_module_from_path(bad, root)


def test_names_that_would_shadow(mods, tmp_path, name):
    root = make_pkg(tmp_path, name, {"__init__.py": ""})
    with pytest.raises(ValueError, match="standard-library"):
        mods.import_module_from_path("json", root)
    with pytest.raises(ValueError, match="standard-library"):
        mods.import_module_from_path("email", root)  # not necessarily imported yet
    sys.modules[name] = types.ModuleType(name)
    try:
        with pytest.raises(ValueError, match="already imported"):
            mods.import_module_from_path(name, root)
    finally:
        del sys.modules[name]
    assert mods.installed() == {}


# --- what a snapshot holds ---


def test_only_py_files_of_regular_packages(mods, tmp_path, name):
    root = make_pkg(tmp_path, name, {
        "__init__.py": "",
        "a.py": "",
        "data.txt": "not code",
        "b.pyc": b"\x00junk",
        "c.pyi": "x: int\n",
        "bad-name.py": "",
        ".hidden.py": "",
        ".hidden/__init__.py": "",
        "__pycache__/a.cpython-311.py": "",
        "nopkg/x.py": "",  # no __init__.py: not a sub-package
        "sub/__init__.py": "",
        "sub/deep/__init__.py": "",
        "sub/deep/m.py": "",
        "sub/readme.md": "",
    })
    mods.import_module_from_path(name, root)
    (snap,) = mods.snapshots()
    assert sorted(snap.files) == ["__init__.py", "a.py", "sub/__init__.py", "sub/deep/__init__.py",
                                  "sub/deep/m.py"]
    assert snap.name == name and snap.root == str(root) and snap.is_package


def test_symlinked_file_escaping_root(mods, tmp_path, name):
    outside = write_tree(tmp_path / "outside", {"secret.py": "SECRET = 1\n"})
    root = make_pkg(tmp_path, name, {"__init__.py": ""})
    (root / "evil.py").symlink_to(outside / "secret.py")
    with pytest.raises(ImportError, match="evil.py.*outside the package root"):
        mods.import_module_from_path(name, root)
    assert mods.installed() == {} and owned(name) == []


def test_symlinked_dir_escaping_root(mods, tmp_path, name):
    outside = write_tree(tmp_path / "outside", {"__init__.py": "", "m.py": ""})
    root = make_pkg(tmp_path, name, {"__init__.py": ""})
    (root / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ImportError, match="sub.*outside the package root"):
        mods.import_module_from_path(name, root)
    assert mods.installed() == {} and owned(name) == []


def test_symlinks_inside_root_are_followed_and_cycles_refused(mods, tmp_path, name):
    root = make_pkg(tmp_path, name, {"__init__.py": "", "real.py": "V = 7\n",
                                     "sub/__init__.py": ""})
    (root / "alias.py").symlink_to(root / "real.py")
    pkg = mods.import_module_from_path(name, root)
    assert importlib.import_module(f"{name}.alias").V == 7
    mods.purge(name)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    with pytest.raises(ImportError, match="symlink cycle"):
        mods.import_module_from_path(name, root)
    assert pkg.__name__ == name


def test_symlinked_sibling_subpackages_are_read_once_not_once_per_path(mods, tmp_path, name):
    # Every level holds a sub-package `a` and `b -> a`: walking each path took 2**levels visits
    # (14 levels: 27 s, 65,520 files). Each real folder is read once, under its first path.
    levels = 12
    root = make_pkg(tmp_path, name, {"__init__.py": ""})
    d, expected = root, ["__init__.py"]
    for i in range(levels):
        write_tree(d / "a", {"__init__.py": "", "x.py": f"LEVEL = {i}\n"})
        (d / "b").symlink_to(d / "a", target_is_directory=True)
        prefix = "a/" * (i + 1)
        expected += [prefix + "__init__.py", prefix + "x.py"]
        d = d / "a"
    t0 = time.monotonic()
    mods.import_module_from_path(name, root)
    (snap,) = mods.snapshots()
    assert sorted(snap.files) == sorted(expected)
    assert time.monotonic() - t0 < 10
    assert importlib.import_module(name + ".a" * levels + ".x").LEVEL == levels - 1


def test_finder_refuses_names_that_are_not_identifiers(mods, tmp_path, name):
    root = make_pkg(tmp_path, name, {"__init__.py": ""})
    mods.import_module_from_path(name, root)
    for bad in (f"{name}..x", f"{name}.x/../../etc", f"{name}.-x"):
        with pytest.raises(ImportError, match="invalid module name"):
            mods._FINDER.find_spec(bad)
    assert mods._FINDER.find_spec(f"{name}.missing") is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"{name}.missing")


# --- failures leave nothing behind ---


@pytest.mark.parametrize("init, error", [
    ("from . import a\nraise RuntimeError('init failed')\n", RuntimeError),
    ("from . import a\nfrom . import broken\n", SyntaxError),
])
def test_failed_import_leaves_nothing_half_registered(mods, tmp_path, name, init, error):
    root = make_pkg(tmp_path, name, {"__init__.py": init, "a.py": "A = 1\n",
                                     "broken.py": "def f(:\n"})
    version = mods.registry_version()
    with pytest.raises(error) as info:
        mods.import_module_from_path(name, root)
    if error is RuntimeError:
        assert str(info.value) == "init failed"  # the original exception, not a wrapper
    assert owned(name) == []
    assert mods.installed() == {} and mods.snapshots() == []
    assert name not in mods._registry
    assert mods._FINDER not in sys.meta_path
    assert mods.registry_version() == version
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)
    (root / "__init__.py").write_text("from . import a\nOK = True\n")
    pkg = mods.import_module_from_path(name, root)
    assert pkg.OK and pkg.a.A == 1


# --- tracebacks, linecache, inspect ---

TB_SRC = """\
    # line 1
    def boom():
        x = 1
        raise ValueError("boom from snapshot")


    class Thing:
        '''A documented class.'''

        def method(self):
            return 42
    """


def _traceback_of(fn):
    try:
        fn()
    except ValueError:
        return traceback.format_exc()
    raise AssertionError("did not raise")


def test_traceback_and_getsource_after_edit_and_delete(mods, tmp_path, name):
    root = make_pkg(tmp_path, name, {"__init__.py": "", "mod.py": TB_SRC})
    mods.import_module_from_path(name, root)
    mod = importlib.import_module(f"{name}.mod")
    original = textwrap.dedent(TB_SRC)
    path = root / "mod.py"

    tb = _traceback_of(mod.boom)
    assert f'File "{path}", line 4, in boom' in tb
    assert 'raise ValueError("boom from snapshot")' in tb
    assert inspect.getsourcefile(mod.boom) == str(path)

    # Edit the file on disk: what runs is still the snapshot, and so is what is shown.
    path.write_text("# edited\n" * 10 + "def boom():\n    pass\n")
    linecache.checkcache()
    tb = _traceback_of(mod.boom)
    assert 'line 4, in boom' in tb and 'raise ValueError("boom from snapshot")' in tb
    assert inspect.getsource(mod.boom) == "".join(original.splitlines(True)[1:4])
    assert "A documented class." in inspect.getsource(mod.Thing)

    path.unlink()
    linecache.checkcache()
    assert "return 42" in inspect.getsource(mod.Thing.method)
    assert 'raise ValueError("boom from snapshot")' in _traceback_of(mod.boom)

    # Purging forgets the lines it put in linecache.
    mods.purge(name)
    assert str(path) not in linecache.cache


def test_traceback_from_module_top_level(mods, tmp_path, name):
    root = make_pkg(tmp_path, name, {"__init__.py": "\n\nraise ValueError('at import')\n"})
    with pytest.raises(ValueError) as info:
        mods.import_module_from_path(name, root)
    text = "".join(traceback.format_exception(info.value))
    assert f'File "{root / "__init__.py"}", line 3, in <module>' in text
    assert "raise ValueError('at import')" in text


# --- hashing and reload ---


def test_hash_stable_and_changes_on_edit(mods, tmp_path, name):
    root = basic(tmp_path, name)
    h1 = mods._read_package(name, str(root)).hash
    h2 = mods._read_package(name, str(root)).hash
    assert h1 == h2 and len(h1) == 64
    # The hash covers contents and paths only, not the folder or the order files were listed in.
    copy = shutil.copytree(root, tmp_path / "copy")
    assert mods._read_package(name, str(copy)).hash == h1
    (root / "sub" / "mod.py").write_text("VALUE = 'edited'\n")
    assert mods._read_package(name, str(root)).hash != h1
    (root / "sub" / "mod.py").write_text("VALUE = 'from mod'\n")
    assert mods._read_package(name, str(root)).hash == h1
    (root / "sub" / "new.py").write_text("")
    assert mods._read_package(name, str(root)).hash != h1


def test_reload_picks_up_edit_and_purges_submodules(mods, tmp_path, name):
    root = basic(tmp_path, name)
    pkg = mods.import_module_from_path(name, root)
    assert pkg.deferred() == "from mod"
    old_mod = sys.modules[f"{name}.sub.mod"]
    old_point = pkg.Point(1, 2)
    (old_hash,) = mods.installed().values()

    v = mods.registry_version()
    assert mods.reload(name) is pkg  # unchanged: a no-op
    assert mods.registry_version() == v

    (root / "sub" / "mod.py").write_text("VALUE = 'edited'\n")
    new = ringpool.reload(name)
    assert new is not pkg and sys.modules[name] is new
    assert owned(name) == [name]  # submodules purged; imported again on demand
    assert new.deferred() == "edited"
    assert sys.modules[f"{name}.sub.mod"] is not old_mod
    assert mods.registry_version() == v + 1
    assert mods.installed()[name] != old_hash
    assert type(old_point) is pkg.Point and pkg.Point is not new.Point  # old objects keep classes


def test_registration_and_reload_are_logged(mods, tmp_path, name, caplog):
    root = basic(tmp_path, name)
    with caplog.at_level("INFO", logger="ringpool"):
        mods.import_module_from_path(name, root)
        (h1,) = mods.installed().values()
        mods.reload(name)  # unchanged: nothing to log
        (root / "sub" / "mod.py").write_text("VALUE = 'edited'\n")
        mods.reload(name)
        (h2,) = mods.installed().values()
    got = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    real = os.path.realpath(root)
    assert got == [("ringpool.modules", "INFO", f"registered package {name} from {real} (3 files, {h1[:12]})"),
                   ("ringpool.modules", "INFO", f"reloaded {name} from {real}: {h1[:12]} -> {h2[:12]} (3 files)")]


def test_failed_reload_restores_previous_version(mods, tmp_path, name):
    root = basic(tmp_path, name)
    pkg = mods.import_module_from_path(name, root)
    pkg.deferred()
    before = {k: sys.modules[k] for k in owned(name)}
    installed, v = mods.installed(), mods.registry_version()
    (root / "__init__.py").write_text("X = 2\nraise RuntimeError('bad edit')\n")
    with pytest.raises(RuntimeError, match="bad edit"):
        mods.reload(name)
    assert {k: sys.modules[k] for k in owned(name)} == before
    assert mods.installed() == installed and mods.registry_version() == v
    assert 'X = 1' in inspect.getsource(pkg)


def test_reload_unregistered_name(mods):
    with pytest.raises(KeyError):
        mods.reload("rpmod_never_registered")


# --- register_module ---


def test_register_module_imported_from_disk(mods, tmp_path, name):
    root = basic(tmp_path, name)
    sys.path.insert(0, str(tmp_path))
    try:
        pkg = importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
    assert not isinstance(pkg.__spec__.loader, mods._SnapshotLoader)
    snap = ringpool.register_module(name)
    assert isinstance(snap, mods.Snapshot) and snap.root == str(root)
    assert sys.modules[name] is pkg  # already imported: left as it is
    assert mods.register_module(pkg) is snap
    assert pkg.deferred() == "from mod"  # submodules now come from the snapshot
    assert isinstance(sys.modules[f"{name}.sub"].__spec__.loader, mods._SnapshotLoader)
    assert mods.installed() == {name: snap.hash}
    (root / "__init__.py").write_text("X = 3\n")
    assert mods.reload(name).X == 3


def test_register_single_file_module(mods, tmp_path, name):
    write_tree(tmp_path, {f"{name}.py": "def f():\n    return 'single'\n"})
    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
    snap = mods.register_module(mod)
    assert not snap.is_package and list(snap.files) == [f"{name}.py"]
    restored = mods.Snapshot.from_bytes(snap.to_bytes())
    mods.purge(name)
    assert mods.install(restored)
    assert importlib.import_module(name).f() == "single"


def test_register_module_errors(mods, tmp_path, name):
    with pytest.raises(ValueError, match="standard-library"):
        mods.register_module("json")
    with pytest.raises(ValueError, match="standard-library"):
        mods.register_module(sys)
    with pytest.raises(ValueError, match="top-level"):
        mods.register_module(importlib.import_module("email.mime"))
    with pytest.raises(ValueError, match="no __file__"):
        mods.register_module(types.ModuleType(name))
    assert mods.installed() == {}


# --- shipping: bytes, install, purge ---


def _snapshot(name, files, root="/nonexistent/rp"):
    return M.Snapshot(name, f"{root}/{name}",
                      {k: textwrap.dedent(v).encode() for k, v in files.items()})


def test_snapshot_bytes_round_trip(mods, tmp_path, name):
    mods.import_module_from_path(name, basic(tmp_path, name))
    (snap,) = mods.snapshots()
    data = snap.to_bytes()
    back = mods.Snapshot.from_bytes(data)
    assert (back.name, back.root, back.hash, dict(back.files)) == \
        (snap.name, snap.root, snap.hash, dict(snap.files))
    assert mods.Snapshot.from_bytes(bytearray(data)).hash == snap.hash
    assert back.to_bytes() == data
    with pytest.raises(AttributeError):
        back.name = "other"


def _craft(name, root, files, digest=None, magic=b"RPMS", version=1, flags=0):
    """A snapshot encoding written independently of Snapshot.to_bytes."""
    import hashlib
    if digest is None:
        h = hashlib.sha256()
        for rel in sorted(files):
            for part in (rel.encode(), files[rel]):
                h.update(struct.pack("<Q", len(part)) + part)
        digest = h.digest()
    out = struct.pack("<4sHHI32s", magic, version, flags, len(files), digest)
    for part in (name.encode(), root.encode()):
        out += struct.pack("<I", len(part)) + part
    for rel, data in files.items():
        out += struct.pack("<I", len(rel.encode())) + rel.encode()
        out += struct.pack("<I", len(data)) + data
    return out


def test_snapshot_from_bytes_validates(mods):
    files = {"__init__.py": b"x = 1\n", "m.py": b"y = 2\n"}
    good = _craft("rpmod_ok", "/r/rpmod_ok", files)
    assert mods.Snapshot.from_bytes(good).files["m.py"] == b"y = 2\n"  # layout matches the doc
    bad = {
        "magic": _craft("rpmod_ok", "/r", files, magic=b"XXXX"),
        "version": _craft("rpmod_ok", "/r", files, version=2),
        "flags": _craft("rpmod_ok", "/r", files, flags=1),
        "hash": _craft("rpmod_ok", "/r", files, digest=bytes(32)),
        "trailing": good + b"\0",
        "dotdot": _craft("rpmod_ok", "/r", {"__init__.py": b"", "../evil.py": b""}),
        "absolute": _craft("rpmod_ok", "/r", {"__init__.py": b"", "/etc/evil.py": b""}),
        "not py": _craft("rpmod_ok", "/r", {"__init__.py": b"", "x.so": b""}),
        "orphan": _craft("rpmod_ok", "/r", {"__init__.py": b"", "d/m.py": b""}),
        "name": _craft("os.path", "/r", files),
        "relative root": _craft("rpmod_ok", "r", files),
        "empty": _craft("rpmod_ok", "/r", {}),
        "utf8": _craft("rpmod_ok", "/r", files).replace(b"rpmod_ok", b"rpmod_\xff\xfe"),
        "not bytes": "a string",
    }
    for n in range(0, len(good), 7):
        bad[f"truncated at {n}"] = good[:n]
    for what, data in bad.items():
        with pytest.raises(ValueError):
            mods.Snapshot.from_bytes(data)
            pytest.fail(what)


def test_install_from_memory_same_hash_noop_different_hash_purges(mods, tmp_path, name):
    v1 = _snapshot(name, {"__init__.py": "V = 1\n", "sub/__init__.py": "", "sub/m.py": "W = 1\n"})
    v2 = _snapshot(name, {"__init__.py": "V = 2\n", "sub/__init__.py": "", "sub/m.py": "W = 2\n"})
    version = mods.registry_version()
    assert mods.install(mods.Snapshot.from_bytes(v1.to_bytes())) is True
    assert mods.registry_version() == version + 1
    assert mods._FINDER in sys.meta_path
    old_m = importlib.import_module(f"{name}.sub.m")
    assert old_m.W == 1 and old_m.__file__ == f"/nonexistent/rp/{name}/sub/m.py"
    assert mods.install(v1) is False  # same hash: nothing to do
    assert sys.modules[f"{name}.sub.m"] is old_m and mods.registry_version() == version + 1

    assert mods.install(v2) is True
    assert owned(name) == []
    assert importlib.import_module(f"{name}.sub.m").W == 2 and old_m.W == 1
    assert mods.installed() == {name: v2.hash}
    assert [s.hash for s in mods.snapshots()] == [v2.hash]
    with pytest.raises(ValueError, match="installed from a snapshot"):
        mods.import_module_from_path(name, make_pkg(tmp_path, name, {"__init__.py": ""}))
    with pytest.raises(ValueError, match="installed from a snapshot"):
        mods.register_module(name)

    assert mods.purge(name) is True and mods.purge(name) is False
    assert owned(name) == [] and mods.installed() == {}
    assert mods._FINDER not in sys.meta_path
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)


def test_install_refuses_shadowing_and_registered_names(mods, tmp_path, name):
    with pytest.raises(ValueError, match="standard-library"):
        mods.install(_snapshot("json", {"__init__.py": ""}))
    with pytest.raises(TypeError):
        mods.install(b"bytes")
    root = basic(tmp_path, name)
    mods.import_module_from_path(name, root)
    (snap,) = mods.snapshots()
    assert mods.install(snap) is False
    with pytest.raises(ValueError, match="use reload"):
        mods.install(_snapshot(name, {"__init__.py": "V = 9\n"}))


def test_one_finder_however_many_packages(mods, tmp_path, name):
    for i in range(3):
        mods.import_module_from_path(f"{name}_{i}", make_pkg(tmp_path, f"{name}_{i}",
                                                             {"__init__.py": ""}))
    mods.install(_snapshot(f"{name}_x", {"__init__.py": ""}))
    assert sys.meta_path.count(mods._FINDER) == 1 and sys.meta_path[0] is mods._FINDER
    assert [s.name for s in mods.snapshots()] == sorted(f"{name}_{s}" for s in "012x")
    mods.purge(f"{name}_0")
    assert sys.meta_path.count(mods._FINDER) == 1


def test_concurrent_lazy_imports(mods, name):
    n = 16
    files = {"__init__.py": ""}
    files.update({f"m{i}.py": f"import time\ntime.sleep(0.01)\nI = {i}\n" for i in range(n)})
    mods.install(_snapshot(name, files))
    results, errors = [], []

    def worker(i):
        try:
            results.append(importlib.import_module(f"{name}.m{i % n}").I)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4 * n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and sorted(results) == sorted(i % n for i in range(4 * n))


# --- pickling ---


PICKLE_SRC = {
    "__init__.py": "",
    "shapes.py": """\
        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y

            def norm2(self):
                return self.x * self.x + self.y * self.y


        def double(v):
            return 2 * v
        """,
}


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_pickles_by_reference(mods, tmp_path, name, dumps):
    mods.import_module_from_path(name, make_pkg(tmp_path, name, PICKLE_SRC))
    shapes = importlib.import_module(f"{name}.shapes")
    p = shapes.Point(3, 4)
    data = dumps(p)
    assert len(data) < 150 and b"norm2" not in data  # a reference, not the class's code
    back = pickle.loads(data)
    assert type(back) is shapes.Point and back.norm2() == 25
    fdata = dumps(shapes.double)
    assert len(fdata) < 100 and pickle.loads(fdata) is shapes.double


# --- a receiving process ---

CHILD = r"""
import base64, importlib.util, inspect, json, pickle, sys, traceback
spec = importlib.util.spec_from_file_location("rp_modules", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
msg = json.loads(sys.stdin.read())
for b in msg["snapshots"]:
    assert m.install(m.Snapshot.from_bytes(base64.b64decode(b)))
    assert not m.install(m.Snapshot.from_bytes(base64.b64decode(b)))
out = {"ringpool_imported": any(k.split(".")[0] == "ringpool" for k in sys.modules)}
obj = pickle.loads(base64.b64decode(msg["obj"]))
out["installed"] = m.installed()
out["type"] = type(obj).__module__ + "." + type(obj).__qualname__
out["deferred"] = obj.deferred()
out["submodules"] = sorted(k for k in sys.modules if k.startswith(msg["name"]))
try:
    obj.fail()
except ZeroDivisionError:
    out["traceback"] = traceback.format_exc()
out["source"] = inspect.getsource(type(obj))
print(json.dumps(out))
"""


@pytest.mark.integration
def test_install_in_fresh_subprocess(mods, tmp_path, name):
    root = make_pkg(tmp_path, name, {
        "__init__.py": "",
        "model.py": f"""\
            class Model:
                '''Shipped with its package.'''

                def __init__(self, k):
                    self.k = k

                def deferred(self):
                    from {name}.helpers import util
                    return util.scale(self.k)

                def fail(self):
                    return self.k / 0
            """,
        "helpers/__init__.py": "",
        "helpers/util.py": "def scale(k):\n    return k * 10\n",
    })
    mods.import_module_from_path(name, root)
    obj = importlib.import_module(f"{name}.model").Model(4)
    msg = {
        "name": name,
        "snapshots": [base64.b64encode(s.to_bytes()).decode() for s in mods.snapshots()],
        "obj": base64.b64encode(pickle.dumps(obj)).decode(),
    }
    root.rename(tmp_path / "moved_away")  # the child cannot read the folder
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(MODULES_PY)], input=json.dumps(msg),
                          capture_output=True, text=True, timeout=60, cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ringpool_imported"] is False
    assert out["installed"] == mods.installed()
    assert out["type"] == f"{name}.model.Model"
    assert out["deferred"] == 40
    assert out["submodules"] == sorted([name, f"{name}.model", f"{name}.helpers",
                                        f"{name}.helpers.util"])
    assert f'File "{root / "model.py"}", line 12, in fail' in out["traceback"]
    assert "return self.k / 0" in out["traceback"]
    assert "'''Shipped with its package.'''" in out["source"]
