"""Users' type checkers see ringpool's public API with its types (py.typed, annotations, and the
stubs executor.pyi and _core.pyi).

mypy (Debian's package) checks tests/python/typing/user_program.py strictly and must find nothing,
and checks user_errors.py, where it must report exactly the mistakes marked there. The stub
executor.pyi is held to the module it describes: every public name and method exists on both sides
with the same parameters.
"""
import ast
import inspect
import os
import re
import shutil
import subprocess

import pytest

from conftest import BINDINGS

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "typing")
MYPY = shutil.which("mypy")

pytestmark = pytest.mark.timeout(600)


def run_mypy(program, tmp_path):
    if MYPY is None:
        pytest.skip("mypy is not installed (Debian: apt-get install mypy)")
    r = subprocess.run([MYPY, "--config-file", os.path.join(HERE, "mypy.ini"), "--cache-dir", str(tmp_path / "cache"),
                        "--no-error-summary", os.path.join(HERE, program)], capture_output=True, text=True,
                       timeout=540, cwd=HERE, env=dict(os.environ, MYPYPATH=BINDINGS))
    return r


def test_typed_user_program_passes_strict_mypy(tmp_path):
    r = run_mypy("user_program.py", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_type_errors_in_user_code_are_caught(tmp_path):
    r = run_mypy("user_errors.py", tmp_path)
    reported = {(int(m.group(1)), m.group(2)) for m in re.finditer(r"user_errors\.py:(\d+): error: .*\[([a-z-]+)\]$",
                                                                    r.stdout, re.M)}
    with open(os.path.join(HERE, "user_errors.py")) as f:
        expected = {(i, m.group(1)) for i, line in enumerate(f, 1) if (m := re.search(r"# E: ([a-z-]+)$", line))}
    assert len(expected) >= 7
    assert reported == expected, r.stdout


def _stub_functions(path):
    """{qualified name: [ast.arguments of each definition]} of a stub's classes and functions."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out.setdefault(node.name, []).append(node.args)
        elif isinstance(node, ast.ClassDef):
            out.setdefault(node.name, [])
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    out.setdefault(f"{node.name}.{item.name}", []).append(item.args)
    return out


def _stub_params(args):
    params = [(a.arg, "POSITIONAL_ONLY") for a in args.posonlyargs] + [(a.arg, "POSITIONAL_OR_KEYWORD") for a in args.args]
    if args.vararg:
        params.append((args.vararg.arg, "VAR_POSITIONAL"))
    params += [(a.arg, "KEYWORD_ONLY") for a in args.kwonlyargs]
    if args.kwarg:
        params.append((args.kwarg.arg, "VAR_KEYWORD"))
    return [p for p in params if p[0] != "self"]


def test_executor_stub_matches_the_module():
    import ringpool.executor as mod

    stub = _stub_functions(os.path.join(BINDINGS, "ringpool", "executor.pyi"))
    runtime = {}
    for name in mod.__all__:
        obj = getattr(mod, name)
        runtime[name] = obj
        if inspect.isclass(obj):
            for mname, member in vars(obj).items():
                if not mname.startswith("_") or mname == "__init__":
                    if inspect.isfunction(member):
                        runtime[f"{name}.{mname}"] = member
    missing = sorted(set(runtime) - set(stub))
    assert not missing, f"in ringpool/executor.py but not in executor.pyi (users' type checkers miss them): {missing}"
    for qual, defs in stub.items():
        if qual == "serve_pool":
            continue  # the worker's entry point (ringpool._worker imports it), not user API
        assert qual in runtime or qual.split(".")[0] in runtime, f"executor.pyi has {qual}, the module does not"
        if not defs:
            continue
        sig = inspect.signature(runtime[qual])
        actual = [(p.name, p.kind.name) for p in sig.parameters.values() if p.name != "self"]
        for args in defs:
            assert _stub_params(args) == actual, f"{qual}: stub {_stub_params(args)} != module {actual}"

