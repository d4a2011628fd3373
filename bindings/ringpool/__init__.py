"""ringpool: a multiprocess runtime with a shared-memory transport.

Public API (this issue's layer: the transport):

- ``Queue``, ``JoinableQueue``, ``SimpleQueue``: ``multiprocessing``'s queues over shared-memory
  rings, plus ``put_many``/``get_many``.
- ``Pipe``/``Connection``: ``multiprocessing.Pipe`` over rings.
- ``reduction``: how objects, handles and buffers become frames.
"""
from . import reduction
from ._core import ProtocolError
from .connection import Connection, Pipe
from .queues import JoinableQueue, Queue, SimpleQueue

__version__ = "0.1.0"

__all__ = [
    "Connection",
    "JoinableQueue",
    "Pipe",
    "ProtocolError",
    "Queue",
    "SimpleQueue",
    "reduction",
    "__version__",
]
