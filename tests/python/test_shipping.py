"""Code shipping end to end: registered packages reach every ringpool worker, new versions replace
old ones between tasks, and the hybrid pickler sends what workers cannot import by value."""
import os
import pickle
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


# --- code loaded by hand (spec_from_file_location + exec_module), not registered, not on sys.path ---

_HAND_SOURCE = """
class Box:
    def __init__(self, value):
        self.value = value

    def doubled(self):
        {helper}
        return twice(self.value)


def answer(q, box):
    q.put(Box(box.doubled()))


def triple(x):
    return 3 * Box(x).doubled() // 2


class Squares:
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return Box(i * i).doubled() // 2
"""


def _hand_load(name, file, package):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        name, file, submodule_search_locations=[os.path.dirname(file)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["package", "module"])
def hand(request, tmp_path):
    """A package (with a submodule imported lazily) or a single module file, loaded by hand from
    tmp_path, which is not on sys.path; sys.modules is cleaned afterwards (the registry by
    _clean_registry)."""
    if request.param == "package":
        name = "rp_handpkg"
        pkg = tmp_path / "folder" / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(_HAND_SOURCE.format(helper=f"from {name}.sub import twice"))
        (pkg / "sub.py").write_text("def twice(v):\n    return 2 * v\n")
        file = pkg / "__init__.py"
    else:
        name = "rp_handmod"
        (tmp_path / "folder").mkdir()
        file = tmp_path / "folder" / "rp_handmod_v2.py"  # the file's stem need not be the name
        file.write_text(_HAND_SOURCE.format(helper="twice = (2).__mul__"))
    assert not any(str(tmp_path) in p for p in sys.path)
    module = _hand_load(name, str(file), request.param == "package")
    yield module
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def _relay(q_in, q_out):
    box = q_in.get(timeout=60)
    q_out.put(type(box)(box.doubled()))


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "exec"])
def test_hand_imported_code_reaches_process_targets_and_running_workers(hand, zygote):
    name = hand.__name__
    ctx = ringpool.RingpoolContext(zygote=zygote, spares=0)
    try:
        # A worker started before the module is pickled anywhere: the registration that a queue
        # put makes reaches it on its boot channel before the item is unpickled.
        q_in, q_out = ringpool.Queue(), ringpool.Queue()
        relay = ctx.Process(target=_relay, args=(q_in, q_out))
        relay.start()
        assert name not in modules.installed()
        q_in.put(hand.Box(5))
        assert name in modules.installed()
        back = q_out.get(timeout=60)
        relay.join(60)
        assert relay.exitcode == 0
        assert type(back) is hand.Box and back.value == 10
    finally:
        ctx.shutdown()


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "exec"])
def test_hand_imported_process_target_registered_while_the_process_is_pickled(hand, zygote):
    # The target itself comes from the hand-imported module: it is registered while the process
    # object is pickled, after the zygote (if any) started, and must reach the worker with it.
    ctx = ringpool.RingpoolContext(zygote=zygote, spares=0)
    try:
        q = ringpool.Queue()
        p = ctx.Process(target=hand.answer, args=(q, hand.Box(21)))
        p.start()
        assert modules.installed()[hand.__name__] == modules.register_module(hand).hash
        back = q.get(timeout=60)
        p.join(60)
        assert p.exitcode == 0
        assert type(back) is hand.Box and back.value == 42
    finally:
        ctx.shutdown()


def test_hand_imported_functions_reach_executor_workers(hand):
    with ringpool.Executor(2) as ex:
        assert ex.submit(abs, -1).result(60) == 1  # workers running before the registration
        assert ex.submit(hand.triple, 4).result(60) == 12
        assert list(ex.map(hand.triple, range(6))) == [3 * i for i in range(6)]
        assert ex.submit(hand.Box(7).doubled).result(60) == 14  # a bound method: its class
    assert hand.__name__ in modules.installed()


def test_hand_imported_dataset_in_dataloader_workers(hand):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    loader = DataLoader(hand.Squares(), batch_size=4, num_workers=2, multiprocessing_context=ringpool.get_context())
    assert torch.cat(list(loader)).tolist() == [i * i for i in range(12)]
    assert hand.__name__ in modules.installed()


