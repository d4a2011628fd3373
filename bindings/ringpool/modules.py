"""Code shipping: packages imported from arbitrary folders, importable in every worker.

A package imported at run time from a folder that is not on ``sys.path`` (a project folder named
in a config file, a helper package beside a notebook) does not exist in a freshly started worker:
unpickling one of its classes there fails with ModuleNotFoundError. ringpool takes a *snapshot* of
the package's sources when it is registered, serves imports from that snapshot through a meta
path finder, and ships the snapshot (bytes, once per content hash) to workers, which install it
into the same finder. Parent and workers then run the same bytes, even if the folder is edited,
moved or absent on the worker's machine.

::

    parent                                               worker
    ------                                               ------
    import_module_from_path(name, folder) ─┐
    register_module(pkg)                   ├─► Snapshot ── to_bytes() ──► from_bytes()
    reload(name)                           ┘   (name, root, files, hash)       │
                  │                                                          install(snapshot)
                  ▼                                                            ▼
    _SnapshotFinder, first in sys.meta_path         the same finder, in the worker's meta_path
        find_spec("pkg.sub.mod") → files["sub/mod.py"]           (the folder need not exist)
                  ▼
    _SnapshotLoader: compile(bytes, "<root>/sub/mod.py"), exec, lines into linecache

- ``Snapshot``: immutable; the ``.py`` sources of one top-level package (or one single-file
  module) as ``{relative posix path: bytes}``, the absolute root they were read from, and a
  sha256 over the sorted (path, bytes) pairs. ``to_bytes``/``from_bytes`` carry it between
  processes (the layout is in docs/design/code-shipping.md); loading validates and never executes.
- The registry (this process's packages read from disk: ``import_module_from_path``,
  ``register_module``, ``reload``) and the installed table (every snapshot the finder serves,
  registered here or received: ``install``, ``installed``, ``purge``). ``registry_version()`` is
  bumped on every change of either, so a sender can tell cheaply when to resend ``snapshots()``.
- ``ensure_shipped``: called by ringpool's hybrid pickler before it pickles a class or function by
  reference; registers the top-level module if it is in ``sys.modules`` only because it was
  loaded by hand from a file no finder would find (so a worker could not import it by name).
- ``_SnapshotFinder``: one instance, in ``sys.meta_path`` (first) while anything is installed.
  It answers only for names under an installed top-level name and reads nothing from disk.
- ``_SnapshotLoader``: executes modules lazily (a submodule's source is compiled when imported),
  under the original absolute file name, and puts the snapshot's lines into ``linecache`` so
  ``traceback`` and ``inspect.getsource`` show the code that runs, not what is on disk now.

This module imports nothing from ringpool (no ``_core``): a worker can load it by file path.

Logging (``ringpool.modules``, after the registry lock is released): a package registered or
reloaded with new sources (INFO), a snapshot installed from a sender (DEBUG).

Deviations from importing the folder normally (``sys.path.insert`` + ``import``):
- Only ``.py`` files are part of a package: in the package folder and in sub-folders that have an
  ``__init__.py`` and an identifier name, skipping ``__pycache__``, hidden entries and files whose
  stem is not an identifier. Namespace sub-packages, extension modules and data files are not
  shipped; ``__path__`` is still the real folder, so where it exists they are found there by the
  normal path finders (in this process, and in a worker on a machine that has the folder).
- No bytecode is read or written (``__cached__`` names a file that is never created).
- ``importlib.resources`` reads a package's data files from its folder on disk (they are not in
  the snapshot); ``importlib.reload(module)`` re-executes the snapshot's source, not the file;
  ``ringpool.reload(name)`` re-reads the folder.
- Every file must resolve inside the package's resolved root: a symlinked ``.py`` or package
  folder pointing outside it is refused (ImportError naming the file), as is a symlink cycle.
- The package's sources are read once, at registration: editing a file afterwards changes
  nothing in this process or in workers until ``reload(name)``.
- A top-level name that is already imported (not from a snapshot), or is a standard-library or
  built-in module name, cannot be registered or installed (ValueError): the finder is first on
  ``sys.meta_path`` and would shadow it for the whole process.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import keyword
import linecache
import logging
import os
import pickle
import struct
import sys
import types
import threading
from importlib.machinery import ModuleSpec
from importlib.readers import FileReader
from types import MappingProxyType, SimpleNamespace

__all__ = [
    "ModuleSourceError",
    "Snapshot",
    "ensure_shipped",
    "import_module_from_path",
    "install",
    "installed",
    "purge",
    "register_module",
    "registry_version",
    "reload",
    "snapshots",
]

# --- Snapshot byte layout (version 1, little-endian; docs/design/code-shipping.md) ---
_MAGIC = b"RPMS"
_FORMAT_VERSION = 1
_HEAD = struct.Struct("<4sHHI32s")  # magic, format version, flags (0), file count, sha256
_LEN = struct.Struct("<I")
_HASH_LEN = struct.Struct("<Q")

_lock = threading.RLock()  # every mutation of the tables below, and linecache entries we own
_registry: dict[str, _Entry] = {}  # registered here from disk: name -> where to re-read it
_installed: dict[str, Snapshot] = {}  # served by the finder; the finder reads it without _lock
_version = 0
# Top-level modules found to need no shipping (importable by name in a worker, or nothing ringpool
# could ship): name -> the module object, so a module replaced in sys.modules is checked again.
_not_shipped: dict[str, object] = {}
# Modules ensure_shipped has answered for: name -> the module object it saw. The hybrid pickler
# reads it first, so a module already seen costs two dict lookups per first-seen class or function
# instead of a call. Emptied on every registry change (a purged package must be looked at again).
checked: dict[str, object] = {}


class Snapshot:
    """The ``.py`` sources of one top-level package or single-file module, as shipped.

    ``name``: top-level module name. ``root``: the absolute folder the files were read from
    (file names in code objects and tracebacks are ``root`` + relative path). ``files``: read-only
    mapping ``{relative posix path: bytes}``; a package has ``"__init__.py"``, a single-file module
    has exactly one ``"<stem>.py"``. ``hash``: hex sha256 over the sorted (path, bytes) pairs.

    Immutable, so it may be shared between threads and installed into several processes.
    """

    __slots__ = ("name", "root", "files", "hash", "_bytes")

    def __init__(self, name, root, files):
        _check_top_name(name)
        if not isinstance(root, str) or not os.path.isabs(root):
            raise ValueError(f"snapshot root must be an absolute path, got {root!r}")
        files = dict(files)
        if not files:
            raise ValueError(f"snapshot of {name!r} has no files")
        for rel, data in files.items():
            if not isinstance(data, bytes):
                raise ValueError(f"snapshot file {rel!r} is not bytes")
            _check_relpath(rel)
        if "__init__.py" in files:
            for rel in files:
                parent = rel.rpartition("/")[0]
                if parent and parent + "/__init__.py" not in files:
                    raise ValueError(f"snapshot file {rel!r} is in a folder without __init__.py")
        elif len(files) != 1 or "/" in next(iter(files)):
            raise ValueError(f"snapshot of {name!r} has no __init__.py and is not a single module")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "files", MappingProxyType(files))
        object.__setattr__(self, "hash", _digest(files).hex())

    def __setattr__(self, attr, value):
        raise AttributeError("Snapshot is immutable")

    def __repr__(self):
        return (f"<Snapshot {self.name} {self.hash[:12]} {len(self.files)} files "
                f"from {self.root}>")

    @property
    def is_package(self):
        """True if the snapshot is a package (it has an ``__init__.py``), False for a single module."""
        return "__init__.py" in self.files

    def filename(self, rel):
        """The absolute file name ``rel`` had on disk (and has in code objects)."""
        return os.path.join(self.root, *rel.split("/"))

    def to_bytes(self):
        """A compact, versioned encoding; ``Snapshot.from_bytes`` reverses it. Made once: a
        snapshot goes to every worker started or updated, unchanged."""
        try:
            return self._bytes
        except AttributeError:
            pass
        parts = [_HEAD.pack(_MAGIC, _FORMAT_VERSION, 0, len(self.files), bytes.fromhex(self.hash))]
        for field in (self.name.encode(), os.fsencode(self.root)):
            parts += (_LEN.pack(len(field)), field)
        for rel in sorted(self.files):
            data = self.files[rel]
            enc = rel.encode()
            parts += (_LEN.pack(len(enc)), enc, _LEN.pack(len(data)), data)
        data = b"".join(parts)
        object.__setattr__(self, "_bytes", data)
        return data

    @classmethod
    def from_bytes(cls, data):
        """Decode ``to_bytes()`` output. Any malformed input (wrong magic or version, truncation,
        trailing bytes, invalid names or paths, hash mismatch) raises ValueError. Nothing is
        executed or unpickled."""
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise ValueError("snapshot data must be bytes-like") from None
        try:
            magic, version, flags, count, digest = _HEAD.unpack_from(view, 0)
        except struct.error:
            raise ValueError("snapshot data truncated (header)") from None
        if magic != _MAGIC:
            raise ValueError("not a ringpool module snapshot (bad magic)")
        if version != _FORMAT_VERSION:
            raise ValueError(f"unsupported snapshot format version {version}")
        if flags != 0:
            raise ValueError(f"unknown snapshot flags {flags:#x}")
        pos = _HEAD.size

        def field():
            nonlocal pos
            if pos + _LEN.size > len(view):
                raise ValueError("snapshot data truncated")
            (n,) = _LEN.unpack_from(view, pos)
            pos += _LEN.size
            if pos + n > len(view):
                raise ValueError("snapshot data truncated")
            out = bytes(view[pos:pos + n])
            pos += n
            return out

        try:
            name = field().decode()
            root = os.fsdecode(field())
            files = {}
            for _ in range(count):
                rel = field().decode()
                if rel in files:
                    raise ValueError(f"snapshot lists {rel!r} twice")
                files[rel] = field()
        except UnicodeDecodeError:
            raise ValueError("snapshot name or path is not UTF-8") from None
        if pos != len(view):
            raise ValueError(f"{len(view) - pos} trailing bytes after the snapshot")
        snap = cls(name, root, files)  # validates names and paths
        if snap.hash != digest.hex():
            raise ValueError(f"snapshot of {name!r}: content does not match its hash")
        return snap


class _Entry:
    """A registration: where to re-read the snapshot from (a folder or a single file)."""

    __slots__ = ("name", "path", "snapshot")

    def __init__(self, name, path, snapshot):
        self.name = name
        self.path = path
        self.snapshot = snapshot


# --- public API ---


def import_module_from_path(name: str, path: str | os.PathLike[str]) -> types.ModuleType:
    """Import the package in folder ``path`` as top-level ``name``; return the module.

    ``path`` need not be on ``sys.path``; it must be a folder (else NotADirectoryError, or
    FileNotFoundError if it does not exist) containing ``__init__.py`` (else FileNotFoundError).
    ``name`` must be an identifier without dots (ValueError). The sources are snapshotted and
    registered (shipped to workers); the package is executed from the snapshot.

    Calling again with the same name and folder returns the registered module; a different folder
    raises ValueError, as does a name already imported otherwise. If the import fails, nothing is
    left registered, installed or in ``sys.modules`` and the original exception propagates.
    Thread-safe (the registry lock is held while the package's ``__init__`` runs).
    """
    _check_top_name(name)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"package folder {path!r} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path!r} is not a folder: import_module_from_path imports a "
                                 f"package folder (with an __init__.py)")
    root = os.path.realpath(path)
    init = os.path.join(root, "__init__.py")
    if not os.path.isfile(init):
        raise FileNotFoundError(f"{init!r} not found: {path!r} is not a package folder")
    with _lock:
        entry = _registry.get(name)
        if entry is None and name in _installed:
            raise ValueError(f"{name!r} is installed from a snapshot received by this process")
        if entry is not None:
            if entry.path != root:
                raise ValueError(f"{name!r} is already registered from {entry.path!r}, "
                                 f"not {root!r}")
            return sys.modules.get(name) or importlib.import_module(name)
        _check_free(name)
        snap = _read_package(name, root)
        _set_installed(name, snap)
        try:
            module = importlib.import_module(name)
        except BaseException:
            _remove_modules(name)
            _drop_linecache(snap)
            _set_installed(name, None)
            raise
        _registry[name] = _Entry(name, root, snap)
        _bump()
    _log.info("registered package %s from %s (%d files, %s)", name, root, len(snap.files), snap.hash[:12])
    return module


def register_module(module_or_name: types.ModuleType | str) -> Snapshot:
    """Register an already imported top-level package (or single-file module) for shipping.

    ``module_or_name``: the module object or its name (imported normally first if it is not
    imported yet). It must have been imported from ``.py`` files on disk: a package with
    ``__file__`` ending in ``__init__.py``, or a ``.py`` module (ValueError otherwise: built-in,
    extension, namespace package, or not top-level). Its sources are snapshotted; modules already
    imported stay as they are here, and submodules imported later come from the snapshot.

    Returns the ``Snapshot`` (its ``.hash`` identifies the version). Registering again returns
    the current snapshot without re-reading; use ``reload`` for that. Thread-safe.
    """
    if isinstance(module_or_name, str):
        _check_top_name(module_or_name)
        module = sys.modules.get(module_or_name) or importlib.import_module(module_or_name)
    else:
        module = module_or_name
    name = getattr(module, "__name__", None)
    if not isinstance(name, str) or "." in name:
        raise ValueError(f"register_module takes a top-level module, got {name!r}")
    with _lock:
        entry = _registry.get(name)
        if entry is not None:
            return entry.snapshot
        if name in _installed:
            raise ValueError(f"{name!r} was installed from a snapshot; there is nothing on "
                             f"disk to register")
        _check_top_name(name)
        if name in sys.builtin_module_names or name in sys.stdlib_module_names:
            raise ValueError(f"{name!r} is a standard-library module; it is not shipped")
        file = getattr(module, "__file__", None)
        if not isinstance(file, str):
            raise ValueError(f"{name!r} has no __file__ (built-in or namespace package); "
                             f"only modules imported from .py files can be registered")
        file = os.path.realpath(file)
        if hasattr(module, "__path__"):
            if os.path.basename(file) != "__init__.py":
                raise ValueError(f"package {name!r} is not imported from an __init__.py "
                                 f"({file!r})")
            path = os.path.dirname(file)
            snap = _read_package(name, path)
        else:
            if not file.endswith(".py"):
                raise ValueError(f"{name!r} is not a .py module ({file!r}); only Python sources "
                                 f"are shipped")
            path = file
            snap = _read_single(name, path)
        _set_installed(name, snap)
        _registry[name] = _Entry(name, path, snap)
        _bump()
    _log.info("registered %s from %s (%d files, %s)", name, path, len(snap.files), snap.hash[:12])
    return snap


def reload(name: str) -> types.ModuleType:
    """Re-read registered ``name`` from disk; if its hash changed, switch to the new sources.

    On a change: ``name`` and its submodules are removed from ``sys.modules`` here, the new
    snapshot is installed, the top-level module is imported again and the registry version is
    bumped; returns the new module. Objects created from the old modules keep their old classes
    and functions; other modules that did ``from name import X`` keep the old ``X``. If the new
    import fails, the previous snapshot and modules are restored and the exception propagates.
    Unchanged hash: returns the current module. KeyError if ``name`` is not registered here.
    Thread-safe.
    """
    with _lock:
        entry = _registry.get(name)
        if entry is None:
            raise KeyError(f"{name!r} is not registered in this process")
        if entry.snapshot.is_package:
            new = _read_package(name, entry.path)
        else:
            new = _read_single(name, entry.path)
        if new.hash == entry.snapshot.hash:
            return sys.modules.get(name) or importlib.import_module(name)
        old = entry.snapshot
        saved_lines = {f: linecache.cache[f] for f in _filenames(old) if f in linecache.cache}
        old_modules = _remove_modules(name)
        _set_installed(name, new)
        try:
            module = importlib.import_module(name)
        except BaseException:
            _remove_modules(name)
            _drop_linecache(new)
            linecache.cache.update(saved_lines)
            _set_installed(name, old)
            sys.modules.update(old_modules)
            raise
        for f in _filenames(old) - _filenames(new):
            _drop_linecache_entry(f)
        entry.snapshot = new
        _bump()
    _log.info("reloaded %s from %s: %s -> %s (%d files)", name, entry.path, old.hash[:12], new.hash[:12],
              len(new.files))
    return module


def snapshots():
    """Every snapshot this process serves (registered here or installed from a sender), as a
    list sorted by name: what a sender ships to a new worker. Thread-safe."""
    with _lock:
        return [_installed[n] for n in sorted(_installed)]


def registry_version():
    """An int bumped on every registration, reload, install and purge that changed something;
    compare it with the value at the last send to know when to resend. Thread-safe."""
    return _version


def install(snapshot):
    """Make ``snapshot`` importable in this process, from memory (receiving side).

    Nothing is imported or executed now, and nothing touches the filesystem, ``sys.path`` or
    temporary folders: modules are executed when imported. Installing the hash that is already
    installed under that name is a no-op (returns False). A different hash for an installed name
    replaces it: the package's modules are removed from ``sys.modules`` (the next import gets the
    new code; objects already created keep their old classes). Returns True when it changed
    something. ValueError if the name is imported here otherwise, is a standard-library name, or
    was registered from disk in this process (use ``reload`` there). Thread-safe.
    """
    if not isinstance(snapshot, Snapshot):
        raise TypeError(f"install takes a Snapshot, got {type(snapshot).__name__}")
    name = snapshot.name
    with _lock:
        current = _installed.get(name)
        if current is not None and current.hash == snapshot.hash:
            return False
        if name in _registry:
            raise ValueError(f"{name!r} is registered from disk in this process; use reload()")
        if current is None:
            _check_free(name)
        else:
            _remove_modules(name)
            _drop_linecache(current)
        _set_installed(name, snapshot)
        _bump()
    _log.debug("installed %s %s from a snapshot (%d files)", name, snapshot.hash[:12], len(snapshot.files))
    return True


def installed():
    """``{name: hash}`` of every snapshot the finder serves in this process. Thread-safe."""
    with _lock:
        return {n: s.hash for n, s in _installed.items()}


def purge(name):
    """Forget ``name``: unregister and uninstall it, remove it and its submodules from
    ``sys.modules`` and its lines from ``linecache``. Objects created from it keep working with
    their old classes. Returns False if ``name`` was neither registered nor installed.
    Thread-safe."""
    with _lock:
        snap = _installed.get(name)
        if snap is None:
            return False
        _registry.pop(name, None)
        _remove_modules(name)
        _drop_linecache(snap)
        _set_installed(name, None)
        _bump()
        return True


class ModuleSourceError(pickle.PicklingError):
    """A class or function that would be pickled by reference comes from a module that a worker
    cannot import by name and that ringpool cannot ship (its source file is gone, or it is not a
    ``.py`` file). Raised at pickling time, in the caller; the message names the module and file."""


def ensure_shipped(module_name):
    """Make sure a worker can import ``module_name`` by name before something is pickled by
    reference from it (called by the hybrid pickler once per class or function and pickler).

    If its top-level module is in ``sys.modules`` only because someone put it there (loaded by
    hand with ``importlib.util.spec_from_file_location`` + ``exec_module`` from a folder that is
    not on ``sys.path``), it is registered as ``register_module`` would (snapshot, hash, shipped
    to every worker). Nothing happens for installed snapshots, modules a worker finds by name
    (the finders of ``sys.meta_path`` find the same file), standard-library and reserved names,
    modules without a ``__file__`` (built with ``types.ModuleType``: today's by-reference
    pickling; the worker's unpickling fails unless code there makes the module), and top-level
    names not in ``sys.modules``. Each top-level module object is looked at once.

    ModuleSourceError (a PicklingError) when the module has to be shipped and cannot be: its
    source file no longer exists, or it is not a ``.py`` source. Thread-safe.
    """
    top = module_name.partition(".")[0]
    module = sys.modules.get(top)
    if module is None:
        return
    if top in _installed or _not_shipped.get(top) is module:
        checked[module_name] = sys.modules.get(module_name)
        return
    with _lock:
        if top in _installed:
            return
        file = _hand_imported_file(top, module)
        if file is None:
            _not_shipped[top] = module
            checked[module_name] = sys.modules.get(module_name)
            return
        # The file of the module being pickled must exist too: a snapshot without it would
        # leave the worker without the module.
        sub = sys.modules.get(module_name) if module_name != top else None
        for name, f in ((top, file), (module_name, getattr(sub, "__file__", None))):
            if isinstance(f, str) and not os.path.isfile(f):
                raise ModuleSourceError(
                    f"cannot pickle from module {name!r} by reference: it was loaded from {f!r}, "
                    f"which no longer exists, and a worker cannot import {top!r} by name (not "
                    f"found on sys.path), so ringpool has no source to send it")
        try:
            register_module(module)
        except (ValueError, OSError, ImportError) as exc:
            raise ModuleSourceError(
                f"cannot pickle from module {module_name!r} by reference: a worker cannot import "
                f"{top!r} by name (loaded from {file!r}, not found on sys.path) and ringpool "
                f"cannot ship it: {exc}") from exc


def _hand_imported_file(top, module):
    """The file of top-level ``module`` if a worker could not import it by name and it has one;
    None if it can, or if it is nothing ringpool ships (no file, a reserved or standard-library
    name: left as they are)."""
    try:
        _check_top_name(top)
    except ValueError:
        return None  # __mp_main__ and the like: multiprocessing makes them in the worker
    if top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return None
    file = getattr(module, "__file__", None)
    if not isinstance(file, str):
        return None
    real = os.path.realpath(file)
    # What a worker's import would find: the finders of sys.meta_path (sys.path is the parent's
    # in every worker), without the sys.modules shortcut that importlib.util.find_spec takes.
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if finder is _FINDER or find is None:
            continue
        try:
            spec = find(top, None)
        except Exception:
            continue
        if spec is not None:
            origin = spec.origin
            if isinstance(origin, str) and os.path.realpath(origin) == real:
                return None
            return file  # a worker would import another `top` (or none): ship this one
    return file


def _reset_for_tests():
    """Purge everything (tests): leaves no finder in ``sys.meta_path``."""
    with _lock:
        for name in list(_installed):
            purge(name)
        _not_shipped.clear()
        checked.clear()


# --- the finder and the loader ---


class _SnapshotFinder:
    """Finds modules under installed top-level names in their snapshots; ``None`` otherwise.

    Called by the import system under its per-module locks; reads ``_installed`` without
    ``_lock`` (a dict lookup is atomic, snapshots are immutable), so an import running inside a
    locked registry call (a package ``__init__``) does not deadlock on another thread's import.
    """

    def find_spec(self, fullname, path=None, target=None):
        snap = _installed.get(fullname.partition(".")[0])
        if snap is None:
            return None
        rel = _resolve(snap, fullname)
        if rel is None:
            return None  # not a .py in the snapshot: the path finders may try __path__
        is_package = _is_init(rel)
        filename = snap.filename(rel)
        spec = ModuleSpec(fullname, _SnapshotLoader(snap), origin=filename, loader_state=rel,
                          is_package=is_package)
        spec.has_location = True
        if is_package:
            spec.submodule_search_locations = [os.path.dirname(filename)]
        return spec

    def invalidate_caches(self):
        pass  # nothing cached: each lookup reads the installed table


class _SnapshotLoader:
    """Executes one snapshot's modules; implements the InspectLoader queries from memory."""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def _rel(self, fullname):
        rel = _resolve(self.snapshot, fullname)
        if rel is None:
            raise ImportError(f"{fullname!r} is not in {self.snapshot!r}", name=fullname)
        return rel

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        rel = module.__spec__.loader_state
        data = self.snapshot.files[rel]
        filename = self.snapshot.filename(rel)
        # Before executing, so a traceback raised by the module's own top level shows its lines.
        _put_linecache(filename, data)
        code = compile(data, filename, "exec", dont_inherit=True)
        exec(code, module.__dict__)

    def is_package(self, fullname):
        return _is_init(self._rel(fullname))

    def get_filename(self, fullname):
        return self.snapshot.filename(self._rel(fullname))

    def get_source(self, fullname):
        return importlib.util.decode_source(self.snapshot.files[self._rel(fullname)])

    def get_resource_reader(self, fullname):
        # Data files are not in the snapshot: importlib.resources reads them from the package's
        # folder, as for a normal import (missing where the folder does not exist).
        rel = self._rel(fullname)
        if not _is_init(rel):
            return None
        return FileReader(SimpleNamespace(path=self.snapshot.filename(rel)))

    def get_code(self, fullname):
        rel = self._rel(fullname)
        return compile(self.snapshot.files[rel], self.snapshot.filename(rel), "exec",
                       dont_inherit=True)


_FINDER = _SnapshotFinder()


def _resolve(snap, fullname):
    """The snapshot path of module ``fullname`` (under ``snap.name``), or None."""
    top, _, rest = fullname.partition(".")
    if top != snap.name:
        return None
    if not rest:
        return "__init__.py" if snap.is_package else next(iter(snap.files))
    if not snap.is_package:
        return None
    parts = rest.split(".")
    for part in parts:
        # The import system never asks for these; a direct caller gets an error, not a lookup.
        if not part.isidentifier():
            raise ImportError(f"invalid module name {fullname!r}", name=fullname)
    base = "/".join(parts)
    for rel in (base + "/__init__.py", base + ".py"):
        if rel in snap.files:
            return rel
    return None


def _is_init(rel):
    return rel == "__init__.py" or rel.endswith("/__init__.py")


# --- machinery ---


def _check_top_name(name):
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"{name!r} is not a valid top-level module name (an identifier, "
                         f"no dots)")
    if name.startswith("__") and name.endswith("__"):
        # __main__, __mp_main__, __init__: names the interpreter or multiprocessing gives meaning.
        raise ValueError(f"{name!r} is not a valid top-level module name (reserved dunder name)")


