"""The API reference, docs/guide/api.md, generated from ringpool's docstrings; and its check.

    python tools/apidoc.py            # rewrite docs/guide/api.md
    python tools/apidoc.py --check    # exit 1 if a public name has no docstring or api.md is stale

The public API is every name in ``ringpool.__all__`` and, for each public submodule (a module of
the package whose name does not start with ``_``), every name in its ``__all__`` (or, without one,
every name it defines that does not start with ``_``); for a public class, also its own public
methods and properties (those it defines, not what it inherits). Each must have a docstring: a
name without one fails ``--check``, and so does an api.md that differs from what the docstrings
give now. tests/python/test_api_docs.py runs the check in ``./run test``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_MD = os.path.join(ROOT, "docs", "guide", "api.md")

HEADER = """# API reference

Generated from the docstrings by `tools/apidoc.py` (do not edit by hand: edit the docstring and
run `python tools/apidoc.py`; `./run test` fails when this page is stale or a public name has no
docstring). Guides: [DataLoader](dataloader.md), [process pools, Executor and
joblib](executor.md), [code from any folder](code-from-any-folder.md), [C++ pool](cpp-pool.md),
[troubleshooting](troubleshooting.md).
"""


def public_submodules(package):
    names = []
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            names.append(f"{package.__name__}.{info.name}")
    return sorted(names)


def public_names(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items()
                 if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
                 and (inspect.isclass(v) or inspect.isfunction(v))]
    return [n for n in names if n != "__version__"]


def own_members(cls):
    """Public methods and properties a class defines itself (not inherited)."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property) or inspect.isroutine(value):
            out.append((name, value))
    return out


def signature(obj, name):
    target = obj.fget if isinstance(obj, property) else obj
    if isinstance(obj, property):
        return name
    try:
        sig = str(inspect.signature(target))
    except (TypeError, ValueError):
        return name
    return name + sig


def doc_of(obj):
    """The object's own docstring, cleaned, or None. Not inspect.getdoc: it falls back to a base
    class's docstring (Executor.submit would pass with concurrent.futures' text)."""
    if inspect.isclass(obj):
        doc = vars(obj).get("__doc__")
    elif isinstance(obj, property):
        doc = obj.__doc__ or (obj.fget.__doc__ if obj.fget else None)
    else:
        doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def contract_doc(cls, name, package_name):
    """For a method without a docstring that overrides one of a base class outside the package
    (``Executor.shutdown`` of ``concurrent.futures.Executor``): that base's docstring, naming it.
    An override keeps its base's contract; a deviation must be written in the class docstring."""
    for base in cls.__mro__[1:]:
        if base.__module__.split(".")[0] == package_name or name not in vars(base):
            continue
        doc = doc_of(vars(base)[name])
        if doc:
            return f"As `{base.__module__}.{base.__qualname__}.{name}`:\n\n{doc}"
    return None


def collect(package_name="ringpool"):
    """[(module name, [(qualified name, signature, kind, doc or None)])] and the undocumented."""
    package = importlib.import_module(package_name)
    sections = []
    missing = []
    seen = set()
    for modname in [package_name] + public_submodules(package):
        module = importlib.import_module(modname)
        entries = []
        if modname != package_name and not inspect.getdoc(module):
            missing.append(modname)
        for name in public_names(module):
            if not hasattr(module, name):
                missing.append(f"{modname}.{name} (in __all__ but not defined)")
                continue
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue  # a submodule: its own section
            qual = f"{modname}.{name}"
            # A name re-exported by the package root is documented once, where it is defined.
            if modname == package_name and (inspect.isclass(obj) or inspect.isroutine(obj)):
                home = getattr(obj, "__module__", "")
                if home.startswith(package_name + ".") and not home.split(".")[1].startswith("_"):
                    entries.append((qual, name, "alias", f"See `{home}.{name}`."))
                    continue
            if id(obj) in seen and (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            seen.add(id(obj))
            if inspect.isclass(obj):
                kind = "exception" if issubclass(obj, BaseException) else "class"
                doc = doc_of(obj)
                if doc is None and kind == "class" and "__init__" in vars(obj):
                    doc = doc_of(vars(obj)["__init__"])
            elif inspect.isroutine(obj):
                kind, doc = "function", doc_of(obj)
            else:
                kind, doc = "data", None  # constants: documented by the module's docstring
                entries.append((qual, f"{name} = {obj!r}", kind, ""))
                continue
            if not doc:
                missing.append(qual)
            entries.append((qual, signature(obj, name), kind, doc))
            if inspect.isclass(obj):
                for mname, member in own_members(obj):
                    mdoc = doc_of(member) or contract_doc(obj, mname, package_name)
                    if not mdoc:
                        missing.append(f"{qual}.{mname}")
                    entries.append((f"{qual}.{mname}", signature(member, mname),
                                    "property" if isinstance(member, property) else "method", mdoc))
        sections.append((modname, inspect.getdoc(module) or "", entries))
    return sections, missing


def anchor(qual):
    return qual.replace(".", "").lower()


def render(sections):
    out = [HEADER]
    for modname, mdoc, entries in sections:
        out.append(f"\n## `{modname}`\n\n")
        # The package's docstring is the overview; a submodule's first paragraph says what it is.
        text = mdoc if "." not in modname else mdoc.split("\n\n")[0]
        if text.strip():
            out.append(text.strip() + "\n")
        aliases = [(qual, doc) for qual, _, kind, doc in entries if kind == "alias"]
        if aliases:
            out.append("\n| name | defined in |\n|---|---|\n")
            for qual, doc in aliases:
                home = doc[len("See `"):-len("`.")]
                out.append(f"| `{qual}` | [`{home}`](#{anchor(home)}) |\n")
        for qual, sig, kind, doc in entries:
            if kind == "alias":
                continue
            depth = "####" if kind in ("method", "property") else "###"
            out.append(f"\n{depth} {qual}\n\n*{kind}* `{sig}`\n")
            if doc:
                out.append("\n" + doc.strip() + "\n")
    return "".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a name lacks docs or api.md is stale")
    parser.add_argument("--output", default=API_MD)
    args = parser.parse_args(argv)
    sections, missing = collect()
    text = render(sections)
    if args.check:
        ok = True
        if missing:
            ok = False
            print("public names without a docstring:\n  " + "\n  ".join(missing), file=sys.stderr)
        try:
            with open(args.output) as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            ok = False
            print(f"{os.path.relpath(args.output, ROOT)} is stale: run python tools/apidoc.py", file=sys.stderr)
        return 0 if ok else 1
    with open(args.output, "w") as f:
        f.write(text)
    if missing:
        print("public names without a docstring:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
