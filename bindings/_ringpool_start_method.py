"""The start-method name "ringpool" in ``multiprocessing``, with no call and no import first.

``ringpool-start-method.pth`` (installed at the site-packages root next to this module) imports
this module at every interpreter start, so what runs at import must cost nothing: it imports
nothing (``sys`` is built in), imports neither ``multiprocessing`` nor the ``ringpool`` package,
defines no class, and only puts itself (the module is the finder) at the front of
``sys.meta_path``::

    interpreter start ── site ── .pth ── import _ringpool_start_method ── install(): into meta_path
    import multiprocessing ── find_spec("multiprocessing.context") wraps the real loader
        ── the stdlib module executes ── _patch(): _concrete_contexts becomes a _Contexts dict,
           DefaultContext.get_all_start_methods also lists "ringpool"
        ── multiprocessing/__init__ binds get_context, set_start_method, get_all_start_methods...
    get_context("ringpool") / set_start_method("ringpool") ── _Contexts.__missing__
        ── import ringpool.context (the package and its extension, first time here)
        ── ringpool.context.register_start_method(): the default ringpool context, stored

The finder stays in ``sys.meta_path`` (it answers only for ``multiprocessing.context``; for any
other name it returns None after one comparison): removing it from the list other threads may be
iterating could make one of their imports skip a finder, and staying lets a re-imported
``multiprocessing.context`` get the name too.

``ringpool.context.register_start_method()`` calls ``install()`` as well (a checkout on
PYTHONPATH has no .pth processed). When ringpool or its extension cannot be imported, the name's
lookup raises an ImportError that says which file, what the loader said and what to do; every
other start method is untouched. docs/design/spawner.md, "The start-method name".
"""
import sys

NAME = "ringpool"
_TARGET = "multiprocessing.context"


_Contexts = _Loader = None  # made by _classes()


def _classes():
    """Makes _Contexts and _Loader, the first time multiprocessing.context is imported: a class
    costs ~15 us to make, which interpreters that never use multiprocessing need not pay."""
    global _Contexts, _Loader
    if _Contexts is not None:
        return

    class _Contexts(dict):
        """multiprocessing.context._concrete_contexts, whose "ringpool" entry is made on first use."""

        __slots__ = ()

        def __missing__(self, method):
            if method != NAME:
                raise KeyError(method)  # the stdlib turns it into its ValueError
            try:
                from ringpool.context import register_start_method  # the package: only once asked for
            except ImportError as err:
                raise ImportError(_why(err), name=err.name, path=err.path) from err
            return register_start_method()

    class _Loader:
        """multiprocessing.context's own loader, then _patch."""

        def __init__(self, loader):
            self.loader = loader

        def create_module(self, spec):
            return self.loader.create_module(spec)

        def exec_module(self, module):
            # The module keeps its real loader (inspect, linecache and reload use it).
            module.__loader__ = module.__spec__.loader = self.loader
            self.loader.exec_module(module)
            try:
                _patch(module)
            except Exception as err:  # multiprocessing must work without the name
                import warnings  # only on this error path

                warnings.warn(f"the {NAME!r} start method is not available: {err!r}", RuntimeWarning)


def _why(err):
    """The message for a lookup of the name that could not import ringpool (err)."""
    import importlib.machinery  # only on this error path
    import importlib.util
    import os

    fix = (f"Reinstall ringpool for this interpreter ({sys.executable}, Python "
           f"{sys.version.split()[0]}), or in a source checkout build it with ./run build.")
    cause = f"{type(err).__name__}: {err}"
    try:
        spec = importlib.util.find_spec("ringpool")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return f"start method {NAME!r}: the ringpool package cannot be found ({cause}). {fix}"
    pkg = spec.submodule_search_locations[0]
    wanted = ["_core" + s for s in importlib.machinery.EXTENSION_SUFFIXES]
    present = [os.path.join(pkg, f) for f in wanted if os.path.exists(os.path.join(pkg, f))]
    if not present:
        # (the package's own import then fails on its first use of _core, with a message that
        # names no file)
        others = sorted(f for f in os.listdir(pkg) if f.startswith("_core.") and f not in wanted)
        return (f"start method {NAME!r}: ringpool's extension is missing from {pkg} (looked for "
                f"{' or '.join(wanted)}; other builds there: {', '.join(others) or 'none'}). {fix}")
    if err.name == "ringpool._core" or err.path in present:
        return (f"start method {NAME!r}: ringpool's extension {present[0]} did not load; the "
                f"loader said: {err}. {fix}")
    return f"start method {NAME!r}: importing ringpool from {pkg} failed ({cause}). {fix}"


def _patch(mpc):
    """Gives the stdlib module multiprocessing.context (mpc) the name (idempotent)."""
    _classes()
    if not isinstance(mpc._concrete_contexts, _Contexts):
        mpc._concrete_contexts = _Contexts(mpc._concrete_contexts)
    cls = mpc.DefaultContext
    if getattr(cls.get_all_start_methods, "_ringpool", False):
        return
    stdlib_methods = cls.get_all_start_methods

    # torch's DataLoader accepts a start method given as a string only if this lists it.
    def get_all_start_methods(self):
        methods = stdlib_methods(self)
        return methods if NAME in methods else [*methods, NAME]

    get_all_start_methods._ringpool = True
    get_all_start_methods.__doc__ = stdlib_methods.__doc__
    get_all_start_methods.__wrapped__ = stdlib_methods
    cls.get_all_start_methods = get_all_start_methods
    # multiprocessing/__init__ binds _default_context's methods once, after this module ran; only
    # an install() after that (register_start_method on a checkout) needs to bind this one again.
    mp = sys.modules.get("multiprocessing")
    if getattr(mp, "get_all_start_methods", None) is not None:
        mp.get_all_start_methods = mpc._default_context.get_all_start_methods


def find_spec(fullname, path=None, target=None):
    """This module is the finder (no class to make at start-up): it answers only for
    multiprocessing.context, with that module's spec whose loader also runs _patch."""
    if fullname != _TARGET:
        return None
    this = sys.modules[__name__]
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None) if finder is not this else None
        spec = find(fullname, path, target) if find is not None else None
        if spec is not None:
            break
    else:
        return None
    if spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return spec
    _classes()
    spec.loader = _Loader(spec.loader)
    return spec


def install():
    """Makes the name resolve: now if multiprocessing.context is imported, else when it is."""
    mpc = sys.modules.get(_TARGET)
    if mpc is not None and hasattr(mpc, "DefaultContext"):
        _patch(mpc)
    this = sys.modules[__name__]
    if this not in sys.meta_path:
        sys.meta_path.insert(0, this)


install()
