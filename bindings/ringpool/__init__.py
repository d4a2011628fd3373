"""ringpool: a multiprocess runtime with a shared-memory transport.

Public API:

- ``Queue``, ``JoinableQueue``, ``SimpleQueue``: ``multiprocessing``'s queues over shared-memory
  rings, plus ``put_many``/``get_many``.
- ``Pipe``/``Connection``: ``multiprocessing.Pipe`` over rings.
- ``reduction``: how objects, handles and buffers become frames.
- ``get_context(preload=None, zygote=True, bundle=None, *, ready_timeout, spares, preload_main)``:
  a ``multiprocessing`` context whose workers ringpool starts (forked by a preloaded zygote, by
  default preloaded with what this process imported, or exec mode).
- ``import ringpool.joblib``: joblib's ``Parallel(backend="ringpool")`` on an ``Executor``.
- ``Executor``: a ``concurrent.futures`` process pool over per-worker rings (``WorkerDied``,
  ``TaskTimeout``, ``RemoteTraceback``).
- ``import_module_from_path(name, path)``, ``register_module(module)``, ``reload(name)``:
  packages imported from arbitrary folders, snapshotted so that workers can import them too
  (``ringpool.modules``; docs/design/code-shipping.md).
- ``ClusterExecutor``: the Executor's surface over a dask.distributed cluster, each dask worker
  running its tasks through a node-local pool (``ringpool.cluster``; imported, with dask, only when
  first used; docs/guide/cluster.md).
- ``Bundle``, ``BundleWriter``: zip archives of packages, resources and pickles with
  intern/extern/mock/deny rules, loaded in isolation or as the workers' environment
  (``get_context(bundle=...)``).

Linux 5.11 or later only: the import fails with an ImportError naming what this system lacks
(``ringpool._platform``). Lifecycle events (workers started, died, replaced, recycled; the
zygote started, died, restarted, reported by the C++ supervisor as they happen; packages shipped
and reloaded) go to the ``logging`` logger ``"ringpool"`` and its children (``ringpool.spawner``,
``ringpool.executor``, ``ringpool.modules``), silent unless the application configures logging
(docs/guide/troubleshooting.md).
"""
import logging as _logging

# A library stays silent unless the application configures logging (the logging HOWTO's advice).
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

from . import _platform  # noqa: E402  (first: the check runs before the extension loads)

_platform.check()

from . import reduction
from ._core import ProtocolError
from .bundle import BadBundleError, Bundle, BundleError, BundleWriter
from .connection import Connection, Pipe
from .context import RingpoolContext, get_context, register_start_method
from .executor import Executor, RemoteTraceback, TaskTimeout, WorkerDied
from .modules import import_module_from_path, register_module, reload
from .queues import JoinableQueue, Queue, SimpleQueue

# The one version number: pyproject.toml and CMakeLists.txt read it from this line.
__version__ = "0.1.0"

__all__ = [
    "BadBundleError",
    "Bundle",
    "BundleError",
    "BundleWriter",
    "ClusterExecutor",
    "Connection",
    "Executor",
    "JoinableQueue",
    "Pipe",
    "ProtocolError",
    "RemoteTraceback",
    "RingpoolContext",
    "Queue",
    "SimpleQueue",
    "TaskTimeout",
    "WorkerDied",
    "get_context",
    "import_module_from_path",
    "register_start_method",
    "reduction",
    "register_module",
    "reload",
    "__version__",
]


def __getattr__(name):
    # Lazily: importing ringpool must not import dask.distributed.
    if name == "ClusterExecutor":
        from .cluster import ClusterExecutor  # lazy: it imports dask

        return ClusterExecutor
    raise AttributeError(f"module 'ringpool' has no attribute {name!r}")
