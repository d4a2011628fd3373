"""ringpool as a multiprocessing context: ``ringpool.get_context(preload=None, zygote=True, bundle=None)``.

A ``multiprocessing.context.BaseContext`` subclass that overrides only what differs; everything
else (Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event, Barrier, Value, Array, Manager,
Pool, ...) comes from BaseContext unchanged and works with ringpool workers.

Each context has a supervisor (a C++ Boost.Asio thread, ``_core.Supervisor``) that starts and
watches its workers, in one of two modes:
- zygote (the default): a zygote process, started at the first ``start()`` (or
  ``ensure_running()``), imports the ``preload`` modules once and forks each worker, as a child of
  this process, from that state. With no ``preload`` argument (None) it imports what this process
  has imported when the zygote starts (the automatic preload, below); ``preload=()`` imports
  nothing more than ringpool's own worker modules. Like forkserver, it also imports this process's main module
  (as ``__mp_main__``, as spawn does in every worker) unless ``preload_main=False``. It keeps
  ``spares`` (default 4) workers forked ahead of time, waiting for a ``start()``: they are idle
  children of this process until then;
- exec (``zygote=False``): a fresh interpreter per worker, as spawn does.
docs/design/spawner.md describes both.

A context made with a ``bundle`` (``ringpool.Bundle`` or a path to one) installs the bundle's
modules in the zygote (before its preload) or, when the archive does not fit in the zygote's
configuration message or in exec mode, in each worker at its start, under their real names: in a
worker the bundle is the environment (docs/design/code-shipping.md, "Bundles").

Deviations from the stdlib contexts:
- The name ``"ringpool"`` (``multiprocessing.get_context("ringpool")``,
  ``set_start_method("ringpool")``) is ``get_context()``'s default context. An installed ringpool
  makes it resolve in every interpreter with no call first, and adds it to
  ``multiprocessing.get_all_start_methods()`` (``_ringpool_start_method``, loaded by a .pth);
  from a checkout, ``register_start_method()`` does it. torch's DataLoader accepts a start method
  given as a string only if that list names it; CPython's suite expects the list to be exactly
  the stdlib's (``test_get_all``, skipped in tests/stdlib/).
- ``get_start_method()`` is ``"ringpool"``, never ``"fork"`` (SemLocks keep their names, so they
  work in workers that are not forked from this process).
- ``Queue``, ``JoinableQueue``, ``SimpleQueue`` and ``Pipe`` are ringpool's shared-memory ones.
  They pickle with ringpool's hybrid pickler, which sends by value (cloudpickle) the functions and
  classes a worker could not import by name, where the stdlib's raise: a ``Pool`` task that returns
  a lambda succeeds instead of failing with ``MaybeEncodingError`` (CPython's multiprocessing
  suite: ``test_unpickleable_result``, skipped in tests/stdlib/).
- ``Process`` is a per-context subclass of ``RingpoolProcess`` (so it knows its context); its
  instances pickle as ``RingpoolProcess``. ``Process._start_method`` is None: the worker's
  ``_bootstrap`` must not look "ringpool" up in the stdlib's table of concrete contexts.
- A worker starts from this process's state at ``start()``, as under spawn (sys.path, cwd,
  ``__main__``, name, authkey, os.environ), plus torch's sharing strategy and intra-op thread count
  when torch is imported here (set in the worker when it imports torch). Modules preloaded in the
  zygote are already imported in the worker, from the zygote's sys.path at its start; the
  inter-op thread count is not propagated.
- Workers are children of this process in both modes (SIGCHLD and waitid work as under fork). If a
  zygote dies, the workers it forked are killed (their exit code is -9) and the next ``start()``
  brings up a new zygote; after ``ctx.shutdown()`` (an orderly stop) they run on.
- Nothing outlives the outermost ringpool process: its workers die with it even when it is
  SIGKILLed, and so do workers that workers started (at any depth). A non-daemonic one of those
  outlives its own parent, as under spawn; a daemonic one dies with it
  (``ringpool/_worker.py:_watch_root``). Every worker uses the
  outermost process's resource tracker, as spawn children do.
- A worker's stdin, stdout and stderr are this process's descriptors 0-2 at ``start()``.
- The automatic preload (``get_context()`` without ``preload``): the zygote imports, one at a
  time and parents before children, every module of this process's ``sys.modules`` at the
  zygote's start that a fresh interpreter with our ``sys.path`` would import by the same name
  (``_preloadable_modules``: not ``__main__``/``__mp_main__``, not modules without a spec, aliases,
  modules loaded by a non-standard loader such as pytest's rewritten test modules, nor modules
  whose file is not where their name leads). So a worker starts as warm as under fork. The costs:
  each module's import side effects happen once more, in the zygote (as under forkserver's
  preload); the zygote takes as long to start as those imports (about this process's own import
  time, in the background until the first ``start()`` waits for it) and holds that memory (shared
  copy-on-write with its workers); modules this process imports after the zygote started are not
  preloaded (a worker imports them itself, as under spawn; ``ctx.shutdown()`` makes the next
  ``start()`` start a zygote from the state then). A module that fails to import there is skipped
  (a warning on the ``ringpool.spawner`` logger, once per context); a module whose import leaves a
  thread running in the zygote (which could not fork safely then) is excluded with what it
  imported, and the zygote starts over without them (``_zygote._auto_preload``; warned too). An
  explicit ``preload`` list imports exactly that list, and there a failure or a thread is an error.
- Memory in a worker is reused rather than fresh: torch storages made with ``_new_shared`` (what
  DataLoader's collate makes in a worker) come from recycled shared-memory files
  (``ringpool/_torch.py``, ``RINGPOOL_RECYCLE_SHARED=0`` turns it off), and glibc's malloc keeps
  up to 64 MiB of freed heap for reuse instead of returning it to the kernel
  (``ringpool/_worker.py:_retain_heap``; ``RINGPOOL_WORKER_HEAP`` sets the amount, 0 turns it off;
  the user's own ``MALLOC_*`` settings are left alone).
- The zygote's anonymous memory is backed by transparent huge pages when the kernel's THP mode is
  ``madvise`` (cheaper forks and worker exits); each worker marks those inherited ranges
  ``MADV_NOHUGEPAGE`` after the fork, so that none of its own memory becomes huge pages on
  ringpool's account.
  ``RINGPOOL_ZYGOTE_HUGEPAGES=0`` turns it off.
- With torch preloaded at one intra-op thread (``torch.get_num_threads() == 1`` in the zygote),
  torch's pthreadpool (NNPACK/QNNPACK/XNNPACK ops) has one thread in a zygote worker, as after
  ``torch.set_num_threads(1)``, where a fresh interpreter would make it with a thread per core on
  first use (``ringpool/_zygote.py:_settle_torch_pool``: a worker's ``set_num_threads(1)``, which
  DataLoader calls, then starts no thread).

Logging (``ringpool.spawner``; silent unless configured): a worker started (DEBUG, ``popen.py``), a
zygote started, or started again after the previous one died (INFO), a zygote that died (WARNING,
as it happens, with the workers killed with it) or was stopped (DEBUG): these four come from the
C++ supervisor through ``_runtime_log``; a start retried because its zygote died meanwhile and
what the automatic preload skipped (WARNING).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Iterable, Union
from importlib import machinery as _machinery
from multiprocessing import context as _mp_context
from multiprocessing import process as _mp_process
from multiprocessing import spawn as _mp_spawn
from multiprocessing import util as _mp_util

from . import _core
from . import _runtime_log
from . import connection as _connection
from . import modules
from . import queues as _queues
from .bundle import _as_bundle
from .modules import _SnapshotLoader
from .popen import Popen

__all__ = ["RingpoolContext", "RingpoolProcess", "get_context", "register_start_method"]

if TYPE_CHECKING:
    from .bundle import Bundle
    from .connection import Connection

_RINGPOOL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_log = logging.getLogger("ringpool.spawner")


class RingpoolProcess(_mp_process.BaseProcess):
    """``multiprocessing.Process`` for the ringpool start method: ``ctx.Process(...)`` (each
    context has its own subclass) or a plain ``Process`` under ``set_start_method("ringpool")``.
    The stdlib's API; ``start()`` goes through ``ringpool.popen.Popen``."""

    _start_method = None
    _ringpool_context = None  # set on each context's subclass

    @staticmethod
    def _Popen(process_obj):
        # A plain multiprocessing.Process under set_start_method("ringpool") has no context of its
        # own: it gets the registered one.
        context = getattr(type(process_obj), "_ringpool_context", None) or get_context()
        return Popen(process_obj, context)

    def __reduce__(self):
        # A context's own subclass is made at run time and cannot be found by name in a worker.
        cls = type(self)
        if cls.__dict__.get("_ringpool_context") is not None:
            cls = RingpoolProcess
        return (_rebuild_process, (cls,), self.__dict__)


