"""Code shipping end to end: registered packages reach every ringpool worker, new versions replace
old ones between tasks, and the hybrid pickler sends what workers cannot import by value."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import ringpool
from ringpool import modules


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    modules._reset_for_tests()


def _write_package(root, name, version=1):
    pkg = root / name
    (pkg / "sub").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        VERSION = {version}

        class Box:
            def __init__(self, value):
                self.value = value

        def version():
            from {name}.sub import deep   # deferred: imported in the worker, from memory
            return (VERSION, deep.VERSION)

        def wrap(x):
            return Box(x)
    """))
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "deep.py").write_text(f"VERSION = {version}\n")
    (pkg / "data.py").write_text(textwrap.dedent(f"""
        class Squares:
            def __len__(self):
                return 12

            def __getitem__(self, i):
                import {name}.sub.deep   # a deferred import inside __getitem__
                return i * i * {name}.sub.deep.VERSION
    """))
    return pkg


def _unbox(q_in, q_out):
    box = q_in.get(timeout=60)
    import shippedpkg

    q_out.put(shippedpkg.wrap(box.value * 2))


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "exec"])
def test_registered_package_in_dataloader_and_queues(tmp_path, zygote):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    _write_package(tmp_path, "shippedpkg")
    pkg = ringpool.import_module_from_path("shippedpkg", str(tmp_path / "shippedpkg"))
    assert str(tmp_path) not in sys.path
    ctx = ringpool.RingpoolContext(zygote=zygote, spares=0)
    try:
        import shippedpkg.data

        loader = DataLoader(shippedpkg.data.Squares(), batch_size=4, num_workers=2, multiprocessing_context=ctx)
        assert torch.cat(list(loader)).tolist() == [i * i for i in range(12)]
        # Its classes through queues, both ways.
        q_in, q_out = ringpool.Queue(), ringpool.Queue()
        p = ctx.Process(target=_unbox, args=(q_in, q_out))
        p.start()
        q_in.put(pkg.Box(21))
        back = q_out.get(timeout=60)
        p.join(60)
        assert p.exitcode == 0
        assert type(back) is pkg.Box and back.value == 42
    finally:
        ctx.shutdown()


def _versions(_):
    import shippedpkg

    return shippedpkg.version()


def test_reload_reaches_executor_workers_between_tasks(tmp_path):
    _write_package(tmp_path, "shippedpkg", version=1)
    ringpool.import_module_from_path("shippedpkg", str(tmp_path / "shippedpkg"))
    with ringpool.Executor(2) as ex:
        assert set(ex.map(_versions, range(20))) == {(1, 1)}
        _write_package(tmp_path, "shippedpkg", version=2)
        ringpool.reload("shippedpkg")
        # Every task after the reload sees the new code, in both modules (none mixes versions).
        assert set(ex.map(_versions, range(40))) == {(2, 2)}
        _write_package(tmp_path, "shippedpkg", version=3)
        ringpool.reload("shippedpkg")
        import shippedpkg

        assert ex.submit(shippedpkg.version).result(60) == (3, 3)


def test_lambdas_closures_and_handles_through_a_worker():
    ctx = ringpool.get_context()
    q_in, q_out = ringpool.Queue(), ringpool.Queue()
    a, b = ringpool.Pipe()

    class Carrier:  # defined in a function: only by value
        def __init__(self, conn, fn):
            self.conn, self.fn = conn, fn

    offset = 100
    p = ctx.Process(target=lambda qi, qo: qo.put(qi.get(timeout=60)), args=(q_in, q_out))
    p.start()
    q_in.put(Carrier(a, lambda x: x + offset))
    got = q_out.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0
    assert got.fn(1) == 101
    got.conn.send("through the handle")  # the Connection arrived working, not copied by value
    assert b.recv() == "through the handle"


