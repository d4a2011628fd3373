"""Bundles: zip archives of Python packages, resources and pickles, for other machines and services.

torch.package's idea in ringpool's terms. A ``BundleWriter`` starts from the modules and objects you
save, finds everything they import (an AST walk of each saved module, the GLOBAL opcodes of each
saved pickle), decides for each module by the first matching rule what happens to it, and writes
one zip. A ``Bundle`` reads it back into a private namespace of this process, or a context made with
``get_context(bundle=...)`` makes it the environment of its workers.

::

    writer                                           reader
    ------                                           ------
    save_module / save_source_string ─┐              Bundle.open(path)       validate, no code runs
    save_pickle (GLOBALs) ────────────┼─► close():     │ import_module("pkg")  "<ringpool_bundle_N>.pkg"
    save_text / save_binary           │   analysis     │ load_pickle(...)      classes from the bundle
    intern / extern / mock / deny ────┘   rules, zip   │ importlib.resources   files() of the archive
                                              │        ▼
                                              └──► get_context(bundle=...) ─► zygote / worker:
                                                   archive bytes              _install_environment:
                                                                              real names, sys.meta_path

- ``BundleWriter``: collects sources, resources and rules; ``close()`` analyses, then either writes
  the archive (atomically, by rename) or raises one ``BundleError`` listing every problem.
- ``Bundle``: the parsed, verified archive. Opening executes nothing and changes no global state;
  the first ``import_module``/``load_pickle`` mounts it in the finder under a mangled root name.
- ``_BundleFinder``: one instance, first in ``sys.meta_path`` while anything is mounted. It answers
  for the mangled roots of open bundles and for the real top-level names of a bundle installed as
  the environment (in a worker); everything else goes to the normal finders.
- ``_BundleLoader``: executes a module's source from memory under ``<archive>/<path>``, puts its
  lines into ``linecache``; in an isolated bundle it gives the module a ``__builtins__`` whose
  ``__import__`` maps the bundle's real names onto its mangled ones.

This module imports nothing from ringpool but ``modules`` (no ``_core``).

Deviations from torch.package: module names are mangled as ``<ringpool_bundle_N>.pkg.mod`` and *are*
put in ``sys.modules`` (so ``pickle`` by reference, ``dataclasses`` and ``typing`` work inside this
process); a mocked module is a generated source file (so it runs unchanged in a worker or a C++
service); standard-library modules are extern unless a mock or deny rule names them; and
``save_module`` interns exactly the module named (its package's other submodules come only from
the dependency analysis). docs/design/code-shipping.md ("Bundles") has the format and the rules.
"""
from __future__ import annotations

import ast
import builtins
import fnmatch
import hashlib
import importlib
import importlib.machinery
import io
import itertools
import json
import keyword
import os
import pickle
import pickletools
import sys
import threading
import zipfile
from importlib.machinery import ModuleSpec
from importlib.resources.abc import Traversable, TraversableResources

from . import modules as _modules

__all__ = ["BadBundleError", "Bundle", "BundleError", "BundleWriter", "Directory"]

FORMAT = "ringpool.bundle"
FORMAT_VERSION = 1
MANIFEST = ".ringpool/manifest.json"
# Limits checked when an archive is opened (before anything is decompressed). A bundle is code the
# user chose to run; these keep a corrupt or hostile file from exhausting memory, not from running.
DEFAULT_MAX_BYTES = 1 << 30     # total uncompressed size of all entries
DEFAULT_MAX_FILES = 100_000     # entries in the zip
_MAX_MANIFEST = 64 << 20        # bytes of manifest JSON
_MAX_PATH = 1024                # characters in one entry name

_ACTIONS = ("intern", "extern", "mock", "deny")
_ROOT_PREFIX = "<ringpool_bundle_"
_mount_ids = itertools.count(1)
_lock = threading.RLock()  # the finder's tables; the finder itself reads them without it


class BundleError(Exception):
    """Writing a bundle failed. ``str()`` lists every problem; the attributes hold them as data.

    ``unmatched``: ``{module: [who imported or pickled it]}`` for modules no rule matched.
    ``denied``: the same for modules a deny rule matched. ``problems``: every other reason, as
    sentences (no source, conflicting actions, a mocked module a pickle needs, ...).
    """

    def __init__(self, dest, unmatched, denied, problems):
        self.unmatched = unmatched
        self.denied = denied
        self.problems = problems
        lines = [f"cannot write bundle {dest}:"]
        if denied:
            lines.append("  denied modules (a deny rule matched):")
            lines += [f"    {m} (needed by {', '.join(w)})" for m, w in sorted(denied.items())]
        if unmatched:
            lines.append("  modules no rule matched (add intern, extern or mock patterns):")
            lines += [f"    {m} (needed by {', '.join(w)})" for m, w in sorted(unmatched.items())]
        if problems:
            lines.append("  other problems:")
            lines += [f"    {p}" for p in problems]
        super().__init__("\n".join(lines))


class BadBundleError(ValueError):
    """An archive that is not a valid bundle (bad zip, entry names, manifest, version or hash)."""


# --- names and patterns ---


def _check_module_name(name, what="module name"):
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    for part in name.split("."):
        if not part.isidentifier() or keyword.iskeyword(part) or part == "__init__":
            raise ValueError(f"{name!r} is not a valid {what} (dotted identifiers)")
    return name


def _module_path(name, is_package):
    base = name.replace(".", "/")
    return base + "/__init__.py" if is_package else base + ".py"


def _split_resource(resource):
    if not isinstance(resource, str) or not resource:
        raise ValueError(f"resource name must be a non-empty string, got {resource!r}")
    parts = resource.split("/")
    for part in parts:
        if part in ("", ".", "..") or "\\" in part or "\0" in part:
            raise ValueError(f"resource name {resource!r} must be a relative path without "
                             f"'', '.' or '..' components or backslashes")
    return parts


