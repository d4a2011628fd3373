"""Tests for bindings/ringpool/bundle.py: writing bundles (rules, dependency analysis, errors),
reading them in isolation (two versions side by side, resources, pickles), rejecting bad archives,
and ``get_context(bundle=...)`` making a bundle the environment of ringpool workers.

Packages are written into ``tmp_path`` under names unique to each test and found through the
writer's ``search_path``: they are never on ``sys.path`` and never imported by the test process
(except where a test pickles an instance, which needs the class importable here).
"""
import hashlib
import importlib.resources
import io
import itertools
import json
import os
import pickle
import sys
import textwrap
import traceback
import zipfile

import pytest

import ringpool
from ringpool import bundle as B

_ids = itertools.count()


def _name(stem):
    return f"{stem}_{os.getpid()}_{next(_ids)}"


def _write(root, files):
    """files: {relative path: source}; returns root."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def opened():
    """Bundles opened by a test, closed afterwards (their modules leave sys.modules)."""
    bundles = []

    def open_(source):
        b = ringpool.Bundle.open(source)
        bundles.append(b)
        return b

    yield open_
    for b in bundles:
        b.close()
    assert B._FINDER not in sys.meta_path or B._FINDER.tops


def _versioned_package(root, name, version):
    return _write(root, {
        f"{name}/__init__.py": f"""
            VERSION = {version}
            from .shapes import Square
            from . import util
        """,
        f"{name}/shapes.py": """
            class Square:
                def __init__(self, side):
                    self.side = side

                def area(self):
                    return self.side * self.side
        """,
        f"{name}/util.py": f"""
            import json

            def describe():
                return json.dumps({{"version": {version}}})
        """,
    })


# --- writing: every action, and the errors -----------------------------------------------------


def test_round_trip_with_intern_extern_mock(tmp_path, opened, monkeypatch):
    pkg, ext, mocked = _name("pkg"), _name("extlib"), _name("gone")
    _write(tmp_path / "env", {f"{ext}.py": "def value():\n    return 42\n"})
    monkeypatch.syspath_prepend(str(tmp_path / "env"))
    _write(tmp_path / "src", {
        f"{pkg}/__init__.py": f"""
            import {ext}
            import {mocked}
            from {mocked}.deep import helper
            from .core import compute

            def ext_value():
                return {ext}.value()

            def use_mock():
                return helper(1)

            def subclass_mock():
                class Local({mocked}.Base):
                    pass

            def is_mocked_instance(x):
                return isinstance(x, {mocked}.Base)

            def boom():
                raise RuntimeError("from bundled code")
        """,
        f"{pkg}/core.py": "def compute(x):\n    return x + 1\n",
    })
    out = tmp_path / "b.zip"
    with ringpool.Bundle.writer(out, search_path=[tmp_path / "src"]) as w:
        w.intern(f"{pkg}.**").extern(ext).mock(f"{mocked}.**")
        w.save_module(pkg)
    b = opened(out)
    assert b.modules() == {pkg: "intern", f"{pkg}.core": "intern", mocked: "mock",
                           f"{mocked}.deep": "mock"}
    assert b.externs() == [ext]
    m = b.import_module(pkg)
    assert m.compute(1) == 2
    assert m.ext_value() == 42
    assert sys.modules[ext] is b.import_module(ext)  # an extern is the environment's module
    with pytest.raises(NotImplementedError, match=rf"{mocked}\.deep\.helper .*'{mocked}.deep' "
                                                  rf"was mocked"):
        m.use_mock()
    with pytest.raises(NotImplementedError, match=f"{mocked}.Base"):
        m.subclass_mock()
    assert m.is_mocked_instance(3) is False
    # Bundled code runs under the archive's file names, with its lines in tracebacks.
    with pytest.raises(RuntimeError) as info:
        m.boom()
    text = "".join(traceback.format_exception(info.value))
    assert f"{out}/{pkg}/__init__.py" in text and 'raise RuntimeError("from bundled code")' in text
    assert pkg not in sys.modules and mocked not in sys.modules


def test_denied_and_unmatched_modules_are_all_listed(tmp_path):
    pkg = _name("pkg")
    _write(tmp_path, {
        f"{pkg}/__init__.py": "from . import a, b\n",
        f"{pkg}/a.py": "import secrets_vault\nimport leftpad\nimport os\n",
        f"{pkg}/b.py": "import leftpad.core\nfrom secrets_vault import key\nimport yaml_like\n",
    })
    out = tmp_path / "b.zip"
    w = ringpool.BundleWriter(out, search_path=[tmp_path])
    w.intern(f"{pkg}.**").deny("secrets_vault")
    w.save_module(pkg)
    with pytest.raises(ringpool.BundleError) as info:
        w.close()
    e = info.value
    assert e.denied == {"secrets_vault": [f"{pkg}.a", f"{pkg}.b"]}
    assert set(e.unmatched) == {"leftpad", "leftpad.core", "yaml_like"}
    assert e.unmatched["leftpad"] == [f"{pkg}.a"]
    message = str(e)
    for line in ("denied modules", f"secrets_vault (needed by {pkg}.a, {pkg}.b)",
                 "no rule matched", f"leftpad.core (needed by {pkg}.b)", "yaml_like"):
        assert line in message
    assert "os" not in e.unmatched  # the standard library is extern implicitly
    assert not out.exists()
    w.close()  # closed: nothing happens


def test_patterns_first_match_and_exclude():
    r = B._Rule("intern", ["pkg.**"], [], True)
    assert r.matches("pkg") and r.matches("pkg.a") and r.matches("pkg.a.b") and not r.matches("pkgx")
    r = B._Rule("intern", "pkg.*", "pkg.tests", True)
    assert r.matches("pkg.a") and not r.matches("pkg") and not r.matches("pkg.a.b")
    assert not r.matches("pkg.tests")
    r = B._Rule("mock", ["**.test_*", "a.*.c"], [], True)
    assert r.matches("x.y.test_one") and r.matches("test_two") and r.matches("a.b.c")
    assert not r.matches("a.b.b.c")
    with pytest.raises(ValueError):
        B._Rule("intern", ["pkg..x"], [], True)


def test_conflicting_actions_and_allow_empty(tmp_path):
    pkg = _name("pkg")
    _write(tmp_path, {f"{pkg}/__init__.py": "from . import sub\n", f"{pkg}/sub.py": "X = 1\n"})
    w = ringpool.BundleWriter(tmp_path / "b.zip", search_path=[tmp_path])
    # The first matching rule wins: pkg.sub is extern, pkg interned, which cannot work.
    w.extern(f"{pkg}.sub").intern(f"{pkg}.**").mock("nothing_like_this", allow_empty=False)
    w.save_module(pkg)
    with pytest.raises(ringpool.BundleError) as info:
        w.close()
    problems = "\n".join(info.value.problems)
    assert f"{pkg}.sub: extern, but inside bundled package" in problems
    assert "mock(nothing_like_this) matched no module" in problems


def test_relative_and_from_imports_are_found(tmp_path, opened):
    pkg = _name("pkg")
    _write(tmp_path, {
        f"{pkg}/__init__.py": "from . import sibling\nfrom .sub import leaf\n",
        f"{pkg}/sibling.py": f"from {pkg}.sub import other\n"
                             f"def f():\n    import {pkg}.deep.x\n    return {pkg}.deep.x.Y\n",
        f"{pkg}/sub/__init__.py": "from .. import sibling as _s\n",
        f"{pkg}/sub/leaf.py": "from .other import VALUE\n",
        f"{pkg}/sub/other.py": "VALUE = 5\n",
        f"{pkg}/deep/__init__.py": "",
        f"{pkg}/deep/x.py": "Y = 7\n",
        f"{pkg}/unused.py": "",
    })
    out = tmp_path / "b.zip"
    with ringpool.BundleWriter(out, search_path=[tmp_path]) as w:
        w.intern(f"{pkg}.**")
        w.save_module(pkg)
    b = opened(out)
    assert sorted(b.modules()) == sorted(f"{pkg}{s}" for s in (
        "", ".sibling", ".sub", ".sub.leaf", ".sub.other", ".deep", ".deep.x"))
    m = b.import_module(pkg)
    assert m.leaf.VALUE == 5 and m.sibling.f() == 7


def test_save_source_string(tmp_path, opened):
    tool = _name("tool")
    out = tmp_path / "b.zip"
    with ringpool.BundleWriter(out) as w:
        w.save_source_string(tool, "from .helpers import triple\n", is_package=True)
        w.save_source_string(f"{tool}.helpers", b"def triple(x):\n    return 3 * x\n")
        with pytest.raises(ValueError, match="already saved"):
            w.save_source_string(tool, "")
        with pytest.raises(ValueError, match="not a valid module name"):
            w.save_source_string("a.__init__", "")
    assert opened(out).import_module(tool).triple(2) == 6


def test_relative_import_beyond_the_top_is_reported(tmp_path):
    pkg = _name("pkg")
    _write(tmp_path, {f"{pkg}/__init__.py": "from .. import elsewhere\n"})
    w = ringpool.BundleWriter(tmp_path / "b.zip", search_path=[tmp_path]).intern(f"{pkg}.**")
    w.save_module(pkg)
    with pytest.raises(ringpool.BundleError, match="relative import beyond the top-level"):
        w.close()


# --- pickles --------------------------------------------------------------------------------


def test_pickle_globals_are_dependencies(tmp_path, opened, monkeypatch):
    pkg = _name("pkgp")
    _write(tmp_path, {
        f"{pkg}/__init__.py": "",  # imports nothing: only the pickle names pkg.models
        f"{pkg}/models.py": """
            class Point:
                def __init__(self, x, y):
                    self.x, self.y = x, y

            class Label:
                def __init__(self, text):
                    self.text = text
        """,
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    models = importlib.import_module(f"{pkg}.models")
    try:
        obj = {"points": [models.Point(1, 2), models.Point(3, 4)], "label": models.Label("hi")}
        # STACK_GLOBAL's module name comes from the memo the second time: both are found.
        data = pickle.dumps(obj, protocol=4)
        assert B._pickle_globals(data) == [(f"{pkg}.models", "Label"), (f"{pkg}.models", "Point")]
        assert (f"{pkg}.models", "Point") in B._pickle_globals(pickle.dumps(obj, protocol=0))

        w = ringpool.BundleWriter(tmp_path / "bad.zip")
        w.save_pickle(pkg, "obj.pkl", obj)
        with pytest.raises(ringpool.BundleError) as info:
            w.close()
        assert info.value.unmatched == {f"{pkg}.models": [f"pickle {pkg}/obj.pkl (Label)",
                                                          f"pickle {pkg}/obj.pkl (Point)"]}

        out = tmp_path / "b.zip"
        with ringpool.BundleWriter(out) as w:
            w.intern(f"{pkg}.**")
            w.save_pickle(pkg, "obj.pkl", obj)
    finally:
        for name in (pkg, f"{pkg}.models"):
            sys.modules.pop(name, None)
    b = opened(out)
    assert set(b.modules()) == {pkg, f"{pkg}.models"}
    loaded = b.load_pickle(pkg, "obj.pkl")
    point = loaded["points"][1]
    assert (point.x, point.y, loaded["label"].text) == (3, 4, "hi")
    assert type(point) is b.import_module(f"{pkg}.models").Point
    assert type(point) is not models.Point and not isinstance(point, models.Point)


def test_mocked_module_in_a_pickle_fails_early(tmp_path, monkeypatch):
    mod = _name("mockedmod")
    _write(tmp_path, {f"{mod}.py": "class Thing:\n    pass\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    thing = importlib.import_module(mod).Thing()
    try:
        w = ringpool.BundleWriter(tmp_path / "b.zip").mock(mod)
        w.save_pickle("data", "t.pkl", thing)
        with pytest.raises(ringpool.BundleError, match=f"needs {mod}.Thing, but {mod} is mocked"):
            w.close()
    finally:
        sys.modules.pop(mod, None)


def test_save_and_load_text_binary_pickle(tmp_path, opened):
    out = tmp_path / "b.zip"
    with ringpool.BundleWriter(out) as w:
        w.save_text("config", "settings.json", json.dumps({"lr": 0.1}))
        w.save_text("config", "notes/é.txt", "café", encoding="utf-8")
        w.save_binary("config", "blob.bin", b"\x00\x01\xff" * 10)
        w.save_pickle("config", "table.pkl", {"a": [1, 2.5, "x"], "b": (None, True)})
        with pytest.raises(ValueError, match="already saved"):
            w.save_text("config", "settings.json", "{}")
        for bad in ("../x", "/etc/passwd", "a//b", "a\\b", ""):
            with pytest.raises(ValueError):
                w.save_text("config", bad, "x")
        with pytest.raises(ValueError):
            w.save_text("not a package", "x.txt", "x")
    b = opened(out)
    assert json.loads(b.load_text("config", "settings.json")) == {"lr": 0.1}
    assert b.load_text("config", "notes/é.txt") == "café"
    assert b.load_binary("config", "blob.bin") == b"\x00\x01\xff" * 10
    assert b.load_pickle("config", "table.pkl") == {"a": [1, 2.5, "x"], "b": (None, True)}
    assert b.modules() == {}
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        b.load_text("config", "missing.txt")


def test_importlib_resources_from_bundled_code(tmp_path, opened):
    pkg = _name("pkg")
    _write(tmp_path, {f"{pkg}/__init__.py": """
        import importlib.resources

        def read(name):
            return importlib.resources.files(__package__).joinpath(name).read_text()

        def listing():
            return sorted(p.name for p in importlib.resources.files(__name__).iterdir())

        def nested():
            root = importlib.resources.files(__package__)
            return (root / "assets" / "logo.bin").read_bytes(), (root / "assets").is_dir()

        def real_file(name):
            with importlib.resources.as_file(importlib.resources.files(__package__) / name) as p:
                with open(p) as f:
                    return f.read()
    """})
    out = tmp_path / "b.zip"
    with ringpool.BundleWriter(out, search_path=[tmp_path]) as w:
        w.save_module(pkg)
        w.save_text(pkg, "words.txt", "alpha beta")
        w.save_binary(pkg, "assets/logo.bin", b"\x89PNG")
    m = opened(out).import_module(pkg)
    assert m.read("words.txt") == "alpha beta"
    assert m.listing() == ["__init__.py", "assets", "words.txt"]
    assert m.nested() == (b"\x89PNG", True)
    assert m.real_file("words.txt") == "alpha beta"
    with pytest.raises(FileNotFoundError):
        m.read("nope.txt")


def test_file_structure(tmp_path, opened):
    pkg = _name("pkg")
    _write(tmp_path, {f"{pkg}/__init__.py": "from . import a\n", f"{pkg}/a.py": ""})
    out = tmp_path / "tree.zip"
    with ringpool.BundleWriter(out, search_path=[tmp_path]) as w:
        w.intern(f"{pkg}.**")
        w.save_module(pkg)
        w.save_text(pkg, "data/x.txt", "x")
    b = opened(out)
    assert str(b.file_structure()) == textwrap.dedent(f"""\
        tree.zip
        ├── .ringpool
        │   └── manifest.json
        └── {pkg}
            ├── data
            │   └── x.txt
            ├── __init__.py
            └── a.py
        """)
    tree = b.file_structure(include="**/*.py", exclude=f"{pkg}/a.py")
    assert str(tree) == f"tree.zip\n└── {pkg}\n    └── __init__.py\n"
    assert tree.has_file(f"{pkg}/__init__.py") and not tree.has_file(f"{pkg}/a.py")


def test_manifest_hashes_and_deterministic_output(tmp_path, opened):
    pkg = _name("pkg")
    _versioned_package(tmp_path, pkg, 1)

    def write(out):
        with ringpool.BundleWriter(out, search_path=[tmp_path]) as w:
            w.intern(f"{pkg}.**")
            w.save_module(pkg)
            w.save_text(pkg, "r.txt", "resource")

    write(tmp_path / "one.zip")
    write(tmp_path / "two.zip")
    assert (tmp_path / "one.zip").read_bytes() == (tmp_path / "two.zip").read_bytes()
    b = opened(tmp_path / "one.zip")
    m = b.manifest
    assert (m["format"], m["version"]) == ("ringpool.bundle", 1)
    assert m["stdlib"] == ["json"] and m["externs"] == []
    for name, entry in m["modules"].items():
        source = (tmp_path / entry["path"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(source).hexdigest(), name
        assert entry["action"] == "intern"
    assert m["resources"] == {f"{pkg}/r.txt": hashlib.sha256(b"resource").hexdigest()}
    raw = zipfile.ZipFile(tmp_path / "one.zip").read(B.MANIFEST)
    assert b.hash == hashlib.sha256(raw).hexdigest()


# --- isolation ------------------------------------------------------------------------------------


def test_two_versions_stay_isolated(tmp_path, opened):
    pkg = _name("shared")
    for version in (1, 2):
        _versioned_package(tmp_path / f"v{version}", pkg, version)
        with ringpool.BundleWriter(tmp_path / f"v{version}.zip",
                                   search_path=[tmp_path / f"v{version}"]) as w:
            w.intern(f"{pkg}.**")
            w.save_module(pkg)
    b1, b2 = opened(tmp_path / "v1.zip"), opened(tmp_path / "v2.zip")
    m1, m2 = b1.import_module(pkg), b2.import_module(pkg)
    assert (m1.VERSION, m2.VERSION) == (1, 2)
    assert (m1.util.describe(), m2.util.describe()) == ('{"version": 1}', '{"version": 2}')
    # Two versions, two classes: same qualified name, different modules, no isinstance across.
    s1, s2 = m1.Square(3), m2.Square(3)
    assert type(s1).__qualname__ == type(s2).__qualname__ == "Square"
    assert type(s1) is not type(s2)
    assert type(s1).__module__ == f"{b1._mount.root}.{pkg}.shapes"
    assert not isinstance(s1, m2.Square) and not isinstance(s2, m1.Square)
    assert s1.area() == s2.area() == 9
    # Inside this process an instance pickles by reference to its own bundle's class.
    assert type(pickle.loads(pickle.dumps(s2))) is m2.Square
    assert pkg not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(pkg)
    # Closing unmounts: the modules leave sys.modules, objects keep working.
    root = b1._mount.root
    b1.close()
    assert not [k for k in sys.modules if k == root or k.startswith(root + ".")]
    assert s1.area() == 9
    assert b1.import_module(pkg).VERSION == 1  # a fresh mount


def test_opening_executes_nothing(tmp_path, opened):
    pkg = _name("pkg")
    _write(tmp_path, {f"{pkg}/__init__.py": "raise RuntimeError('imported!')\n"})
    out = tmp_path / "b.zip"
    with ringpool.BundleWriter(out, search_path=[tmp_path]) as w:
        w.save_module(pkg)
    meta_path = list(sys.meta_path)
    b = opened(out)
    assert b.modules() == {pkg: "intern"} and sys.meta_path == meta_path
    with pytest.raises(RuntimeError, match="imported!"):
        b.import_module(pkg)


# --- bad archives -------------------------------------------------------------------------------


def _good_archive(tmp_path):
    pkg = _name("pkg")
    _write(tmp_path, {f"{pkg}/__init__.py": "X = 1\n"})
    buf = io.BytesIO()
    with ringpool.BundleWriter(buf, search_path=[tmp_path]) as w:
        w.save_module(pkg)
        w.save_text(pkg, "r.txt", "r")
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return pkg, {i.filename: zf.read(i) for i in zf.infolist()}


def _zip(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def test_bad_archives_are_refused(tmp_path):
    pkg, files = _good_archive(tmp_path)
    ringpool.Bundle.open(_zip(files.items()))  # the unmodified entries are fine
    manifest = json.loads(files[B.MANIFEST])

    def refused(entries, match):
        with pytest.raises(ringpool.BadBundleError, match=match):
            ringpool.Bundle.open(_zip(entries))

    refused([*files.items(), ("../evil.py", b"")], "'../evil.py' is not a relative file path")
    refused([*files.items(), ("/abs.py", b"")], "is not a relative file path")
    refused([*files.items(), (f"{pkg}/x.py", b"")], "is not listed in the manifest")
    with pytest.warns(UserWarning):  # zipfile warns about the duplicate name
        refused([*files.items(), (f"{pkg}/r.txt", b"r")], "appears twice")
    tampered = dict(files)
    tampered[f"{pkg}/__init__.py"] = b"import os; os.system('echo pwned')\n"
    refused(tampered.items(), f"module '{pkg}': content does not match its sha256")
    for version in (2, "1", None):
        changed = dict(files)
        changed[B.MANIFEST] = json.dumps({**manifest, "version": version}).encode()
        refused(changed.items(), "unsupported bundle format version")
    changed = dict(files)
    changed[B.MANIFEST] = json.dumps(
        {**manifest, "modules": {f"{pkg}.a..b": manifest["modules"][pkg]}}).encode()
    refused(changed.items(), "is not a valid module name")
    changed[B.MANIFEST] = b"{not json"
    refused(changed.items(), "manifest is not JSON")
    refused([(k, v) for k, v in files.items() if k != B.MANIFEST], "not a ringpool bundle")
    with pytest.raises(ringpool.BadBundleError, match="not a zip archive"):
        ringpool.Bundle.open(b"PK\x03\x04 but not really")
    with pytest.raises(ringpool.BadBundleError, match="more than max_bytes"):
        ringpool.Bundle.open(_zip(files.items()), max_bytes=10)


# --- workers --------------------------------------------------------------------------------------


def _bundled_task(x):
    import importlib

    pkg = importlib.import_module(os.environ["RINGPOOL_TEST_BUNDLED"])
    return pkg.compute(x), pkg.resource(), pkg.mocked_call(), pkg.__file__, pkg.ext_value()


def _bundled_package(tmp_path, pkg, padding=b""):
    gone, ext = _name("gone"), _name("extlib")
    _write(tmp_path / "env", {f"{ext}.py": "VALUE = 'from the environment'\n"})
    _write(tmp_path, {
        f"{pkg}/__init__.py": f"""
            import importlib.resources
            import {gone}
            import {ext}
            from .math import compute

            def ext_value():
                return {ext}.VALUE

            def resource():
                return importlib.resources.files(__package__).joinpath("greeting.txt").read_text()

            def mocked_call():
                try:
                    {gone}.anything()
                except NotImplementedError as e:
                    return str(e)
        """,
        f"{pkg}/math.py": "def compute(x):\n    return x * x + 1\n",
    })
    out = tmp_path / f"{pkg}.zip"
    with ringpool.BundleWriter(out, search_path=[tmp_path]) as w:
        w.intern(f"{pkg}.**").mock(gone).extern(ext)
        w.save_module(pkg)
        w.save_text(pkg, "greeting.txt", "hello from the bundle")
        if padding:
            w.save_binary(pkg, "padding.bin", padding)
    return out, gone


@pytest.mark.parametrize("mode", ["zygote", "exec", "zygote-large"])
def test_context_with_a_bundle_runs_bundled_code_in_workers(tmp_path, monkeypatch, mode):
    pkg = _name("bundled")
    # A large, incompressible bundle does not fit in the zygote's configuration message: it goes
    # to each worker at its start instead.
    padding = os.urandom(1 << 20) if mode == "zygote-large" else b""
    out, gone = _bundled_package(tmp_path, pkg, padding)
    monkeypatch.setenv("RINGPOOL_TEST_BUNDLED", pkg)
    monkeypatch.syspath_prepend(str(tmp_path / "env"))  # the extern: the workers' sys.path
    ctx = ringpool.get_context(zygote=mode != "exec", bundle=str(out))
    try:
        assert ctx is ringpool.get_context(zygote=mode != "exec", bundle=ringpool.Bundle.open(out))
        assert ctx is not ringpool.get_context(zygote=mode != "exec")
        assert pickle.loads(pickle.dumps(ctx)) is ctx
        with ringpool.Executor(2, mp_context=ctx) as ex:
            results = list(ex.map(_bundled_task, [1, 2, 3]))
        assert [r[0] for r in results] == [2, 5, 10]
        for _, text, mocked, file, ext_value in results:
            assert text == "hello from the bundle" and ext_value == "from the environment"
            assert f"module '{gone}' was mocked" in mocked
            assert file == f"{out}/{pkg}/__init__.py"
        assert ctx._zygote_has_bundle is (mode == "zygote")
        p = ctx.Process(target=_bundled_task, args=(4,))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        assert pkg not in sys.modules  # only the workers have it under its real name
    finally:
        ctx.shutdown()
