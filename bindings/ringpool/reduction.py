"""How ringpool turns objects into frames and back.

Every ringpool channel pickles with the reducers registered on
``multiprocessing.reduction.ForkingPickler`` (so the stdlib's and torch's apply), using one cached
pickler per thread: ``ForkingPickler.dumps`` builds a new pickler and copies the whole dispatch
table per call, which costs more than the ring itself. The cached pickler is rebuilt when the
set of registered reducers changes.

Handles: while ringpool pickles, ``multiprocessing.context.get_spawning_popen()`` returns a
``_HandleCollector``. ``multiprocessing.reduction.DupFd(fd)`` (used by the reducers of
Connection, socket, torch storages, ...) then records the descriptor, which travels with the frame
over the channel's socket, and pickles a ``_ReceivedFd(index)``; on the receiving side
``_ReceivedFd.detach()`` returns the received descriptor, a fresh one the caller owns.
``multiprocessing.resource_sharer`` is never involved.

Buffers: pickle protocol 5 out-of-band buffers of at least ``OOB_BUFFER_MIN`` bytes (numpy arrays,
PickleBuffer-aware types) are not copied into the pickle: the frame carries them after it
(``FLAG_BUFFERS`` layout in docs/design/protocol.md), and the receiver rebuilds the objects over
the received memory (for out-of-band frames: shared memory, no copy).

The hybrid pickler (``Pickler``): one pickler for every ringpool channel and for process start,
which decides how each function, class and object travels, in this order:

1. Handle reducers: everything registered with ``ForkingPickler`` (the stdlib's, torch's tensor
   and storage reducers, ``register()``), matched along the MRO, so a subclass of a registered
   type is reduced as its registered base is. Their descriptors ride the frame.
2. Functions and classes a worker can import by name (installed modules, and packages from the
   ``ringpool.modules`` registry, whose sources every worker has): by reference. A module that
   is in ``sys.modules`` only because it was loaded by hand from a folder outside ``sys.path``
   is registered first (``modules.ensure_shipped``), so it reaches workers as registered
   packages do; one whose source is gone raises ``modules.ModuleSourceError`` here.
3. By value, through cloudpickle, what a worker cannot import: ``__main__``'s functions and
   classes, lambdas, closures, classes defined in functions or interactively. Functions from one
   module share one globals namespace within a message, as in a single cloudpickle dump.
4. Everything else: plain pickle (protocol 5, large buffers out of band).

An object that cannot be pickled raises ``PicklingError`` naming the attribute path of the part
that failed (``obj.model.lock``), in the caller: nothing is queued and the channel stays usable.
"""
from __future__ import annotations

import copyreg
import io
import os
import pickle
import struct
import sys
import threading
import types
from multiprocessing import context as _mp_context
from multiprocessing.reduction import ForkingPickler

from . import _core
from . import modules as _modules

__all__ = ["Pickler", "dumps", "loads", "register", "OOB_BUFFER_MIN"]

# Protocol-5 buffers smaller than this stay in the pickle: below it the table entry and the
# 64-byte alignment cost more than the copy saves.
OOB_BUFFER_MIN = 8192

FLAG_BUFFERS = _core.FLAG_BUFFERS
FLAG_RAW = _core.FLAG_RAW

_BUF_HEAD = struct.Struct("<IIQ")  # nbuf, reserved, pickle_len
_ALIGN = 64
_PAD = bytes(_ALIGN)

_tls = threading.local()


def register(type_, reducer):
    """Register a handle reducer for ``type_`` on every ringpool channel (and the stdlib's)."""
    ForkingPickler.register(type_, reducer)