def _resource_path(package, resource):
    _check_module_name(package, "package name")
    return "/".join([*package.split("."), *_split_resource(resource)])


def _check_entry_name(name):
    """A zip entry name that cannot escape the extraction folder or name a special file."""
    if (not isinstance(name, str) or not name or len(name) > _MAX_PATH or name.startswith("/")
            or "\\" in name or "\0" in name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _is_stdlib(name):
    top = name.partition(".")[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


def _glob_match(pattern_parts, parts):
    """``**`` matches zero or more segments; other segments are fnmatch patterns (``*``, ``?``)."""
    if not pattern_parts:
        return not parts
    head, rest = pattern_parts[0], pattern_parts[1:]
    if head == "**":
        return any(_glob_match(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _glob_match(rest, parts[1:])


class _Rule:
    __slots__ = ("action", "include", "exclude", "allow_empty", "used")

    def __init__(self, action, include, exclude, allow_empty):
        self.action = action
        self.include = [p.split(".") for p in _patterns(include)]
        self.exclude = [p.split(".") for p in _patterns(exclude)]
        self.allow_empty = allow_empty
        self.used = False

    def matches(self, name):
        parts = name.split(".")
        return (any(_glob_match(p, parts) for p in self.include)
                and not any(_glob_match(p, parts) for p in self.exclude))

    def describe(self):
        return f"{self.action}({', '.join('.'.join(p) for p in self.include)!s})"


def _patterns(value):
    if isinstance(value, str):
        value = [value]
    out = list(value)
    for p in out:
        if not isinstance(p, str) or not p or any(s == "" for s in p.split(".")):
            raise ValueError(f"{p!r} is not a module pattern (dotted names, '*', '**')")
    return out


# --- the writer ---


class _Node:
    __slots__ = ("name", "action", "needed_by", "source", "is_package", "analyze", "explicit",
                 "pending", "empty_namespace")

    def __init__(self, name):
        self.name = name
        self.action = None
        self.needed_by = []
        self.source = None
        self.is_package = False
        self.analyze = True
        self.explicit = False
        self.pending = []  # (child, importer): "from name import child" candidates, if interned
        self.empty_namespace = False


class BundleWriter:
    """Writes one bundle to ``dest`` (a path, or a binary file object) when closed.

    Rules (``intern``, ``extern``, ``mock``, ``deny``) apply to the modules the analysis finds, in
    the order they were added; the first that matches decides. ``save_*`` adds content. ``close()``
    (or leaving the ``with`` block without an exception) analyses and writes; an exception inside
    the block writes nothing.

    ``search_path``: folders searched for top-level modules before the normal import machinery (so
    a package can be bundled without being on ``sys.path`` or imported). Modules are found without
    being executed; their source is read through their loader.

    Not thread-safe: one thread builds a bundle.
    """

    def __init__(self, dest, *, search_path=()):
        self._dest = dest
        self._search_path = [os.fspath(p) for p in search_path]
        self._rules = []
        self._saved = {}      # module name -> (source bytes, is_package, analyze)
        self._resources = {}  # archive path -> bytes
        self._pickles = []    # (archive path, [(module, qualname)]) for analysis
        self._specs = {}
        self._from_search = set()
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._closed = True

    def __repr__(self):
        return f"<ringpool.BundleWriter {self._dest!r}{' closed' if self._closed else ''}>"

    # -- rules ---------------------------------------------------------------------------------
    def intern(self, include, *, exclude=(), allow_empty=True):
        """Put the source of matching modules in the bundle (and analyse their imports)."""
        return self._rule("intern", include, exclude, allow_empty)

    def extern(self, include, *, exclude=(), allow_empty=True):
        """Matching modules come from the loading environment (recorded in the manifest)."""
        return self._rule("extern", include, exclude, allow_empty)

    def mock(self, include, *, exclude=(), allow_empty=True):
        """Replace matching modules with a stub whose attributes raise NotImplementedError when
        called or otherwise used."""
        return self._rule("mock", include, exclude, allow_empty)

    def deny(self, include, *, exclude=()):
        """Writing fails if anything needs a matching module."""
        return self._rule("deny", include, exclude, True)

    def _rule(self, action, include, exclude, allow_empty):
        self._check_open()
        self._rules.append(_Rule(action, include, exclude, bool(allow_empty)))
        return self

    # -- content -------------------------------------------------------------------------------
    def save_module(self, name, *, dependencies=True):
        """Intern module ``name`` (found by ``search_path`` and then the normal import machinery,
        without executing it), whatever the rules say; with ``dependencies``, its imports are
        analysed. A package's submodules are bundled only if something imports them."""
        self._check_open()
        _check_module_name(name)
        spec = self._find_spec(name)
        if spec is None:
            raise ModuleNotFoundError(f"no module named {name!r} to save", name=name)
        source, is_package, _ = self._source_of(name, spec)
        self._save(name, source, is_package, dependencies)

    def save_source_string(self, name, source, *, is_package=False, dependencies=True):
        """Intern module ``name`` with the given source (str or bytes)."""
        self._check_open()
        _check_module_name(name)
        if isinstance(source, str):
            source = source.encode("utf-8")
        if not isinstance(source, bytes):
            raise TypeError(f"source must be str or bytes, got {type(source).__name__}")
        self._save(name, source, bool(is_package), dependencies)

    def _save(self, name, source, is_package, dependencies):
        if name in self._saved:
            raise ValueError(f"module {name!r} is already saved in this bundle")
        self._saved[name] = (source, is_package, bool(dependencies))

    def save_pickle(self, package, resource, obj, *, dependencies=True, protocol=4):
        """Pickle ``obj`` (by reference, the standard pickler) as resource ``package/resource``;
        with ``dependencies``, every module named by a GLOBAL/STACK_GLOBAL opcode is analysed."""
        self._check_open()
        path = _resource_path(package, resource)
        data = pickle.dumps(obj, protocol=protocol)
        globals_ = _pickle_globals(data) if dependencies else []
        self._put_resource(path, data)
        self._pickles.append((path, globals_))

    def save_text(self, package, resource, text, *, encoding="utf-8"):
        """Save ``text`` as resource ``package/resource`` (readable by ``load_text`` and, when
        ``package`` is bundled, by ``importlib.resources`` from bundled code)."""
        self._check_open()
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        self._put_resource(_resource_path(package, resource), text.encode(encoding))

    def save_binary(self, package, resource, data):
        """Save bytes as resource ``package/resource``."""
        self._check_open()
        self._put_resource(_resource_path(package, resource), bytes(memoryview(data)))

    def _put_resource(self, path, data):
        if path in self._resources:
            raise ValueError(f"resource {path!r} is already saved in this bundle")
        self._resources[path] = data

    def _check_open(self):
        if self._closed:
            raise ValueError("this BundleWriter is closed")

    # -- close: analysis and writing -----------------------------------------------------------
    def close(self):
        """Analyse and write the archive; raises BundleError (and writes nothing) on any problem.
        The writer is closed either way; closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        files, manifest = self._analyze()
        data = _zip_bytes(files, manifest)
        if hasattr(self._dest, "write"):
            self._dest.write(data)
            return
        dest = os.fspath(self._dest)
        tmp = f"{dest}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)  # readers never see a half-written bundle
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _analyze(self):
        nodes = {}
        queue = []
        problems = []

        def need(name, who):
            node = nodes.get(name)
            if node is None:
                node = nodes[name] = _Node(name)
                queue.append(node)
            if who not in node.needed_by:
                node.needed_by.append(who)
            return node

        def need_from(parent, child, who):
            node = need(parent, who)
            if node.action is None:
                node.pending.append((child, who))
            elif node.action == "intern" and is_module(f"{parent}.{child}"):
                need(f"{parent}.{child}", who)

        def is_module(name):
            return name in self._saved or self._find_spec(name) is not None

        for name, (source, is_package, analyze) in self._saved.items():
            node = need(name, "save_module")
            node.action, node.source, node.is_package = "intern", source, is_package
            node.analyze, node.explicit = analyze, True
        for path, globals_ in self._pickles:
            for module, qualname in globals_:
                need(module, f"pickle {path} ({qualname})")

        i = 0
        while i < len(queue):
            node = queue[i]
            i += 1
            name = node.name
            if node.action is None:
                node.action = self._decide(name, problems)
            if node.action in ("intern", "mock"):
                parent = name.rpartition(".")[0]
                if parent:
                    need(parent, f"{name} (its package)")
            if node.action == "intern" and not node.explicit:
                spec = self._find_spec(name)
                if spec is None:
                    problems.append(f"{name}: interned, but no such module was found")
                    continue
                try:
                    node.source, node.is_package, node.empty_namespace = self._source_of(name, spec)
                except ValueError as e:
                    problems.append(str(e))
                    continue
            if node.action == "intern":
                for child, who in node.pending:
                    if is_module(f"{name}.{child}"):
                        need(f"{name}.{child}", who)
                if node.analyze:
                    try:
                        found = _imports(node.source, name, node.is_package)
                    except (SyntaxError, ValueError) as e:
                        problems.append(f"{name}: cannot analyse its source: {e}")
                        found = ()
                    for kind, module, child in found:
                        if kind == "import":
                            need(module, name)
                        else:
                            need_from(module, child, name)
            node.pending = []

        denied = {n.name: n.needed_by for n in nodes.values() if n.action == "deny"}
        unmatched = {n.name: n.needed_by for n in nodes.values() if n.action == "unmatched"}
        bundled = {n.name: n for n in nodes.values() if n.action in ("intern", "mock")}
        tops = {name.partition(".")[0] for name in bundled}
        for n in nodes.values():
            if n.action == "extern" and n.name.partition(".")[0] in tops:
                problems.append(f"{n.name}: extern, but inside bundled package "
                                f"{n.name.partition('.')[0]!r} (a package and its submodules are "
                                f"either all in the bundle, interned or mocked, or all extern)")
        for name, n in bundled.items():
            parent = bundled.get(name.rpartition(".")[0])
            if parent is not None and parent.action == "intern" and not parent.is_package:
                problems.append(f"{name}: its parent {parent.name!r} is a module, not a package")
        for path, globals_ in self._pickles:
            for module, qualname in globals_:
                n = nodes[module]
                if n.action == "mock":
                    problems.append(f"pickle {path} needs {module}.{qualname}, but {module} is "
                                    f"mocked (loading it would fail)")
        for rule in self._rules:
            if not rule.allow_empty and not rule.used:
                problems.append(f"{rule.describe()} matched no module (allow_empty=False)")
        files = {}
        modules = {}
        for name in sorted(bundled):
            n = bundled[name]
            if n.action == "mock":
                source, is_package = _mock_source(name).encode(), True
            else:
                source, is_package = n.source, n.is_package
            path = _module_path(name, is_package)
            files[path] = source
            modules[name] = {"action": n.action, "package": is_package, "path": path,
                             "sha256": hashlib.sha256(source).hexdigest()}
        resources = {}
        for path, data in sorted(self._resources.items()):
            if path in files:
                problems.append(f"resource {path!r} has the path of module source")
                continue
            files[path] = data
            resources[path] = hashlib.sha256(data).hexdigest()
        problems += _layout_problems(files)
        if unmatched or denied or problems:
            raise BundleError(self._dest, unmatched, denied, problems)
        externs = sorted(n.name for n in nodes.values() if n.action == "extern")
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "modules": modules,
            "resources": resources,
            "externs": [m for m in externs if not _is_stdlib(m)],
            "stdlib": [m for m in externs if _is_stdlib(m)],
        }
        return files, manifest

    def _decide(self, name, problems):
        if name in ("__main__", "__mp_main__"):
            problems.append(f"{name}: code in the main script cannot be bundled; move it into a "
                            f"module")
            return "error"
        if name.startswith(_ROOT_PREFIX):
            problems.append(f"{name}: belongs to an opened bundle; objects loaded from a bundle "
                            f"cannot be saved into another one")
            return "error"
        stdlib = _is_stdlib(name)
        for rule in self._rules:
            if stdlib and rule.action in ("intern", "extern"):
                continue  # the standard library is always the environment's
            if rule.matches(name):
                rule.used = True
                return rule.action
        return "extern" if stdlib else "unmatched"

    # -- finding sources without executing them ------------------------------------------------
    def _find_spec(self, name):
        if name in self._specs:
            return self._specs[name]
        parent, _, _ = name.rpartition(".")
        spec = None
        try:
            if not parent:
                if self._search_path:
                    spec = importlib.machinery.PathFinder.find_spec(name, self._search_path)
                    if spec is not None:
                        self._from_search.add(name)
                if spec is None:
                    spec = self._loaded_spec(name) or _meta_find(name, None)
            else:
                pspec = self._find_spec(parent)
                locations = None if pspec is None else pspec.submodule_search_locations
                if locations is not None:
                    if name.partition(".")[0] in self._from_search:
                        spec = importlib.machinery.PathFinder.find_spec(name, list(locations))
                    else:
                        spec = self._loaded_spec(name) or _meta_find(name, list(locations))
        except (ImportError, ValueError):
            spec = None
        self._specs[name] = spec
        return spec

    @staticmethod
    def _loaded_spec(name):
        module = sys.modules.get(name)
        return getattr(module, "__spec__", None) if module is not None else None

    @staticmethod
    def _source_of(name, spec):
        """(source bytes, is_package, is_empty_namespace) or ValueError."""
        is_package = spec.submodule_search_locations is not None
        if is_package and spec.origin in (None, "namespace"):
            return b"", True, True
        loader = spec.loader
        origin = spec.origin
        try:
            if origin and origin.endswith(".py") and hasattr(loader, "get_data"):
                return loader.get_data(origin), is_package, False
            source = loader.get_source(name) if hasattr(loader, "get_source") else None
        except (ImportError, OSError) as e:
            raise ValueError(f"{name}: cannot read its source ({e})") from None
        if source is None:
            raise ValueError(f"{name}: no Python source (extension, built-in or bytecode-only "
                             f"module from {origin!r}); extern or mock it")
        return source.encode("utf-8"), is_package, False


def _meta_find(name, path):
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is not None:
            spec = find(name, path)
            if spec is not None:
                return spec
    return None


def _imports(source, name, is_package):
    """What a module's source imports: ("import", module, None) and ("from", module, attr)."""
    tree = ast.parse(source, filename=name)
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [("import", alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 >= len(parts) or not package:
                    raise ValueError(f"relative import beyond the top-level package (line "
                                     f"{node.lineno})")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            out.append(("import", module, None))
            out += [("from", module, alias.name) for alias in node.names if alias.name != "*"]
    return out


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
               "BINSTRING", "STRING"}


def _pickle_globals(data):
    """Every (module, qualname) a pickle's GLOBAL, INST and STACK_GLOBAL opcodes name.

    STACK_GLOBAL takes its two strings from the stack: they were pushed just before it, as
    literals or as memo gets, so the last two pushes are tracked along with the memo.
    """
    out = []
    memo = {}
    pushed = []
    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, qualname = arg.partition(" ")
            out.append((module, qualname))
            pushed.append(None)
        elif name in _STRING_OPS:
            pushed.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif name == "STACK_GLOBAL":
            module, qualname = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            if not isinstance(module, str) or not isinstance(qualname, str):
                raise ValueError("cannot analyse a STACK_GLOBAL whose names are not literals")
            out.append((module, qualname))
            pushed.append(None)
        elif name not in ("PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK"):
            pushed.append(None)
        del pushed[:-2]
    return sorted(set(out))


def _layout_problems(files):
    """A path used both as a file and as a folder (a resource named like a package, ...)."""
    problems = []
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in files:
                problems.append(f"{path!r} is under {prefix!r}, which is a file")
    return problems


_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: the same content gives the same bytes


def _zip_bytes(files, manifest):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        entries = [(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())]
        entries += sorted(files.items())
        for path, data in entries:
            info = zipfile.ZipInfo(path, _ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def _mock_source(name):
    return f'''\
# Generated by ringpool.BundleWriter: module {name!r} was mocked when this bundle was written.
# Its attributes exist, but calling or otherwise using one raises NotImplementedError.
_MODULE = {name!r}


class _Mocked:
    __slots__ = ("_name",)

    def __init__(self, name):
        object.__setattr__(self, "_name", name)

    def _use(self, *args, **kwargs):
        raise NotImplementedError(
            f"{{self._name}} is not available: module {{_MODULE!r}} was mocked in this bundle")

    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _Mocked(f"{{self._name}}.{{attr}}")

    def __repr__(self):
        return f"<mocked {{self._name}}>"

    def __instancecheck__(self, obj):
        return False  # nothing is an instance of a mocked class

    def __subclasscheck__(self, cls):
        return False


for _op in ("__call__", "__setattr__", "__delattr__", "__getitem__", "__setitem__",
            "__delitem__", "__iter__", "__len__", "__contains__", "__bool__", "__int__",
            "__float__", "__index__", "__enter__", "__exit__", "__await__", "__mro_entries__",
            "__reduce__", "__reduce_ex__", "__add__", "__radd__", "__sub__", "__rsub__",
            "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__floordiv__", "__mod__",
            "__pow__", "__matmul__", "__neg__", "__lt__", "__le__", "__gt__", "__ge__"):
    setattr(_Mocked, _op, _Mocked._use)
del _op


def __getattr__(attr):
    if attr.startswith("__") and attr.endswith("__"):
        raise AttributeError(attr)
    return _Mocked(f"{{_MODULE}}.{{attr}}")
'''


# --- reading ---


class _ModuleEntry:
    __slots__ = ("name", "action", "package", "path")

    def __init__(self, name, action, package, path):
        self.name, self.action, self.package, self.path = name, action, package, path


class _Archive:
    """A parsed, verified archive: immutable, shared by the mounts made from it."""

    __slots__ = ("data", "label", "files", "manifest", "modules", "tops", "hash", "dirs")

    def __init__(self, data, label, max_bytes=DEFAULT_MAX_BYTES, max_files=DEFAULT_MAX_FILES):
        self.data = data
        self.label = label
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise BadBundleError(f"{label}: not a zip archive ({e})") from None
        with zf:
            infos = zf.infolist()
            if len(infos) > max_files:
                raise BadBundleError(f"{label}: {len(infos)} entries, more than max_files="
                                     f"{max_files}")
            total = sum(i.file_size for i in infos)
            if total > max_bytes:
                raise BadBundleError(f"{label}: {total} bytes uncompressed, more than max_bytes="
                                     f"{max_bytes}")
            names = set()
            for info in infos:
                if not _check_entry_name(info.filename) or info.is_dir():
                    raise BadBundleError(f"{label}: entry {info.filename!r} is not a relative "
                                         f"file path inside the archive")
                if info.filename in names:
                    raise BadBundleError(f"{label}: entry {info.filename!r} appears twice")
                names.add(info.filename)
            if MANIFEST not in names:
                raise BadBundleError(f"{label}: no {MANIFEST} (not a ringpool bundle)")
            if zf.getinfo(MANIFEST).file_size > _MAX_MANIFEST:
                raise BadBundleError(f"{label}: manifest larger than {_MAX_MANIFEST} bytes")
            try:
                raw = {info.filename: zf.read(info) for info in infos}
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
                raise BadBundleError(f"{label}: corrupt entry ({e})") from None
        manifest_bytes = raw.pop(MANIFEST)
        try:
            manifest = json.loads(manifest_bytes)
        except (UnicodeDecodeError, ValueError) as e:
            raise BadBundleError(f"{label}: manifest is not JSON ({e})") from None
        self._check_manifest(manifest, raw)
        self.manifest = manifest
        self.files = raw
        self.hash = hashlib.sha256(manifest_bytes).hexdigest()
        self.modules = {name: _ModuleEntry(name, m["action"], m["package"], m["path"])
                        for name, m in manifest["modules"].items()}
        self.tops = frozenset(name.partition(".")[0] for name in self.modules)
        dirs = {"": set()}
        for path in raw:
            parts = path.split("/")
            for i in range(len(parts)):
                dirs.setdefault("/".join(parts[:i]), set()).add(parts[i])
        self.dirs = {d: sorted(children) for d, children in dirs.items()}

    def _check_manifest(self, m, raw):
        label = self.label

        def bad(msg):
            raise BadBundleError(f"{label}: {msg}")

        if not isinstance(m, dict) or m.get("format") != FORMAT:
            bad(f"manifest format is not {FORMAT!r}")
        if m.get("version") != FORMAT_VERSION:
            bad(f"unsupported bundle format version {m.get('version')!r} (this ringpool reads "
                f"version {FORMAT_VERSION})")
        mods, res = m.get("modules"), m.get("resources")
        if not isinstance(mods, dict) or not isinstance(res, dict):
            bad("manifest lacks its modules or resources table")
        for key in ("externs", "stdlib"):
            if not isinstance(m.get(key), list):
                bad(f"manifest lacks its {key} list")
            for name in m[key]:
                try:
                    _check_module_name(name)
                except ValueError as e:
                    bad(f"manifest {key}: {e}")
        listed = {}
        for name, entry in mods.items():
            try:
                _check_module_name(name)
            except ValueError as e:
                bad(f"manifest: {e}")
            if (not isinstance(entry, dict) or entry.get("action") not in ("intern", "mock")
                    or not isinstance(entry.get("package"), bool)):
                bad(f"manifest entry of module {name!r} is malformed")
            if entry.get("path") != _module_path(name, entry["package"]):
                bad(f"module {name!r} has path {entry.get('path')!r}, expected "
                    f"{_module_path(name, entry['package'])!r}")
            if entry["path"] in listed:
                bad(f"module {name!r} has the path of another module")
            listed[entry["path"]] = (entry.get("sha256"), f"module {name!r}")
        for path, digest in res.items():
            if not _check_entry_name(path) or path.startswith(".ringpool/"):
                bad(f"resource path {path!r} is not a relative path inside the archive")
            if path in listed:
                bad(f"resource {path!r} has the path of a module")
            listed[path] = (digest, f"resource {path!r}")
        for path, (digest, what) in listed.items():
            if path not in raw:
                bad(f"{what} is listed in the manifest but {path!r} is not in the archive")
            if not isinstance(digest, str) or hashlib.sha256(raw[path]).hexdigest() != digest:
                bad(f"{what}: content does not match its sha256 in the manifest")
        for path in raw:
            if path not in listed:
                bad(f"entry {path!r} is not listed in the manifest")
        for problem in _layout_problems(raw):
            bad(problem)
        for name, entry in mods.items():
            parent = name.rpartition(".")[0]
            if parent and not (parent in mods and mods[parent]["package"]):
                bad(f"module {name!r} has no package {parent!r} in the bundle")


def _read_source(source):
    """(bytes, label) from a path, bytes-like or binary file object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return data, f"<ringpool bundle {hashlib.sha256(data).hexdigest()[:12]}>"
    if hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, bytes):
            raise TypeError("a bundle file object must be opened in binary mode")
        name = getattr(source, "name", None)
        return data, (os.path.abspath(name) if isinstance(name, str)
                      else f"<ringpool bundle {hashlib.sha256(data).hexdigest()[:12]}>")
    path = os.path.abspath(os.fspath(source))
    with open(path, "rb") as f:
        return f.read(), path


class Bundle:
    """A bundle read into this process, isolated from the environment and from other bundles.

    ``Bundle.open(source)`` (a path, bytes, or a binary file object) reads and verifies the whole
    archive (layout, manifest, every file's sha256); it executes nothing and changes no global
    state. Modules are executed when imported, each under a private name
    ``<ringpool_bundle_N>.<name>`` (in ``sys.modules``), so two bundles with different versions of
    one package coexist: their classes are distinct (``isinstance`` across them is False). Inside
    bundled code, ``import`` statements resolve bundled names to the bundle and everything else
    (externs, the standard library) to the environment.

    Thread-safe: imports take the import system's locks; the rest reads immutable data.
    """

    def __init__(self, source, *, max_bytes=DEFAULT_MAX_BYTES, max_files=DEFAULT_MAX_FILES):
        data, label = _read_source(source)
        self._archive = _Archive(data, label, max_bytes, max_files)
        self._mount = None

    @classmethod
    def open(cls, source, **limits):
        """Read and verify the bundle at ``source``; see the class documentation."""
        return cls(source, **limits)

    @staticmethod
    def writer(dest, **options):
        """A ``BundleWriter`` for ``dest`` (use it as a context manager)."""
        return BundleWriter(dest, **options)

    @classmethod
    def _from_data(cls, label, data):
        self = cls.__new__(cls)
        self._archive = _Archive(data, label)
        self._mount = None
        return self

    def __reduce__(self):
        return (Bundle._from_data, (self._archive.label, self._archive.data))

    def __repr__(self):
        return (f"<ringpool.Bundle {self._archive.label} {self.hash[:12]} "
                f"{len(self._archive.modules)} modules>")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- what it holds ---------------------------------------------------------------------------
    @property
    def hash(self):
        """Hex sha256 of the manifest, which names every file's sha256: the bundle's identity."""
        return self._archive.hash

    @property
    def manifest(self):
        """A copy of the manifest (format, version, modules with action/path/sha256, resources,
        externs, stdlib)."""
        return json.loads(json.dumps(self._archive.manifest))

    @property
    def path(self):
        """Where it was read from (a path, or ``<ringpool bundle HASH>`` for bytes)."""
        return self._archive.label

    @property
    def data(self):
        """The archive's bytes (what a context ships to its workers)."""
        return self._archive.data

    def modules(self):
        """``{module name: "intern" | "mock"}`` for every bundled module."""
        return {name: e.action for name, e in self._archive.modules.items()}

    def externs(self):
        """Modules the loading environment must provide (standard library excluded)."""
        return list(self._archive.manifest["externs"])

    # -- importing -------------------------------------------------------------------------------
    def import_module(self, name):
        """The bundle's module ``name`` (executed on first import), or, for a name the bundle does
        not contain (an extern), the environment's."""
        _check_module_name(name)
        if name.partition(".")[0] not in self._archive.tops:
            return importlib.import_module(name)
        mount = self._mounted()
        return importlib.import_module(mount.prefix + name)

    def load_pickle(self, package, resource):
        """Unpickle resource ``package/resource``: classes of bundled modules come from this
        bundle, others from the environment; a class of a mocked module raises
        NotImplementedError. Unpickling runs code: load only bundles you trust."""
        data = self.load_binary(package, resource)
        return _BundleUnpickler(io.BytesIO(data), self).load()

    def load_text(self, package, resource, *, encoding="utf-8", errors="strict"):
        """The text of resource ``resource`` of ``package`` in the bundle, decoded (FileNotFoundError if absent)."""
        return self.load_binary(package, resource).decode(encoding, errors)

    def load_binary(self, package, resource):
        """The bytes of resource ``resource`` of ``package`` in the bundle (FileNotFoundError if absent)."""
        path = _resource_path(package, resource)
        try:
            return self._archive.files[path]
        except KeyError:
            raise FileNotFoundError(f"no resource {resource!r} in package {package!r} of "
                                    f"{self._archive.label}") from None

    def file_structure(self, *, include="**", exclude=()):
        """A ``Directory`` tree of the archive's files whose path matches a glob in ``include``
        and none in ``exclude`` (``/``-separated; ``**`` spans folders); ``print()`` draws it."""
        inc = [p.split("/") for p in ([include] if isinstance(include, str) else include)]
        exc = [p.split("/") for p in ([exclude] if isinstance(exclude, str) else exclude)]
        root = Directory(os.path.basename(self._archive.label) or self._archive.label, True)
        for path in sorted([MANIFEST, *self._archive.files]):
            parts = path.split("/")
            if (any(_glob_match(p, parts) for p in inc)
                    and not any(_glob_match(p, parts) for p in exc)):
                root._add_file(parts)
        return root

    def close(self):
        """Unmount: remove this bundle's modules from ``sys.modules`` and its lines from
        ``linecache``. Objects, classes and functions already made keep working."""
        with _lock:
            mount = self._mount
            self._mount = None
            if mount is not None:
                _unmount(mount)

    def _mounted(self):
        mount = self._mount
        if mount is None:
            with _lock:
                if self._mount is None:
                    self._mount = _Mount(self._archive, isolated=True)
                    _FINDER.tops[self._mount.root] = self._mount
                    _ensure_finder()
                mount = self._mount
        return mount


class _BundleUnpickler(pickle.Unpickler):
    def __init__(self, file, bundle):
        super().__init__(file)
        self._bundle = bundle

    def find_class(self, module, name):
        archive = self._bundle._archive
        if module.partition(".")[0] not in archive.tops:
            return super().find_class(module, name)
        entry = archive.modules.get(module)
        if entry is not None and entry.action == "mock":
            raise NotImplementedError(f"the pickle needs {module}.{name}, but module {module!r} "
                                      f"was mocked in this bundle")
        obj = self._bundle.import_module(module)
        for attr in name.split("."):
            obj = getattr(obj, attr)
        return obj


class Directory:
    """A folder of a bundle's file tree (``Bundle.file_structure``); ``str()`` draws the tree."""

    def __init__(self, name, is_dir):
        self.name = name
        self.is_dir = is_dir
        self.children = {}

    def _add_file(self, parts):
        node = self
        for part in parts[:-1]:
            node = node.children.setdefault(part, Directory(part, True))
        node.children[parts[-1]] = Directory(parts[-1], False)

    def has_file(self, path):
        """Whether ``path`` (``/``-separated, relative to this directory) names a file in the tree."""
        node = self
        for part in path.split("/"):
            node = node.children.get(part)
            if node is None:
                return False
        return not node.is_dir

    def __str__(self):
        lines = [self.name]

        def walk(node, indent):
            items = sorted(node.children.values(), key=lambda d: (not d.is_dir, d.name))
            for i, child in enumerate(items):
                last = i == len(items) - 1
                lines.append(f"{indent}{'└── ' if last else '├── '}{child.name}")
                if child.is_dir:
                    walk(child, indent + ("    " if last else "│   "))

        walk(self, "")
        return "\n".join(lines) + "\n"

    def __repr__(self):
        return f"<Directory {self.name!r} {len(self.children)} entries>"


# --- the finder, the loader, resources ---


class _Mount:
    """An archive made importable: under a mangled root (isolated) or under its real names."""

    def __init__(self, archive, isolated):
        self.archive = archive
        self.isolated = isolated
        if isolated:
            self.root = f"{_ROOT_PREFIX}{next(_mount_ids)}>"
            self.prefix = self.root + "."
            self.builtins = dict(builtins.__dict__)
            self.builtins["__import__"] = _make_import(self)
        else:
            self.root = None
            self.prefix = ""
            self.builtins = None
        self.filenames = set()

    def filename(self, path):
        return f"{self.archive.label}/{path}"

    def find_spec(self, fullname):
        if fullname == self.root:
            spec = ModuleSpec(fullname, _BundleLoader(self), is_package=True)
            spec.submodule_search_locations = []
            return spec
        entry = self.archive.modules.get(fullname[len(self.prefix):])
        if entry is None:
            return None  # not in the bundle: ModuleNotFoundError (its __path__ is empty)
        spec = ModuleSpec(fullname, _BundleLoader(self), origin=self.filename(entry.path),
                          loader_state=entry, is_package=entry.package)
        spec.has_location = True
        if entry.package:
            # Empty: no path finder ever looks on disk (or in the zip, by zipimport) for a
            # submodule that the bundle does not have.
            spec.submodule_search_locations = []
        return spec


class _BundleFinder:
    """Answers for the mangled roots of open bundles and the real top-level names of a bundle
    installed as the environment. Reads ``tops`` without ``_lock`` (a dict lookup is atomic)."""

    def __init__(self):
        self.tops = {}  # top-level module name -> _Mount

    def find_spec(self, fullname, path=None, target=None):
        mount = self.tops.get(fullname.partition(".")[0])
        if mount is None:
            return None
        return mount.find_spec(fullname)

    def invalidate_caches(self):
        pass


_FINDER = _BundleFinder()


def _ensure_finder():
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def _unmount(mount):
    for top, m in list(_FINDER.tops.items()):
        if m is mount:
            del _FINDER.tops[top]
    if not _FINDER.tops and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    if mount.root is not None:
        _modules._remove_modules(mount.root)
    for filename in mount.filenames:
        _modules._drop_linecache_entry(filename)


class _BundleLoader:
    def __init__(self, mount):
        self.mount = mount

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        entry = module.__spec__.loader_state
        if entry is None:
            return  # the mangled root: an empty package
        if self.mount.builtins is not None:
            module.__dict__["__builtins__"] = self.mount.builtins
        data = self.mount.archive.files[entry.path]
        filename = self.mount.filename(entry.path)
        self.mount.filenames.add(filename)
        _modules._put_linecache(filename, data)
        exec(compile(data, filename, "exec", dont_inherit=True), module.__dict__)

    def _entry(self, fullname):
        entry = self.mount.archive.modules.get(fullname[len(self.mount.prefix):])
        if entry is None:
            raise ImportError(f"{fullname!r} is not in {self.mount.archive.label}", name=fullname)
        return entry

    def is_package(self, fullname):
        return self._entry(fullname).package

    def get_filename(self, fullname):
        return self.mount.filename(self._entry(fullname).path)

    def get_source(self, fullname):
        import importlib.util

        return importlib.util.decode_source(self.mount.archive.files[self._entry(fullname).path])

    def get_code(self, fullname):
        entry = self._entry(fullname)
        return compile(self.mount.archive.files[entry.path], self.mount.filename(entry.path),
                       "exec", dont_inherit=True)

    def get_resource_reader(self, fullname):
        if fullname == self.mount.root:
            return None
        entry = self._entry(fullname)
        if not entry.package:
            return None
        return _Resources(self.mount.archive, entry.path.rpartition("/")[0])


class _Resources(TraversableResources):
    def __init__(self, archive, folder):
        self._archive = archive
        self._folder = folder

    def files(self):
        return _ArchivePath(self._archive, self._folder)


class _ArchivePath(Traversable):
    """A file or folder of the archive, for ``importlib.resources`` (read-only, from memory)."""

    def __init__(self, archive, path):
        self._archive = archive
        self._path = path

    @property
    def name(self):
        return self._path.rpartition("/")[2]

    def is_dir(self):
        return self._path in self._archive.dirs

    def is_file(self):
        return self._path in self._archive.files

    def iterdir(self):
        if not self.is_dir():
            raise NotADirectoryError(self._path)
        for child in self._archive.dirs[self._path]:
            yield _ArchivePath(self._archive, f"{self._path}/{child}" if self._path else child)

    def joinpath(self, *descendants):
        parts = [p for p in self._path.split("/") if p]
        for d in descendants:
            for part in os.fspath(d).split("/"):
                if part in ("", "."):
                    continue
                if part == "..":
                    raise ValueError("'..' is not supported in bundle resource paths")
                parts.append(part)
        return _ArchivePath(self._archive, "/".join(parts))

    def read_bytes(self):
        try:
            return self._archive.files[self._path]
        except KeyError:
            raise FileNotFoundError(f"{self._archive.label}/{self._path}") from None

    def open(self, mode="r", *args, **kwargs):
        data = self.read_bytes()
        if mode == "rb":
            return io.BytesIO(data)
        if mode == "r":
            return io.TextIOWrapper(io.BytesIO(data), *args, **kwargs)
        raise ValueError(f"bundle resources are read-only (mode {mode!r})")

    def __repr__(self):
        return f"<bundle resource {self._archive.label}/{self._path}>"


def _make_import(mount):
    """``__import__`` for an isolated bundle's modules: the bundle's top-level names resolve to
    its mangled modules, relative imports stay inside it, all else is the environment's."""
    real_import = builtins.__import__
    tops, root, prefix = mount.archive.tops, mount.root, mount.prefix

    def __import__(name, globals=None, locals=None, fromlist=(), level=0):
        if level:
            package = _package_of(globals)
            if package != root and not package.startswith(prefix):
                return real_import(name, globals, locals, fromlist, level)
            base = package[len(prefix):] if package != root else ""
            if not base:
                raise ImportError("attempted relative import with no known parent package")
            bits = base.rsplit(".", level - 1)
            if len(bits) < level:
                raise ImportError("attempted relative import beyond top-level package")
            name = f"{bits[0]}.{name}" if name else bits[0]
        if name.partition(".")[0] not in tops:
            return real_import(name, None, None, fromlist, 0)
        module = importlib.import_module(prefix + name)
        if not fromlist:
            return sys.modules[prefix + name.partition(".")[0]]
        if hasattr(module, "__path__"):
            _import_fromlist(module, fromlist)
        return module

    return __import__


def _package_of(globals):
    if not globals:
        return ""
    package = globals.get("__package__")
    if package is None:
        spec = globals.get("__spec__")
        if spec is not None:
            return spec.parent
        name = globals.get("__name__", "")
        return name if "__path__" in globals else name.rpartition(".")[0]
    return package


def _import_fromlist(module, fromlist, recursive=False):
    for item in fromlist:
        if item == "*":
            if not recursive and isinstance(getattr(module, "__all__", None), (list, tuple)):
                _import_fromlist(module, [a for a in module.__all__ if isinstance(a, str)], True)
        elif not hasattr(module, item):
            sub = f"{module.__name__}.{item}"
            try:
                importlib.import_module(sub)
            except ModuleNotFoundError as e:
                if e.name != sub:
                    raise


# --- a bundle as the environment (workers of a context made with a bundle) ---


def _install_environment(label, data):
    """Make the bundle in ``data`` importable under its real names in this process (a worker or a
    zygote): no mangling, no isolation; externs come from this process's ``sys.path``.

    Installing the same bundle again is a no-op (returns False). ImportError if one of its
    top-level names is a standard-library module, already imported, served by a registered
    package snapshot, or installed from another bundle. Nothing is executed here.
    """
    archive = _Archive(data, label)
    with _lock:
        current = {m.archive.hash for top, m in _FINDER.tops.items() if top in archive.tops}
        if current == {archive.hash} and all(t in _FINDER.tops for t in archive.tops):
            return False
        installed = _modules.installed()
        for top in sorted(archive.tops):
            why = None
            if top in sys.stdlib_module_names or top in sys.builtin_module_names:
                why = "is a standard-library module name"
            elif top in _FINDER.tops:
                why = "is installed from another bundle"
            elif top in installed:
                why = "is a registered package (ringpool.modules)"
            elif top in sys.modules:
                why = f"is already imported from {getattr(sys.modules[top], '__file__', None)!r}"
            if why is not None:
                raise ImportError(f"cannot install bundle {label}: its package {top!r} {why}",
                                  name=top)
        mount = _Mount(archive, isolated=False)
        for top in archive.tops:
            _FINDER.tops[top] = mount
        _ensure_finder()
        return True


def _as_bundle(bundle):
    """None, a Bundle, or what Bundle.open takes -> None or a Bundle."""
    if bundle is None or isinstance(bundle, Bundle):
        return bundle
    return Bundle.open(bundle)