def _rebuild_process(cls):
    return cls.__new__(cls)


class RingpoolContext(_mp_context.BaseContext):
    """A ``multiprocessing`` context whose workers ringpool starts (module docstring). Make it
    with ``ringpool.get_context(...)``, which caches one per settings; every argument is a
    keyword of ``get_context`` too.

    preload, zygote, bundle: see ``get_context``.
    ready_timeout: seconds the first ``start()`` waits for the zygote's preload (a cold disk
        importing torch takes long; a preload that hangs is reported after this).
    spares: workers the zygote keeps forked ahead of ``start()`` (0: fork on demand). More spares
        make bursts of starts faster, each an idle process holding a little memory.
    preload_main: the zygote imports this process's main module (as ``__mp_main__``, as spawn
        does in every worker), so that its classes and functions are preloaded; False when the
        main module must not be imported twice.
    """

    _name = "ringpool"

    def __init__(self, preload=None, zygote=True, ready_timeout=300.0, spares=4, preload_main=True, bundle=None):
        self.zygote = bool(zygote)
        # None: the automatic preload (what this process has imported when the zygote starts).
        self.preload = _normalize_preload(preload, self.zygote)
        if self.preload and not self.zygote:
            raise ValueError("preload needs the zygote (zygote=True)")
        self.bundle = _as_bundle(bundle)
        self._zygote_has_bundle = False  # set when the zygote's configuration carried it
        self._ready_timeout = float(ready_timeout)
        if int(spares) < 0:
            raise ValueError("spares must be >= 0")
        self._spares = int(spares)
        self._preload_main = bool(preload_main)
        self.Process = type("RingpoolProcess", (RingpoolProcess,),
                            {"_ringpool_context": self, "__module__": __name__, "__qualname__": "RingpoolProcess"})
        self._sup = None
        self._spawning = 0  # Popens between _supervisor(spawning=True) and _spawn_done()
        self._zygote_modules = {}  # name -> hash of the snapshots the zygote was started with
        self._zygote_note = ""  # the last zygote note logged (see _log_zygote_note)
        self._warned = set()  # what the automatic preload warned about: once per context
        self._lock = threading.Lock()
        _live_contexts.add(self)

    def __repr__(self):
        if not self.zygote:
            mode = "exec"
        else:
            mode = "zygote, preload=" + ("automatic" if self.preload is None else str(list(self.preload)))
        if self.bundle is not None:
            mode += f", bundle {self.bundle.hash[:12]}"
        return f"<ringpool context ({mode})>"

    def __reduce__(self):
        tunables = (self._ready_timeout, self._spares, self._preload_main)
        return (_rebuild_context, (self.preload, self.zygote, self.bundle, tunables))

    def _after_fork(self):
        # A forked child (os.fork, a fork-context child, a zygote worker) has its parent's objects
        # but not its supervisor thread or zygote; the old Supervisor knows and leaks itself.
        self._lock = threading.Lock()
        self._sup = None
        self._spawning = 0

    @staticmethod
    def _bootstrap(module):
        return (f"import sys; sys.path.insert(0, {_RINGPOOL_DIR!r}); "
                f"from ringpool.{module} import main; main()")

    def _supervisor(self, spawning=False):
        """The supervisor, started if need be. spawning=True: a Popen is about to start a worker
        with it (shutdown() keeps the supervisor until _spawn_done())."""
        with self._lock:
            sup = self._supervisor_locked()
            self._spawning += spawning
            return sup

    def _spawn_done(self):
        with self._lock:
            self._spawning -= 1

    def _supervisor_locked(self):
        if self._sup is None:
            if self.zygote:
                exe = _mp_spawn.get_executable()
                argv = [exe, *_mp_util._args_from_interpreter_flags(), "-c", self._bootstrap("_zygote")]
                env = [f"{k}={v}" for k, v in os.environ.items()]
                main = {}
                if self._preload_main:
                    prep = _mp_spawn.get_preparation_data("zygote")
                    main = {k: prep[k] for k in ("init_main_from_path", "init_main_from_name") if k in prep}
                snaps = modules.snapshots()  # registered packages, installed before the preload
                self._check_bundle(snaps)
                self._zygote_modules = {s.name: s.hash for s in snaps}
                settings = {"sys_path": list(sys.path), "preload": self.preload or (), "main": main,
                            "modules": [s.to_bytes() for s in snaps]}
                if self.preload is None:
                    bundled = set() if self.bundle is None else {n.partition(".")[0] for n in self.bundle.modules()}
                    settings["auto_preload"] = _preloadable_modules(bundled)
                config = pickle.dumps(settings)
                if len(config) > _ZYGOTE_CONFIG_MAX:
                    # Registered packages too large for the one control message: the zygote gets
                    # those that fit, each worker the others at its start (popen._ringpool_state
                    # sends what _zygote_modules does not list).
                    room = _ZYGOTE_CONFIG_MAX - (len(config) - sum(len(b) for b in settings["modules"])) - 1024
                    kept = []
                    for s, data in zip(snaps, settings["modules"]):
                        if len(data) + 64 <= room:
                            kept.append((s, data))
                            room -= len(data) + 64
                    settings["modules"] = [data for _, data in kept]
                    self._zygote_modules = {s.name: s.hash for s, _ in kept}
                    config = pickle.dumps(settings)
                self._zygote_has_bundle = False
                if self.bundle is not None:
                    with_bundle = pickle.dumps({**settings, "bundle": (self.bundle.path, self.bundle.data)})
                    if len(with_bundle) <= _ZYGOTE_CONFIG_MAX:
                        config, self._zygote_has_bundle = with_bundle, True
                    elif set(self.preload or ()) & {n.partition(".")[0] for n in self.bundle.modules()}:
                        raise ValueError(
                            f"the bundle ({len(self.bundle.data)} bytes) does not fit in the zygote's "
                            f"configuration ({_ZYGOTE_CONFIG_MAX} bytes), so its packages cannot be preloaded")
                self._sup = _core.Supervisor.zygote_mode(exe, argv, env, os.getcwd(), config,
                                                         ready_timeout=self._ready_timeout, spares=self._spares)
                _runtime_log.attach(self._sup, self)  # the zygote's start, death, restart, stop
            else:
                self._check_bundle(modules.snapshots())
                self._sup = _core.Supervisor.exec_mode()
        return self._sup

    def _check_bundle(self, snaps):
        if self.bundle is None:
            return
        clash = sorted({s.name for s in snaps} & {n.partition(".")[0] for n in self.bundle.modules()})
        if clash:
            raise ValueError(f"bundle {self.bundle.path} and the registered packages both provide {clash}")

    # -- ringpool's own ------------------------------------------------------------------------
    def ensure_running(self) -> None:
        """Start the zygote now and wait until its preload is done (raises the preload's error).

        Otherwise the first ``start()`` does it. A no-op in exec mode.
        """
        sup = self._supervisor()
        sup.start()
        self._log_zygote(sup)

    def _log_zygote(self, sup):
        """Once the zygote is ready (after ``ensure_running()`` and every zygote ``start()``): logs
        what the automatic preload skipped (WARNING). (Its start and restart come from the
        supervisor itself, through ``_runtime_log``.)"""
        if self.preload is None:
            self._log_zygote_note(sup)

    def _log_zygote_note(self, sup):
        """Warns (``ringpool.spawner`` logger) of what the automatic preload skipped, once per context.

        Called once the zygote is ready (after ``ensure_running()`` and every zygote ``start()``):
        the zygote's READY carries the note (``_zygote._auto_preload``), and reading it is a copy
        under a mutex, no round trip to the supervisor's thread.
        """
        note = sup.zygote_note
        if not note or note == self._zygote_note:
            return
        self._zygote_note = note
        log = _log
        note = json.loads(note)
        for name, error in note.get("skipped", ()):
            if ("skipped", name) not in self._warned:
                self._warned.add(("skipped", name))
                log.warning("the zygote could not preload %s (%s); a worker imports it itself "
                            "if it needs it", name, error)
        for name, count in note.get("threads", ()):
            if ("threads", name) not in self._warned:
                self._warned.add(("threads", name))
                log.warning("importing %s left a thread running in the zygote, which cannot fork then: "
                            "the zygote started over without preloading it and the %d modules it imported",
                            name, count)
        if note.get("off") and "off" not in self._warned:
            self._warned.add("off")
            log.warning("the automatic preload is off for this context's zygote: %d imports left "
                        "threads running (preload= names what to preload)", len(note.get("threads", ())))

    def zygote_pid(self):
        """The zygote's pid, or None (exec mode, or not started)."""
        if self._sup is None:
            return None
        pid = self._sup.zygote_pid
        return pid if pid > 0 else None

    def shutdown(self) -> None:
        """Stop the zygote; running workers go on, and the next ``start()`` starts a new one.

        With no worker running or starting, the supervisor goes too: its thread ends, its
        descriptors close and the zygote and unused spares are reaped before this returns. (A
        worker dies with the thread that started it, so the supervisor stays while any runs.)
        """
        with self._lock:
            sup = self._sup
            if sup is None:
                return
            sup.stop()
            if not (self._spawning or sup.live_workers()):
                self._sup = None
        del sup  # the last reference (unless workers run): joins the supervisor's thread
        # What the zygote did until now is logged before this returns (outside the lock: a
        # handler may use this context).
        _runtime_log.flush()

    # -- what differs from BaseContext -----------------------------------------------------------
    def Queue(self, maxsize: int = 0) -> _queues.Queue:  # type: ignore[override]
        """A ringpool ``Queue`` (shared-memory ring) in place of the stdlib's pipe-based one."""
        return _queues.Queue(maxsize)

    def JoinableQueue(self, maxsize: int = 0) -> _queues.JoinableQueue:  # type: ignore[override]
        """A ringpool ``JoinableQueue`` in place of the stdlib's."""
        return _queues.JoinableQueue(maxsize)

    def SimpleQueue(self) -> _queues.SimpleQueue:  # type: ignore[override]
        """A ringpool ``SimpleQueue`` (with the ``_reader``/``_writer`` the stdlib's pools use)."""
        return _queues.SimpleQueue()

    def Pipe(self, duplex: bool = True) -> tuple[Connection, Connection]:  # type: ignore[override]
        """A ringpool ``Pipe``: two ``Connection`` ends over shared-memory rings."""
        return _connection.Pipe(duplex)

    def get_start_method(self, allow_none: bool = False) -> str:
        """Always ``"ringpool"`` (never ``"fork"``: SemLocks must keep their names, see the module docstring)."""
        return self._name

    def set_start_method(self, method, force=False):
        """Refused with ValueError: set the process-wide method with
        ``multiprocessing.set_start_method("ringpool")``."""
        raise ValueError("set the start method on the default context (multiprocessing.set_start_method)")