def _check_relpath(rel):
    if not isinstance(rel, str) or not rel.endswith(".py"):
        raise ValueError(f"snapshot path {rel!r} is not a .py file")
    *dirs, stem = rel[:-3].split("/")
    for part in (*dirs, stem):
        # Identifiers only: no "", ".", "..", absolute paths, backslashes or NULs.
        if not part.isidentifier():
            raise ValueError(f"snapshot path {rel!r} escapes the package or is not importable")


def _check_free(name):
    """ValueError unless ``name`` can be served by the finder without shadowing anything."""
    if name in sys.builtin_module_names or name in sys.stdlib_module_names:
        raise ValueError(f"{name!r} is a standard-library module name; a registered package "
                         f"would shadow it")
    if name in sys.modules and name not in _installed:
        raise ValueError(f"{name!r} is already imported from "
                         f"{getattr(sys.modules[name], '__file__', None)!r}; a registered "
                         f"package of that name would shadow it")


def _digest(files):
    """sha256 over the (path, bytes) pairs sorted by path, each length-prefixed (u64) so that
    no two different snapshots hash the same input. Independent of the root and of listing
    order: the same sources anywhere give the same hash."""
    h = hashlib.sha256()
    for rel in sorted(files):
        for part in (rel.encode(), files[rel]):
            h.update(_HASH_LEN.pack(len(part)))
            h.update(part)
    return h.digest()