class _ReceivedFd:
    """Pickled in place of a descriptor; ``detach()`` on the receiving side returns it."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index

    def detach(self):
        table = getattr(_tls, "received", None)
        if table is None or not 0 <= self.index < len(table):
            raise RuntimeError("ringpool handle unpickled outside the frame that carried it")
        fd = table[self.index]
        if fd is None:
            raise RuntimeError("ringpool handle detached twice")
        table[self.index] = None
        return fd

    def __reduce__(self):
        return (_ReceivedFd, (self.index,))


class _HandleCollector:
    """The spawning popen seen by reducers while ringpool pickles one message."""

    __slots__ = ("fds",)
    DupFd = _ReceivedFd

    def __init__(self):
        self.fds = []

    def duplicate_for_child(self, fd):
        # The descriptor is sent before put() returns (or duplicated if the frame has to wait),
        # so the reducer's own descriptor is borrowed, not taken.
        self.fds.append(fd)
        return len(self.fds) - 1


_dispatch = copyreg.dispatch_table
_extra = ForkingPickler._extra_reducers
_mp_tls = _mp_context._tls


def _reducer_epoch():
    # Changes whenever a reducer is registered (copyreg or ForkingPickler.register, as torch does
    # on import): the cached pickler copied the tables at construction and must be rebuilt.
    return len(_dispatch) + (len(_extra) << 24)


class _Writer:
    __slots__ = ("write",)


try:
    from cloudpickle import cloudpickle_fast as _cp
except ImportError:  # pragma: no cover - Debian's python3-cloudpickle is a dependency
    _cp = None

_FunctionType = types.FunctionType
_ensure_shipped = _modules.ensure_shipped
_shipped_checked = _modules.checked
_sys_modules = sys.modules
_ABSENT = object()
_NO_REDUCER = object()


# cloudpickle records, for each function pickled by value, the loaded submodules of the packages
# it uses (``torch.nn`` for a function that names ``torch`` and ``nn``), so that the receiver
# imports them. Its ``_find_imported_submodules`` scans all of sys.modules for each such package
# and function: with torch loaded (~1000 modules) about 0.25 ms per package, so pickling a
# ``__main__`` Dataset class (three methods naming torch and numpy) cost ~0.75 ms on every
# start(). The same answer, from a per-package list of loaded submodules that is rebuilt only
# when the names in sys.modules change:
_SUBMODULES = ((), {})  # (tuple of sys.modules' names, {prefix: [(name, frozenset(tokens))]})


def _loaded_submodules(prefix):
    global _SUBMODULES
    names = tuple(sys.modules)  # exact: any added or removed module name invalidates
    keys, by_prefix = _SUBMODULES
    if keys != names:
        by_prefix = {}
        _SUBMODULES = (names, by_prefix)
    subs = by_prefix.get(prefix)
    if subs is None:
        n = len(prefix)
        subs = by_prefix[prefix] = [(name, frozenset(name[n:].split(".")))
                                    for name in names if name is not None and name.startswith(prefix)]
    return subs


def _find_imported_submodules(code, top_level_dependencies):
    """cloudpickle's ``_find_imported_submodules`` (same result, same order) over the cache."""
    subimports = []
    co_names = None
    for x in top_level_dependencies:
        if isinstance(x, types.ModuleType) and hasattr(x, "__package__") and x.__package__:
            for name, tokens in _loaded_submodules(x.__name__ + "."):
                if co_names is None:
                    co_names = set(code.co_names)
                if tokens <= co_names:
                    module = sys.modules.get(name)
                    if module is not None:
                        subimports.append(module)
    return subimports


def _with_globals(func, **replace):
    """func's code over a copy of its module's namespace with some names replaced (None when
    the installed cloudpickle does not have them: its own function is used then)."""
    if func is None or not all(k in func.__globals__ for k in replace):
        return None
    return types.FunctionType(func.__code__, {**func.__globals__, **replace}, func.__name__,
                              func.__defaults__, func.__closure__)


def _handle_reducer(cache, t):
    """The ForkingPickler reducer registered for t or its nearest base (None if none)."""
    r = cache.get(t, _NO_REDUCER)
    if r is _NO_REDUCER:
        r = None
        for base in t.__mro__:
            r = _extra.get(base)
            if r is not None:
                break
        cache[t] = r
    return r