_MAIN_SCRIPT = """
import ringpool, sys

class Point:                      # a class of __main__ with no file: the worker cannot import it
    def __init__(self, x, y):
        self.x, self.y = x, y
    def norm1(self):
        return abs(self.x) + abs(self.y)

def swap(q_in, q_out):
    p = q_in.get(timeout=60)
    q_out.put(Point(p.y, p.x))

if __name__ == "__main__":
    ctx = ringpool.get_context(zygote={zygote})
    q_in, q_out = ringpool.Queue(), ringpool.Queue()
    proc = ctx.Process(target=swap, args=(q_in, q_out))
    proc.start()
    q_in.put(Point(1, -5))
    back = q_out.get(timeout=60)
    proc.join(60)
    print(type(back).__name__, back.x, back.y, back.norm1(), isinstance(back, Point), proc.exitcode)
"""


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "exec"])
def test_interactive_main_classes_travel_by_value(zygote):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(ringpool.__file__)))
    out = subprocess.run([sys.executable, "-c", _MAIN_SCRIPT.replace("{zygote}", str(zygote))],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Point", "-5", "1", "6", "True", "0"]


def test_unpicklable_error_names_the_attribute_path():
    class Model:
        def __init__(self):
            self.weights = [1.0, 2.0]
            self.cache = {"lock": threading.Lock()}

    q = ringpool.Queue()
    with pytest.raises(TypeError, match=r"cannot pickle obj\[1\]\.cache\['lock'\] \(a _thread\.lock\)"):
        q.put(("model", Model()))
    q.put("still usable")
    assert q.get(timeout=10) == "still usable"


def test_zygote_preloads_a_registered_package(tmp_path):
    _write_package(tmp_path, "shippedpkg", version=7)
    ringpool.import_module_from_path("shippedpkg", str(tmp_path / "shippedpkg"))
    ctx = ringpool.RingpoolContext(preload=("shippedpkg",), spares=0)
    try:
        with ringpool.Executor(1, mp_context=ctx) as ex:
            assert ex.submit(_versions, 0).result(60) == (7, 7)
        (tmp_path / "shippedpkg" / "__init__.py").unlink()  # workers never read the folder
        with ringpool.Executor(1, mp_context=ctx) as ex:
            assert ex.submit(_versions, 0).result(60) == (7, 7)
    finally:
        ctx.shutdown()


class _DeepVersion:
    def __len__(self):
        return 8

    def __getitem__(self, i):
        import shippedpkg.sub.deep  # resolved at each call: follows updates of the package

        return shippedpkg.sub.deep.VERSION


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "exec"])
def test_reload_reaches_running_workers_through_their_queues(tmp_path, zygote):
    # A persistent DataLoader's workers keep running across the reload: the new version reaches
    # them on their boot channel and is installed before their next index is unpickled.
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    _write_package(tmp_path, "shippedpkg", version=1)
    ringpool.import_module_from_path("shippedpkg", str(tmp_path / "shippedpkg"))
    ctx = ringpool.RingpoolContext(zygote=zygote, spares=0)
    try:
        loader = DataLoader(_DeepVersion(), batch_size=None, num_workers=2, persistent_workers=True,
                            multiprocessing_context=ctx)
        assert set(loader) == {1}
        pids = {w.pid for w in loader._iterator._workers}
        _write_package(tmp_path, "shippedpkg", version=2)
        ringpool.reload("shippedpkg")
        assert set(loader) == {2}
        assert {w.pid for w in loader._iterator._workers} == pids  # the same workers
        del loader
    finally:
        ctx.shutdown()



def test_by_value_functions_record_loaded_submodules_as_cloudpickle_does(tmp_path, monkeypatch):
    # The hybrid pickler answers cloudpickle's "which loaded submodules does this function
    # address" from a cache of sys.modules' names (rebuilt when they change) instead of scanning
    # sys.modules per package and function: the same modules, in the same order, and a submodule
    # imported after a first dump is found by the next one.
    import importlib
    import io

    from cloudpickle import cloudpickle as cp

    from ringpool import reduction

    pkg = tmp_path / "rp_subcache_pkg"
    (pkg / "inner").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "inner" / "__init__.py").write_text("")
    (pkg / "inner" / "leaf.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("rp_subcache_pkg.inner.leaf", "rp_subcache_pkg.inner", "rp_subcache_pkg"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    top = importlib.import_module("rp_subcache_pkg")
    import concurrent.futures

    namespace = {"rp_subcache_pkg": top, "concurrent": concurrent}
    exec("def uses():\n    return rp_subcache_pkg.inner.leaf.X, concurrent.futures.Future\n", namespace)
    uses = namespace["uses"]

    def recorded():
        return reduction.Pickler(io.BytesIO())._dynamic_function_reduce(uses)[2][1]["_cloudpickle_submodules"]

    def reference():
        return cp._find_imported_submodules(uses.__code__, [top, concurrent])

    first = recorded()
    assert first == reference()
    assert [m.__name__ for m in first] == ["concurrent.futures"]
    importlib.import_module("rp_subcache_pkg.inner.leaf")  # new names in sys.modules
    second = recorded()
    assert second == reference()
    assert [m.__name__ for m in second] == ["rp_subcache_pkg.inner", "rp_subcache_pkg.inner.leaf", "concurrent.futures"]
    assert reduction._find_imported_submodules(uses.__code__, [top, concurrent]) == second
    for name in ("rp_subcache_pkg.inner.leaf", "rp_subcache_pkg.inner"):
        del sys.modules[name]
    assert recorded() == reference() == first