def _inside(root, real):
    return real == root or os.path.commonpath([root, real]) == root


def _read_file(root, path, name):
    real = os.path.realpath(path)
    if not _inside(root, real):
        raise ImportError(f"{path!r} resolves to {real!r}, outside the package root {root!r}",
                          name=name, path=path)
    with open(real, "rb") as f:
        return f.read()


def _read_package(name, root):
    """Snapshot of the package folder ``root`` (already resolved)."""
    files = {}
    # Each real directory is read once: sub-packages that symlink to one another (b -> a at every
    # level) would otherwise be walked once per path, 2**levels times. A sub-package reached a
    # second time through a symlink is shipped under its first path (in sorted order) only.
    visited = {root}

    def walk(folder, prefix, ancestors):
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.name.startswith(".") or e.name == "__pycache__":
                continue
            path = os.path.join(folder, e.name)
            if e.is_dir():
                if not e.name.isidentifier() or not os.path.isfile(
                        os.path.join(path, "__init__.py")):
                    continue  # not a regular sub-package: not importable from the snapshot
                real = os.path.realpath(path)
                if not _inside(root, real):
                    raise ImportError(f"sub-package {path!r} resolves to {real!r}, outside the "
                                      f"package root {root!r}", name=name, path=path)
                if real in ancestors:
                    raise ImportError(f"sub-package {path!r} is a symlink cycle", name=name,
                                      path=path)
                if real in visited:
                    continue
                visited.add(real)
                walk(path, prefix + e.name + "/", ancestors | {real})
            elif e.name.endswith(".py") and e.name[:-3].isidentifier() and e.is_file():
                files[prefix + e.name] = _read_file(root, path, name)

    walk(root, "", frozenset({root}))
    return Snapshot(name, root, files)