# The zygote's configuration travels in one control message (kMaxControlPayload in
# runtime/include/ringpool/detail/control.hpp); a bundle that does not fit goes to each worker at
# its start.
_ZYGOTE_CONFIG_MAX = (1 << 20) - 4096

_contexts = {}
_contexts_lock = threading.Lock()
_live_contexts = weakref.WeakSet()


def _reset_after_fork():
    global _contexts_lock
    _contexts_lock = threading.Lock()
    for ctx in list(_live_contexts):
        ctx._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


def _normalize_preload(preload, zygote):
    """None (automatic; exec mode has no preload: ()) or a tuple of module names."""
    if preload is None:
        return None if zygote else ()
    if isinstance(preload, str):
        return (preload,)
    return tuple(preload)


# Loaders whose modules a fresh interpreter finds by name on the same sys.path (registered
# packages' snapshots are installed in the zygote before its preload). Anything else (pytest's
# assertion-rewriting hook for test modules and conftest, importlib's LazyLoader, a hand-made
# loader) is a module the zygote could not import the same way.
_FILE_LOADERS = (_machinery.SourceFileLoader, _machinery.SourcelessFileLoader, _machinery.ExtensionFileLoader)
_CLASS_LOADERS = (_machinery.BuiltinImporter, _machinery.FrozenImporter)
_MODULE_TYPE = type(sys)