def test_hand_imported_module_whose_source_is_gone_fails_in_the_caller(hand):
    from ringpool import reduction

    os.unlink(hand.__file__)
    q = ringpool.Queue()
    with pytest.raises(modules.ModuleSourceError, match=rf"{hand.__name__}.*{hand.__file__}.*no longer exists"):
        q.put(hand.Box(1))
    with pytest.raises(pickle.PicklingError) as info:
        reduction.dumps(hand.triple)
    assert hand.__name__ in str(info.value) and hand.__file__ in str(info.value)
    with pytest.raises(modules.ModuleSourceError, match=hand.__name__):
        ringpool.get_context().Process(target=hand.answer, args=(q, hand.Box(1))).start()
    assert hand.__name__ not in modules.installed()
    q.put("still usable")
    assert q.get(timeout=10) == "still usable"


def test_importable_and_fileless_modules_are_not_registered(tmp_path, monkeypatch):
    import importlib
    import types

    from ringpool import reduction

    (tmp_path / "rp_onpath.py").write_text("class Thing:\n    pass\n\ndef f():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rp_onpath", raising=False)
    onpath = importlib.import_module("rp_onpath")
    # Fileless, built by hand: pickled by reference as before (a worker cannot import it unless
    # its own code makes it), never registered.
    virtual = types.ModuleType("rp_virtual")
    exec("class Thing:\n    pass\n", virtual.__dict__)
    virtual.Thing.__module__ = "rp_virtual"
    monkeypatch.setitem(sys.modules, "rp_virtual", virtual)
    try:
        for obj in (onpath.Thing(), onpath.f, virtual.Thing(), virtual.Thing):
            payload, flags, fds = reduction.dumps(obj)
            assert b"cloudpickle" not in bytes(payload)  # by reference: a name, not the code
            back = reduction.loads_payload(payload, flags, fds)
            assert back is obj if not isinstance(obj, (onpath.Thing, virtual.Thing)) else type(back) is type(obj)
        assert modules.installed() == {}
    finally:
        sys.modules.pop("rp_onpath", None)


def test_hand_imported_module_shadowed_on_sys_path_is_shipped(tmp_path, monkeypatch):
    # A same-named module on sys.path is not the one the parent uses: a worker importing by name
    # would get the other file, so the hand-loaded one is registered (and only once).
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "rp_shadowed.py").write_text("WHICH = 'on sys.path'\n")
    (tmp_path / "hand").mkdir()
    (tmp_path / "hand" / "rp_shadowed.py").write_text("WHICH = 'by hand'\n\ndef f():\n    return WHICH\n")
    monkeypatch.syspath_prepend(str(tmp_path / "path"))
    module = _hand_load("rp_shadowed", str(tmp_path / "hand" / "rp_shadowed.py"), False)
    try:
        modules.ensure_shipped("rp_shadowed")
        [snap] = modules.snapshots()
        assert snap.name == "rp_shadowed" and modules.register_module(module) is snap
        assert dict(snap.files) == {"rp_shadowed.py": (tmp_path / "hand" / "rp_shadowed.py").read_bytes()}
        version = modules.registry_version()
        modules.ensure_shipped("rp_shadowed")
        assert modules.registry_version() == version
    finally:
        sys.modules.pop("rp_shadowed", None)


def _data_len(name):
    import importlib

    return len(importlib.import_module(name).DATA)


def test_packages_larger_than_the_zygote_configuration_go_to_each_worker(tmp_path):
    # The zygote's configuration is one control message (about 1 MiB): registered packages that
    # do not fit in it reach each worker at its start instead of failing the spawn.
    name = "rp_big_for_the_zygote"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"DATA = {'x' * (3 << 20)!r}\n")
    ringpool.import_module_from_path(name, pkg)
    ctx = ringpool.get_context(preload=["json"])
    try:
        with ringpool.Executor(2, mp_context=ctx) as ex:
            assert list(ex.map(_data_len, [name] * 4)) == [3 << 20] * 4
        assert name not in ctx._zygote_modules
    finally:
        ctx.shutdown()