class Pickler(ForkingPickler):
    """ringpool's hybrid pickler (see the module docstring): ForkingPickler's handle reducers
    first (along the MRO), then by reference, then by value through cloudpickle."""

    def __init__(self, file, protocol=5, fix_imports=True, buffer_callback=None):
        super().__init__(file, protocol, fix_imports, buffer_callback)
        if _cp is not None:
            # What a by-value function or class is made of (code objects, cells, modules, ...).
            for k, v in _cp.CloudPickler._dispatch_table.items():
                self.dispatch_table.setdefault(k, v)
        self.globals_ref = {}  # cloudpickle's: id(func.__globals__) -> the shared namespace
        self.proto = protocol
        self._mro = {}
        self._by_name = {}  # id -> function or class found importable by name

    if _cp is not None:
        _function_reduce = _cp.CloudPickler._function_reduce
        # cloudpickle's own, but its _function_getstate finds submodules through the cache above.
        _getstate = _with_globals(getattr(_cp, "_function_getstate", None),
                                  _find_imported_submodules=_find_imported_submodules)
        _dynamic_function_reduce = ((_getstate and _with_globals(_cp.CloudPickler._dynamic_function_reduce,
                                                                 _function_getstate=_getstate))
                                    or _cp.CloudPickler._dynamic_function_reduce)
        del _getstate
        _function_getnewargs = _cp.CloudPickler._function_getnewargs

    def reducer_override(self, obj):
        """The pickle hook: handles (fds, Connections, registered types) first, then code by
        reference or by value (the module docstring's order)."""
        # Called by the C pickler for every object whose type is not a builtin atom or container.
        t = type(obj)
        r = self._mro.get(t, _NO_REDUCER)
        if r is _NO_REDUCER:
            r = _handle_reducer(self._mro, t)
        if r is not None:
            return r(obj)
        if _cp is None:
            return NotImplemented
        if t is not _FunctionType and not isinstance(obj, type):
            return NotImplemented
        # Importable by name (the common case): remembered, since finding out walks sys.modules
        # and costs more than pickling a small object.
        if self._by_name.get(id(obj)) is obj:
            return NotImplemented
        if t is _FunctionType:
            if len(self.globals_ref) > 256:  # ids of namespaces long gone must not be reused
                self.globals_ref.clear()
            r = self._function_reduce(obj)  # NotImplemented when importable by name
        else:
            r = _cp._class_reduce(obj)
        if r is NotImplemented:
            # By reference: a module loaded by hand from outside sys.path is registered here,
            # so the worker has it (once per top-level module; raises if it cannot be shipped).
            module = obj.__module__  # functions and classes always have it (maybe None)
            if type(module) is str and _shipped_checked.get(module) is not _sys_modules.get(module, _ABSENT):
                _ensure_shipped(module)
            if len(self._by_name) < 4096:
                self._by_name[id(obj)] = obj  # held: its id cannot be reused while it is here
        return r


def dump(obj, file, protocol=5):
    """Pickle obj to file with the hybrid pickler (no handle collection: for process start,
    where the spawning popen collects descriptors)."""
    try:
        Pickler(file, protocol).dump(obj)
    except Exception as exc:
        better = _explain(obj, exc)
        if better is exc:
            raise
        raise better from exc


def explain_parts(parts, exc):
    """Like ``_explain`` for a call: parts is [(name, object)], e.g. [("args[0]", a), ...]; the
    first part that does not pickle is searched, and its path is named from that name."""
    for name, part in parts:
        if _try_pickle(part) is not None:
            better = _explain(part, exc, name)
            return better
    return exc


def _explain(obj, exc, root="obj"):
    """The pickling error of obj, naming the attribute path of the innermost part that fails.

    Of the same type as the original when that type takes a message (so ``except TypeError``
    still catches an unpicklable lock), else ``PicklingError``; the original is its cause."""
    if getattr(exc, "_ringpool_path", None) is not None:
        return exc
    try:
        path, part, err = _find_unpicklable(obj, root, 0)
    except Exception:  # the search itself must never hide the original error
        return exc
    if path is None:
        return exc
    t = type(part)
    msg = f"cannot pickle {path} (a {t.__module__}.{t.__qualname__}): {err}"
    try:
        better = type(exc)(msg)
    except Exception:
        better = pickle.PicklingError(msg)
    better._ringpool_path = path
    return better


def _try_pickle(obj):
    prev = getattr(_mp_tls, "spawning_popen", None)
    _mp_tls.spawning_popen = _HandleCollector()  # descriptors are fine: they travel with frames
    try:
        Pickler(io.BytesIO(), 5, buffer_callback=lambda b: False).dump(obj)
        return None
    except Exception as e:
        return e
    finally:
        _mp_tls.spawning_popen = prev


def _children(obj):
    t = type(obj)
    if t is dict:
        return [(f"[{k!r}]", v) for k, v in obj.items()]
    if t in (list, tuple, set, frozenset):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    out = []
    d = getattr(obj, "__dict__", None)
    if isinstance(d, dict):
        out += [(f".{k}", v) for k, v in d.items()]
    for cls in t.__mro__:
        for name in getattr(cls, "__slots__", ()) if isinstance(getattr(cls, "__slots__", ()), (tuple, list)) else ():
            if hasattr(obj, name):
                out.append((f".{name}", getattr(obj, name)))
    return out


