"""How ringpool's own modules import each other, read from their source (no module is imported).

- No circle among the imports between them, whether a module runs them when it is imported (its
  top-level statements, class bodies included) or later, inside a function.
- The worker-side modules (the task pools' worker loop, the generic Process entry, the zygote) do
  not reach a parent-side module (executor, context, popen) through those imports.
- An import of one of ringpool's modules inside a function says why it is there, in a comment on
  its line or the line above.

(At run time every submodule import first runs ringpool/__init__.py, which imports the public
API, executor included; these rules are about the modules' own edges, which that does not hide.)
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "bindings" / "ringpool"
WORKER_SIDE = ("ringpool._pool_worker", "ringpool._worker", "ringpool._zygote")
PARENT_SIDE = ("ringpool.executor", "ringpool.context", "ringpool.popen")


def _target(node, package, submodules):
    """The ringpool modules an import statement names (empty for anything else)."""
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == package or alias.name.startswith(package + "."):
                out.append(alias.name)
    elif isinstance(node, ast.ImportFrom):
        if node.level == 0:
            base = node.module or ""
            if base != package and not base.startswith(package + "."):
                return out
        elif node.level == 1:
            base = package + ("." + node.module if node.module else "")
        else:
            raise AssertionError(f"line {node.lineno}: an import above the package")
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.append(sub if sub in submodules else base)
    return out


def _imports(tree, package, submodules):
    """(top-level targets, [(lineno, targets)] of imports inside functions)."""
    top, inner = [], []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = _target(child, package, submodules)
                if names:
                    if in_function:
                        inner.append((child.lineno, names))
                    else:
                        top.extend(names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, inner


def import_graph(folder, package="ringpool"):
    """{module: set of modules its top-level statements import}, and the imports in functions
    {module: [(lineno, targets, source lines)]}, for every .py file of one package folder."""
    files = {}
    for path in sorted(pathlib.Path(folder).glob("*.py")):
        name = package if path.stem == "__init__" else f"{package}.{path.stem}"
        files[name] = path
    # Extension modules (_core) are submodules too, though not nodes of their own.
    submodules = set(files) | {f"{package}.{p.name.partition('.')[0]}" for p in pathlib.Path(folder).glob("*.so")}
    submodules |= {f"{package}.{p.stem}" for p in pathlib.Path(folder).glob("*.pyi")}
    graph, inner = {}, {}
    for name, path in files.items():
        text = path.read_text(encoding="utf-8")
        top, nested = _imports(ast.parse(text, str(path)), package, submodules)
        graph[name] = {t for t in top if t != name}
        lines = text.splitlines()
        inner[name] = [(ln, names, lines[ln - 2] if ln >= 2 else "", lines[ln - 1]) for ln, names in nested]
    return graph, inner


def find_cycle(graph):
    """One import circle as a list of modules [a, b, ..., a], or None."""
    state, stack = {}, []

    def dfs(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


GRAPH, INNER = import_graph(PACKAGE)
# Every edge, the imports inside functions too (a circle through one of those is still a circle).
ALL = {name: GRAPH[name] | {t for _ln, targets, _a, _l in INNER[name] for t in targets if t != name}
       for name in GRAPH}


def test_graph_sees_the_package():
    # The reader found the modules and their edges (a reader that found nothing would pass the rest).
    assert {"ringpool", "ringpool.executor", "ringpool._pool_worker", "ringpool._worker"} <= set(GRAPH)
    assert "ringpool._pool_worker" in reachable(GRAPH, "ringpool.executor")
    assert "ringpool.executor" in GRAPH["ringpool"]


def test_no_import_circle():
    cycle = find_cycle(ALL)
    assert cycle is None, "import circle among ringpool's modules: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", WORKER_SIDE)
def test_worker_side_imports_nothing_parent_side(module):
    assert module in GRAPH
    bad = reachable(ALL, module) & (set(PARENT_SIDE) | {"ringpool"})
    assert not bad, f"{module} imports the parent side: {sorted(bad)}"


def test_imports_in_functions_say_why():
    unexplained = [f"{name}:{ln}: {line.strip()}" for name, items in INNER.items()
                   for ln, _targets, above, line in items
                   if "#" not in line and not above.strip().startswith("#")]
    assert not unexplained, "imports inside functions with no comment saying why:\n" + "\n".join(unexplained)


# -- the checks themselves, on a made-up package -------------------------------------------------------

def _write(folder, files):
    folder.mkdir()
    for name, text in files.items():
        (folder / (name if "." in name else f"{name}.py")).write_text(text, encoding="utf-8")


def test_checks_catch_a_circle_and_a_parent_import(tmp_path):
    _write(tmp_path / "pkg", {
        "__init__": "from . import a\n",
        "a": "import os\nfrom .b import thing\n",
        "b": "from . import c\n\ndef f():\n    from . import a\n",  # in a function: no edge
        "c": "if True:\n    from pkg import a\nclass K:\n    from .d import x\n",
        "d": "",
        "_ext.pyi": "",  # an extension's stub: a submodule, not the package
        "e": "from . import _ext\n",
    })
    graph, inner = import_graph(tmp_path / "pkg", package="pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a", "pkg.d"},
                     "pkg.d": set(), "pkg.e": {"pkg._ext"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert reachable(graph, "pkg.d") == set() and "pkg.a" in reachable(graph, "pkg.b")
    assert [(ln, t) for ln, t, _above, _line in inner["pkg.b"]] == [(4, ["pkg.a"])]
    del graph["pkg.c"]
    assert find_cycle(graph) is None