def _preloadable_modules(exclude_top=()):
    """The modules of ``sys.modules`` that a fresh interpreter with our sys.path imports by the
    same name, in import order (a package is in sys.modules before its submodules).

    Cheap per module (attribute reads and string operations, no file system access): it runs on
    the first ``start()``'s path. Skipped: ``__main__``/``__mp_main__`` (preload_main's), modules
    without a spec (made by hand) or whose spec has another name (aliases such as ``os.path``),
    modules of other loaders (above), and modules whose file is not where their name leads from
    our sys.path or their parent package's ``__path__`` (imported from a path since removed, or
    by ``spec_from_file_location``): importing those by name would fail or find another file.
    Top-level names in ``exclude_top`` are the context's bundle's: in workers, its own modules.
    """
    zipimporter = sys.modules.get("zipimport")
    zip_loader = getattr(zipimporter, "zipimporter", ())

    cwd = os.getcwd()
    roots = {os.path.abspath(p or cwd) for p in sys.path if isinstance(p, str)}
    getattr_ = _MODULE_TYPE.__getattribute__  # not the module's own: a lazy module would load
    out = []
    for name, mod in list(sys.modules.items()):
        if name in ("__main__", "__mp_main__") or not isinstance(mod, _MODULE_TYPE):
            continue
        if name.partition(".")[0] in exclude_top:
            continue
        try:
            spec = getattr_(mod, "__spec__")
        except AttributeError:
            continue
        if spec is None or spec.name != name:
            continue
        loader = spec.loader
        if isinstance(loader, type) and issubclass(loader, _CLASS_LOADERS):
            out.append(name)
            continue
        if isinstance(loader, _SnapshotLoader):
            out.append(name)
            continue
        parent, _, leaf = name.rpartition(".")
        if parent:
            try:
                where = {os.path.abspath(p) for p in getattr_(sys.modules[parent], "__path__")}
            except (KeyError, AttributeError, TypeError):
                continue
        else:
            where = roots
        locations = spec.submodule_search_locations
        if isinstance(loader, _machinery.NamespaceLoader):
            # A namespace package: found if one of its folders is <an entry of where>/<leaf>.
            if any(os.path.dirname(p) in where and os.path.basename(p) == leaf for p in locations or ()):
                out.append(name)
            continue
        if not isinstance(loader, (*_FILE_LOADERS, *((zip_loader,) if zip_loader else ()))) or not spec.origin:
            continue
        if locations is not None:  # a regular package: <entry>/<leaf>/__init__.py
            folder = os.path.dirname(spec.origin)
            entry, stem = os.path.dirname(folder), os.path.basename(folder)
        else:  # a module: <entry>/<leaf>.py, .pyc or .<abi tag>.so
            entry, stem = os.path.dirname(spec.origin), os.path.basename(spec.origin).partition(".")[0]
        if stem == leaf and entry in where:
            out.append(name)
    # sys.modules' order is import order, except where an entry was replaced after its
    # submodules' (a reload, a package re-inserting itself): parents first all the same.
    ordered, seen, found = [], set(), set(out)
    for name in out:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            n = ".".join(parts[:i])
            if n in found and n not in seen:
                seen.add(n)
                ordered.append(n)
    return ordered


