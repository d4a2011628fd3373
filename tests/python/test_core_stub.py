"""bindings/ringpool/_core.pyi against the extension it describes.

Every public name of ``ringpool._core`` (and of its submodule ``task``, and of each class) is in
the stub with the same kind (module, class, function, static method, property, method, data: for
data, the same type), and the stub names nothing the extension lacks. A name the stub alone has
must be private and a type helper (``_TaskModule``, the class the stub gives ``task`` as its type).
Dunder members the stub declares must exist; the extension's own dunders need no stub entry.
"""
import ast
import pathlib
import types

import pytest

from ringpool import _core

STUB = pathlib.Path(_core.__file__).resolve().parent / "_core.pyi"
_PLAIN = {"int": int, "float": float, "str": str, "bool": bool, "bytes": bytes, "tuple": tuple}


def _decorators(fn):
    return {d.id for d in fn.decorator_list if isinstance(d, ast.Name)}


def _annotation_kind(ann, helpers):
    """('module', None), ('data', type or None) for an annotated stub name."""
    text = ast.unparse(ann)
    if text == "types.ModuleType" or text in helpers.get("modules", ()):
        return ("module", None)
    base = text.partition("[")[0]
    return ("data", _PLAIN.get(base))


def _members(body, helpers):
    """{name: (kind, detail)} for the statements of a stub module or class body."""
    out = {}
    for node in body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = ("class", node)
        elif isinstance(node, ast.FunctionDef):
            decos = _decorators(node)
            kind = "staticmethod" if "staticmethod" in decos else "property" if "property" in decos else "function"
            out[node.name] = (kind, None)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = _annotation_kind(node.annotation, helpers)
        elif isinstance(node, ast.Assign):  # a type alias
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = ("alias", None)
    return out


def _stub():
    tree = ast.parse(STUB.read_text(encoding="utf-8"), str(STUB))
    # Classes deriving from types.ModuleType describe a submodule's contents.
    modules = {n.name for n in tree.body if isinstance(n, ast.ClassDef)
               and any(ast.unparse(b) == "types.ModuleType" for b in n.bases)}
    helpers = {"modules": modules}
    return tree, _members(tree.body, helpers), helpers


def _runtime_kind(value, owner=None, name=None):
    if owner is not None:
        raw = vars(owner).get(name)
        if isinstance(raw, staticmethod):
            return ("staticmethod", None)
        if isinstance(raw, property):
            return ("property", None)
    if isinstance(value, types.ModuleType):
        return ("module", None)
    if isinstance(value, type):
        return ("class", None)
    if callable(value):
        return ("function", None)
    return ("data", type(value))


def _public(names):
    return {n for n in names if not n.startswith("_")}


TREE, STUB_TOP, HELPERS = _stub()


def _compare(where, runtime_names, get, stub_members, owner=None):
    """Problems between one runtime namespace and its stub members."""
    problems = []
    for name in sorted(_public(runtime_names)):
        if name not in stub_members:
            problems.append(f"{where}{name}: in the extension, not in the stub")
            continue
        want = _runtime_kind(get(name), owner, name)
        have = stub_members[name]
        if have[0] == "class" and want[0] == "class":
            continue
        if owner is not None and want[0] == "function" and have[0] == "function":
            continue  # a method
        if want[0] == "data" and have[0] == "data" and have[1] is not None and have[1] is not want[1]:
            problems.append(f"{where}{name}: the stub says {have[1].__name__}, the extension has "
                            f"{want[1].__name__}")
        elif want[0] != have[0]:
            problems.append(f"{where}{name}: the stub says {have[0]}, the extension has {want[0]}")
    for name, (kind, _detail) in sorted(stub_members.items()):
        if name in runtime_names:
            continue
        if name.startswith("__") and name.endswith("__") and owner is not None and hasattr(owner, name):
            continue
        if owner is None and name.startswith("_") and not name.startswith("__") and \
                (kind == "alias" or kind == "class" and name in HELPERS["modules"]):
            continue  # a type helper of the stub's own
        problems.append(f"{where}{name}: in the stub, not in the extension")
    return problems


def test_stub_was_read():
    # The reader found the stub's names (an empty reading would pass the comparisons).
    assert {"Channel", "task", "dumps", "PROTOCOL_VERSION"} <= set(STUB_TOP)
    assert STUB_TOP["task"][0] == "module"


def test_module_names_match():
    problems = _compare("_core.", set(dir(_core)), lambda n: getattr(_core, n), STUB_TOP)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(n for n in _public(dir(_core)) if isinstance(getattr(_core, n), type)))
def test_class_members_match(name):
    cls = getattr(_core, name)
    assert STUB_TOP.get(name, ("",))[0] == "class", f"{name} is not a class in the stub"
    body = STUB_TOP[name][1].body
    own = {n for n in vars(cls) if not (n.startswith("__") and n.endswith("__"))}
    problems = _compare(f"_core.{name}.", own, lambda n: getattr(cls, n), _members(body, HELPERS), owner=cls)
    assert not problems, "\n".join(problems)


def test_submodule_names_match():
    for name in sorted(_public(dir(_core))):
        sub = getattr(_core, name)
        if not isinstance(sub, types.ModuleType):
            continue
        ann = next(n.annotation for n in TREE.body if isinstance(n, ast.AnnAssign)
                   and isinstance(n.target, ast.Name) and n.target.id == name)
        helper = ast.unparse(ann)
        assert helper in HELPERS["modules"], f"_core.{name}: the stub gives it no class describing its names"
        body = next(n.body for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == helper)
        problems = _compare(f"_core.{name}.", set(dir(sub)), lambda n: getattr(sub, n), _members(body, HELPERS))
        assert not problems, "\n".join(problems)


def test_comparison_catches_drift():
    # The comparison itself: a missing name, a wrong kind, a wrong data type, an extra name.
    stub = _members(ast.parse("A: int\ndef f() -> None: ...\nB: str\nclass C: ...\nZ: int\n_Alias = int\n").body,
                    HELPERS)
    ns = types.SimpleNamespace(A=1, f=2, B=3, C=int, D=4)
    problems = _compare("m.", set(vars(ns)), lambda n: getattr(ns, n), stub)
    assert problems == ["m.B: the stub says str, the extension has int",
                        "m.D: in the extension, not in the stub",
                        "m.f: the stub says function, the extension has data",
                        "m.Z: in the stub, not in the extension"]