def _find_unpicklable(obj, path, depth):
    """(path, part, error) of the innermost failing part of obj, or (None, None, None)."""
    err = _try_pickle(obj)
    if err is None:
        return None, None, None
    if depth < 16:
        for suffix, child in _children(obj):
            found = _find_unpicklable(child, path + suffix, depth + 1)
            if found[0] is not None:
                return found
    return path, obj, err


class _Dumper:
    """One per thread: a reusable ForkingPickler whose file is a list append (the C pickler flushes
    each dump in one write), a reusable handle collector, and the buffers of the dump in progress.
    ``_core.dumps`` drives it from C; every attribute here is read once per thread."""

    __slots__ = ("epoch", "out", "pickler", "dump", "clear_memo", "buffers", "collector")

    def __init__(self):
        self.epoch = _reducer_epoch()
        self.out = []
        w = _Writer()
        w.write = self.out.append
        self.buffers = []
        self.collector = _HandleCollector()
        self.pickler = Pickler(w, 5, True, self._on_buffer)
        self.dump = self.pickler.dump
        self.clear_memo = self.pickler.clear_memo

    def _on_buffer(self, pb):
        try:
            m = pb.raw()
        except BufferError:  # not contiguous: let pickle copy it in-band
            return True
        if m.nbytes < OOB_BUFFER_MIN:
            return True
        self.buffers.append(m)
        return False


def _thread_dumper():
    """This thread's dumper, rebuilt when reducers were registered since it was made."""
    d = getattr(_tls, "dumper", None)
    if d is None or d.epoch != _reducer_epoch():
        d = _tls.dumper = _Dumper()
    return d


# dumps(obj) -> (payload, flags, fds): pickles with this thread's dumper under the handle
# collector, in C (see bindings/src/codec.cpp).
dumps = _core.dumps


def _with_buffers(data, bufs):
    n = len(bufs)
    head = _BUF_HEAD.pack(n, 0, len(data)) + struct.pack(f"<{n}Q", *(m.nbytes for m in bufs))
    pieces = [head, data]
    off = len(head) + len(data)
    for m in bufs:
        pad = -off % _ALIGN
        if pad:
            pieces.append(_PAD[:pad])
            off += pad
        pieces.append(m)
        off += m.nbytes
    return pieces


def _split_buffers(payload):
    mv = memoryview(payload)
    nbuf, _, plen = _BUF_HEAD.unpack_from(mv, 0)
    lens = struct.unpack_from(f"<{nbuf}Q", mv, _BUF_HEAD.size)
    off = _BUF_HEAD.size + 8 * nbuf
    data = mv[off:off + plen]
    off += plen
    bufs = []
    for n in lens:
        off += -off % _ALIGN
        bufs.append(mv[off:off + n])
        off += n
    if off > len(mv):
        raise _core.ProtocolError("buffer table runs past the frame")
    return data, bufs


def loads_payload(payload, flags=0, fds=None):
    """Unpickle a frame's payload; fds are the descriptors that came with it (consumed)."""
    if fds:
        prev = getattr(_tls, "received", None)
        _tls.received = table = list(fds)
        try:
            return _loads_flags(payload, flags)
        finally:
            _tls.received = prev
            for fd in table:  # whatever the objects did not take
                if fd is not None:
                    os.close(fd)
    return _loads_flags(payload, flags)


def _loads_flags(payload, flags):
    if flags & FLAG_BUFFERS:
        data, bufs = _split_buffers(payload)
        return pickle.loads(data, buffers=bufs)
    if type(payload) is bytes:
        return pickle.loads(payload)
    with memoryview(payload) as mv:  # an out-of-band block: free it as soon as we are done
        return pickle.loads(mv)


def loads(item):
    """Unpickle an item as returned by ``_core.Channel.get``."""
    if type(item) is bytes:
        return pickle.loads(item)
    flags, payload, fds = item
    return loads_payload(payload, flags, fds)


def payload_bytes(item):
    """The bytes of an item, for recv_bytes: raw frames as sent, pickles as a plain pickle."""
    if type(item) is bytes:
        return item
    flags, payload, fds = item
    if flags & FLAG_RAW or not (fds or flags & FLAG_BUFFERS):
        for fd in fds or ():
            os.close(fd)
        return bytes(payload)
    # Handles and out-of-band buffers only make sense to our unpickler: rebuild the object and
    # return an equivalent self-contained pickle, which is what the stdlib's recv_bytes returns.
    return bytes(ForkingPickler.dumps(loads_payload(payload, flags, fds)))
