"""What ringpool needs from the platform, checked when the package is imported.

ringpool runs on Linux only, 5.11 or later: its shared memory is memfd segments with sealed sizes,
and its spawner starts, signals and reaps processes through pidfds (``clone3(CLONE_PIDFD)``,
``pidfd_open``, ``pidfd_send_signal``, ``waitid(P_PIDFD)``) and gives a worker only its own
descriptors with ``close_range(CLOSE_RANGE_CLOEXEC)``. Without one of these it would fail later,
in the middle of a ``start()``, with a bare errno; ``check()`` refuses the import instead, with an
ImportError that names what is missing.

The probes are system calls that succeed harmlessly or fail at once
(``runtime/include/ringpool/kernel.hpp``, ``_core.kernel_features()``): a few microseconds, once
per process. A seccomp filter that answers ENOSYS (an old container profile that blocks
``clone3``) counts as missing: the spawner has no fallback. ``python -m ringpool info`` prints
every probe, the best-effort ones too.
"""
from __future__ import annotations

import sys

MIN_LINUX = "5.11"

_Feature = None  # the namedtuple, made on first use (making one costs ~0.2 ms: not at every import)


def check():
    """Raise ImportError, saying why, where ringpool cannot work; called by ``ringpool/__init__``."""
    if not sys.platform.startswith("linux"):
        raise ImportError(f"ringpool runs on Linux only (Linux {MIN_LINUX} or later), not on "
                          f"{sys.platform!r}: it is built on memfd shared memory and pidfds")
    missing = [f for f in _probe() if f[3] and f[4]]  # required, errno
    if missing:
        import os  # only on this error path

        what = "; ".join(f"{name} (Linux {since}, for {use}): {error}" for name, since, use, _, _, error in missing)
        raise ImportError(f"ringpool needs Linux {MIN_LINUX} or later, and this system "
                          f"({os.uname().release}) lacks: {what}. A container's seccomp profile "
                          f"can block these calls too (docs/guide/troubleshooting.md).")


def features():
    """Every kernel feature ringpool uses, as ``Feature(name, since, use, required, errno, error)``
    namedtuples (required ones first)."""
    global _Feature
    if _Feature is None:
        import collections

        _Feature = collections.namedtuple("Feature", "name since use required errno error")
    return [_Feature(*f) for f in _probe()]


def _probe():
    """_core.kernel_features(): [(name, since, use, required, errno, error)]."""
    from . import _core  # after the platform test: on another system the extension cannot load

    return _core.kernel_features()
