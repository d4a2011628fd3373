"""ringpool's Popen: how a ringpool Process is started, watched and signalled.

Exec mode (this module, for now): a fresh interpreter per worker, launched by the C++ launcher
(``_core.ChildProcess``: clone3 + exec with exactly the descriptors listed, PR_SET_PDEATHSIG so
the worker dies with its parent, a pidfd as sentinel and signal target). The worker receives its
preparation data and the pickled process object as one frame on its own ringpool channel, whose
descriptors it inherits at fixed numbers; descriptors that the process object's reducers collect
(``duplicate_for_child``) are inherited right after them.

    parent                                         worker (python -c ringpool._worker.main())
    Popen(process_obj)
      prep = spawn.get_preparation_data(name)
      pickle prep, process_obj under this popen ─ fds collected
      channel.put(frame)
      ChildProcess.launch(fds = channel 3..6, collected 7..) ──► attach channel 3..6
      pid, sentinel (pidfd) set before start() returns          get frame; prepare(prep)
                                                                unpickle process_obj (DupFd -> 7+i)
      poll/wait: waitid(P_PIDFD)                                _bootstrap(parent pidfd) -> exit code
      terminate/kill: pidfd_send_signal                         os._exit(code)
"""
from __future__ import annotations

import io
import os
import signal
import sys
from multiprocessing import context as _mp_context
from multiprocessing import connection as _mp_connection
from multiprocessing import reduction as _mp_reduction
from multiprocessing import spawn as _mp_spawn
from multiprocessing import util as _mp_util

from . import _core

__all__ = ["Popen"]

# Descriptor numbers in the worker: its channel, then what the process object carries.
CHANNEL_FDS = (3, 4, 5, 6)
FIRST_PASSED_FD = 7

# The worker imports ringpool from where this process did (it may not be installed; spawn's
# sys.path fix-up only happens after the bootstrap code runs).
_BOOTSTRAP = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r}); "
              "from ringpool._worker import main; main()")

# The bootstrap frame is small (prep data + process object); a larger one goes out of band.
_BOOT_CAPACITY = 1 << 16


class _InheritedFd:
    """A descriptor the worker inherits at FIRST_PASSED_FD + index."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index

    def detach(self):
        return FIRST_PASSED_FD + self.index


class Popen:
    method = "ringpool"
    DupFd = _InheritedFd

    def __init__(self, process_obj):
        _mp_util._flush_std_streams()
        self.returncode = None
        self.finalizer = None
        self._fds = []
        self._child = None
        self._launch(process_obj)

    # -- the spawning-popen protocol used by reducers while the process object is pickled ----
    def duplicate_for_child(self, fd):
        self._fds.append(fd)
        return len(self._fds) - 1

    def _launch(self, process_obj):
        prep_data = _mp_spawn.get_preparation_data(process_obj._name)
        buf = io.BytesIO()
        prev = _mp_context.get_spawning_popen()
        _mp_context.set_spawning_popen(self)
        try:
            _mp_reduction.dump(prep_data, buf)
            _mp_reduction.dump(process_obj, buf)
        finally:
            _mp_context.set_spawning_popen(prev)
        chan = _core.Channel.create(_BOOT_CAPACITY)
        if chan.put(buf.getvalue(), 0, None, 0) is not None:  # an empty ring always has room
            raise RuntimeError("ringpool: could not queue the process object for the worker")
        fds = list(zip(chan.handles(), CHANNEL_FDS))
        fds += [(fd, FIRST_PASSED_FD + i) for i, fd in enumerate(self._fds)]
        exe = _mp_spawn.get_executable()
        argv = [exe, *_mp_util._args_from_interpreter_flags(), "-c", _BOOTSTRAP]
        env = [f"{k}={v}" for k, v in os.environ.items()]
        self._child = _core.ChildProcess.launch(exe, argv, env, fds, "", signal.SIGKILL)
        self._chan = chan  # the worker's channel; later frames (modules, shutdown) go here
        self.pid = self._child.pid
        self.sentinel = self._child.sentinel
        self.finalizer = _mp_util.Finalize(self, Popen._release, (self.__dict__,))

    @staticmethod
    def _release(state):
        state["_child"] = None
        state["_chan"] = None

    # -- what BaseProcess uses ------------------------------------------------------------------
    def poll(self, flag=os.WNOHANG):
        if self.returncode is None and self._child is not None:
            rc = self._child.poll() if flag & os.WNOHANG else self._child.wait()
            if rc is not None:
                self.returncode = rc
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            if timeout is not None and not _mp_connection.wait([self.sentinel], timeout):
                return None
            return self.poll(0)
        return self.returncode

    def _send_signal(self, sig):
        if self.returncode is None and self._child is not None:
            self._child.send_signal(sig)

    def terminate(self):
        self._send_signal(signal.SIGTERM)

    def kill(self):
        self._send_signal(signal.SIGKILL)

    def close(self):
        if self.finalizer is not None:
            self.finalizer()