def _read_single(name, file):
    """Snapshot of the single-file module ``file`` (already resolved)."""
    root, base = os.path.split(file)
    if not base[:-3].isidentifier():
        raise ValueError(f"{file!r} is not an importable module file name")
    return Snapshot(name, root, {base: _read_file(root, file, name)})


_log = logging.getLogger("ringpool.modules")
_listeners = []


def add_listener(fn):
    """Call fn() after every change of the registry or the installed table (under the registry's
    lock, in the thread that made the change): ringpool's process layer pushes new versions to
    running workers from it. fn must not block; its exceptions are ignored."""
    _listeners.append(fn)


def _bump():
    global _version
    _version += 1
    checked.clear()
    for fn in list(_listeners):
        try:
            fn()
        except Exception:
            pass


def _set_installed(name, snap):
    """Install (or with None, uninstall) ``snap`` and keep exactly one finder in sys.meta_path
    while anything is installed. Caller holds _lock."""
    if snap is None:
        _installed.pop(name, None)
    else:
        _installed[name] = snap
    present = _FINDER in sys.meta_path
    if _installed and not present:
        sys.meta_path.insert(0, _FINDER)
    elif not _installed and present:
        sys.meta_path.remove(_FINDER)


def _remove_modules(name):
    """Remove ``name`` and its submodules from sys.modules; return what was removed."""
    prefix = name + "."
    removed = {}
    for key in list(sys.modules):
        if key == name or key.startswith(prefix):
            module = sys.modules.pop(key, None)
            if module is not None:
                removed[key] = module
    return removed


def _filenames(snap):
    return {snap.filename(rel) for rel in snap.files}


def _put_linecache(filename, data):
    try:
        lines = importlib.util.decode_source(data).splitlines(keepends=True)
    except (SyntaxError, UnicodeDecodeError):
        return  # compile() reports the bad encoding
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    # mtime None: linecache.checkcache() keeps the entry instead of comparing it with the disk
    # file, which may have been edited or may not exist in this process.
    linecache.cache[filename] = (len(data), None, lines, filename)


def _drop_linecache_entry(filename):
    entry = linecache.cache.get(filename)
    if entry is not None and len(entry) == 4 and entry[1] is None:
        del linecache.cache[filename]


def _drop_linecache(snap):
    for filename in _filenames(snap):
        _drop_linecache_entry(filename)