# Start-method names that a caller may pass by mistake, expecting multiprocessing.get_context's
# meaning; as a preload they would be module names, and none of them is a module worth preloading.
_STDLIB_START_METHODS = ("fork", "spawn", "forkserver")


def get_context(preload: Union[str, Iterable[str], None] = None, zygote: bool = True,
                bundle: Union[Bundle, str, os.PathLike[str], None] = None, *, ready_timeout: float = 300.0,
                spares: int = 4, preload_main: bool = True) -> RingpoolContext:
    """The ringpool multiprocessing context for these settings (one per process and settings).

    preload: modules the zygote imports once, before forking any worker (e.g. ``("torch",)``).
        None (the default): what this process has imported when the zygote starts, those that a
        fresh interpreter can import by name (skipping with a warning any that fails there);
        ``()``: nothing but ringpool's own worker modules (module docstring: the trade-off).
        A start-method name (``"spawn"``, ``"fork"``, ``"forkserver"``) is refused with a
        ValueError: ``multiprocessing.get_context`` gives those; ``"ringpool"`` means the default
        context, as in ``multiprocessing.get_context("ringpool")``.
    zygote: False for exec mode (a fresh interpreter per worker; no preload).
    bundle: a ``ringpool.Bundle`` or a path to one: its modules are installed in every worker under
        their real names (contexts are cached by the bundle's hash, so a path is read each call).
    ready_timeout: seconds a start waits for the zygote's preload before failing (default 300: a
        cold disk importing torch can take a minute; a preload that hangs is reported then).
    spares: workers the zygote keeps forked ahead of ``start()`` (default 4; 0: fork on demand).
        More make bursts of starts faster; each is an idle process holding a little memory.
    preload_main: whether the zygote imports this process's main module (as ``__mp_main__``, as
        spawn does in every worker) so that its classes and functions are preloaded (default
        True); False when importing the main module a second time must not happen.
    """
    if isinstance(preload, str):
        if preload in _STDLIB_START_METHODS:
            raise ValueError(
                f"{preload!r} is a start method of the standard library, not a module to preload: "
                f"use multiprocessing.get_context({preload!r}) for it, or ringpool.get_context() for "
                "ringpool's (preload= names modules for ringpool's zygote to import)")
        if preload == "ringpool":
            preload = None  # multiprocessing.get_context("ringpool") is this default context
    if not float(ready_timeout) > 0:
        raise ValueError("ready_timeout must be a positive number of seconds")
    if isinstance(spares, bool) or int(spares) != spares or spares < 0:
        raise ValueError("spares must be an int >= 0")
    bundle = _as_bundle(bundle)
    tunables = (float(ready_timeout), int(spares), bool(preload_main))
    key = (_normalize_preload(preload, bool(zygote)), bool(zygote), None if bundle is None else bundle.hash,
           tunables)
    with _contexts_lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = _contexts[key] = RingpoolContext(key[0], key[1], bundle=bundle, ready_timeout=tunables[0],
                                                   spares=tunables[1], preload_main=tunables[2])
        return ctx


def _rebuild_context(preload, zygote, bundle, tunables):
    """Unpickling a context: the same settings' context in this process (see __reduce__)."""
    return get_context(preload, zygote, bundle, ready_timeout=tunables[0], spares=tunables[1],
                       preload_main=tunables[2])


def register_start_method() -> RingpoolContext:
    """Make ``multiprocessing.get_context("ringpool")`` and ``set_start_method("ringpool")`` work
    now, and return the context the name stands for (the default one: zygote mode, the automatic
    preload).

    An installed ringpool needs no call: its ``ringpool-start-method.pth`` makes the name resolve
    on first use in every interpreter (``_ringpool_start_method``). This call is for a checkout on
    PYTHONPATH, where no .pth is read.
    """
    import _ringpool_start_method  # a top-level module (the .pth's), not part of the package

    _ringpool_start_method.install()
    return _mp_context._concrete_contexts.setdefault(_ringpool_start_method.NAME, get_context())
