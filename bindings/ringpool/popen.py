"""ringpool's Popen: how a ringpool Process is started, watched and signalled.

Both start modes go through the context's supervisor (``_core.Supervisor``, a Boost.Asio thread
that starts every process, so PR_SET_PDEATHSIG is tied to a thread that lives as long as the
process):
- zygote mode: the context's preloaded zygote forks the worker as a child of this process;
- exec mode: a fresh interpreter per worker, launched with exactly the descriptors listed.
Either way the worker receives its preparation data and the pickled process object as one frame
on its own ringpool channel, whose descriptors it inherits; descriptors that the process object's
reducers collect (``duplicate_for_child``) follow them.

    parent                                          worker
    Popen(process_obj)
      prep = spawn.get_preparation_data(name)
        + ringpool state (environ, torch settings)
      pickle process_obj, then prep (+ the packages
        the worker lacks, after those that pickling
        process_obj registered) under this popen ── fds collected
      channel.put(frame)
      supervisor.spawn(channel + collected fds,
                       our stdio) ──────────────────► (forked by the zygote, or exec'd)
      pid, sentinel (pidfd) set before start()        _worker.run(fd_base): attach channel, get
      returns                                         frame, prepare(prep), unpickle process_obj
      poll/wait: waitid(P_PIDFD)                      _bootstrap(parent pidfd) -> exit code
      terminate/kill: pidfd_send_signal               os._exit(code)
"""
from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import signal
import sys
import weakref
from multiprocessing import context as _mp_context
from multiprocessing import connection as _mp_connection
from multiprocessing import resource_tracker as _mp_resource_tracker
from multiprocessing import spawn as _mp_spawn
from multiprocessing import util as _mp_util

from . import _core
from . import _worker
from . import modules as _modules
from . import reduction as _reduction

__all__ = ["Popen"]

_log = logging.getLogger("ringpool.spawner")

# The bootstrap frame is small (prep data + process object); a larger one goes out of band.
_BOOT_CAPACITY = 1 << 16


class _InheritedFd:
    """A descriptor the worker inherits (the index-th one the process object carries)."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index

    def detach(self):
        return _worker.passed_fd(self.index)


def _stdio():
    """Our descriptors 0, 1, 2 as they are now (-1 where closed), for a zygote worker."""
    out = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            out.append(fd)
        except OSError:
            out.append(-1)
    return out


def _ringpool_state(context, sent):
    # The outermost ringpool process: a worker that starts workers passes its own root on (see
    # _worker._watch_root).
    state = {"root": _worker.root_pid() or os.getpid()}
    if context.zygote:
        # An exec'd worker gets the environment at exec; a forked one has the zygote's.
        state["environ"] = dict(os.environ)
    # Registered packages the worker does not have yet: a zygote worker inherits the snapshots the
    # zygote was started with, an exec'd one has none.
    snaps = _modules.snapshots()
    if snaps:
        have = context._zygote_modules if context.zygote else {}
        send = [s for s in snaps if have.get(s.name) != s.hash]
        if send:
            state["modules"] = [s.to_bytes() for s in send]
        sent.update({s.name: s.hash for s in snaps})
    if context.bundle is not None and not context._zygote_has_bundle:
        state["bundle"] = (context.bundle.path, context.bundle.data)  # installed before any unpickling
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        import torch.multiprocessing as tmp

        state["torch"] = {"sharing_strategy": tmp.get_sharing_strategy(), "num_threads": torch.get_num_threads()}
    return state


_live = weakref.WeakSet()  # running Popens: new versions of registered packages go to them


def _push_modules():
    """After a registry change: every running worker gets the packages whose hash it lacks, on
    its boot channel, before anything this process sends it afterwards (see _worker)."""
    if not _live:
        return
    snaps = _modules.snapshots()
    for p in list(_live):
        p._push_modules(snaps)


_modules.add_listener(_push_modules)


# A spawn whose zygote dies meanwhile is asked again of the zygote that replaces it, this many
# times in all.
_ZYGOTE_ATTEMPTS = 3


class Popen:
    """The ``Popen`` of ringpool's ``Process`` (the stdlib's popen protocol: ``poll``, ``wait``,
    ``terminate``, ``kill``, ``close``, ``sentinel``, ``pid``): made by ``Process.start()``, it asks
    the context's supervisor to fork the worker from the zygote (or exec it) and hands it the
    pickled process object with its file descriptors."""

    method = "ringpool"
    DupFd = _InheritedFd

    def __init__(self, process_obj, context):
        _mp_util._flush_std_streams()
        self.returncode = None
        self.finalizer = None
        self._fds = []
        self._child = None
        self._launch(process_obj, context)

    # -- the spawning-popen protocol used by reducers while the process object is pickled ----
    def duplicate_for_child(self, fd):
        """Collect ``fd`` to be sent to the child with its process object; returns its index there (``DupFd``)."""
        self._fds.append(fd)
        return len(self._fds) - 1

    def _launch(self, process_obj, context):
        # First: fixes what the zygote was started with. The context keeps this supervisor
        # (shutdown() does not drop it) until _spawn_done().
        supervisor = context._supervisor(spawning=True)
        try:
            self._launch_with(supervisor, process_obj, context)
        finally:
            context._spawn_done()

    def _launch_with(self, supervisor, process_obj, context):
        prep_data = _mp_spawn.get_preparation_data(process_obj._name)
        self._hashes = {}  # name -> hash of the registered packages the worker has
        self._unsent = collections.deque()  # module updates waiting for room on the boot ring
        head, body = io.BytesIO(), io.BytesIO()
        prev = _mp_context.get_spawning_popen()
        _mp_context.set_spawning_popen(self)
        try:
            # The process object first: pickling it may register a package loaded by hand
            # (reduction's by-reference path), which the packages computed next must include,
            # since the worker unpickles the object right after installing them.
            _reduction.dump(process_obj, body)  # the hybrid pickler: lambdas and __main__ by value
            modver = _modules.registry_version()
            prep_data["ringpool"] = _ringpool_state(context, self._hashes)
            prep_data["ringpool"]["daemon"] = bool(process_obj.daemon)  # see _worker._watch_root
            # Our resource tracker, as spawn and forkserver children get it: what a worker
            # registers (a SharedMemory it attaches to, a named semaphore) is then unlinked when
            # this process's tracker ends, not when the worker exits.
            prep_data["ringpool"]["tracker"] = self.duplicate_for_child(_mp_resource_tracker.getfd())
            _reduction.dump(prep_data, head)
        finally:
            _mp_context.set_spawning_popen(prev)
        boot = head.getvalue() + body.getvalue()  # the worker reads prep data, then the object

        def boot_channel():
            chan = _core.Channel.create(_BOOT_CAPACITY)
            if chan.put(boot, 0, None, 0) is not None:  # an empty ring always has room
                raise RuntimeError("ringpool: could not queue the process object for the worker")
            return chan

        chan = boot_channel()
        fds = [*chan.handles(), *self._fds]
        if context.zygote:
            for attempt in range(_ZYGOTE_ATTEMPTS):
                try:
                    self._child = supervisor.spawn(fds, _stdio())
                    break
                except RuntimeError as exc:
                    # The zygote died while serving this request (killed, out of memory): the
                    # supervisor starts a new one, which can take the request again. Only if no
                    # process took the boot frame: a child the zygote forked just before dying
                    # (too late to report it) would run the target; taking the frame back first
                    # makes sure the target runs at most once.
                    if attempt + 1 == _ZYGOTE_ATTEMPTS or not str(exc).startswith("ringpool zygote (pid"):
                        raise
                    if chan.get(0.0) is None:
                        raise  # a child the zygote forked took it: it may be running the target
                    _log.warning("starting %s: %s; asking the zygote that replaces it", process_obj.name, exc)
                    chan = boot_channel()
                    fds = [*chan.handles(), *self._fds]
            context._log_zygote(supervisor)  # the zygote is ready now: a new one? what did it skip?
        else:
            exe = _mp_spawn.get_executable()
            argv = [exe, *_mp_util._args_from_interpreter_flags(), "-c", context._bootstrap("_worker")]
            env = [f"{k}={v}" for k, v in os.environ.items()]
            self._child = supervisor.spawn(fds, [-1, -1, -1], exe, argv, env, "")
        self._chan = chan  # the worker's channel; later frames (module updates) go here
        self.pid = self._child.pid
        self.sentinel = self._child.sentinel
        if _log.isEnabledFor(logging.DEBUG):
            have = context._zygote_modules if context.zygote else {}  # as _ringpool_state decided
            shipped = sorted(n for n, h in self._hashes.items() if have.get(n) != h)
            _log.debug("started %s (pid %d, %s)%s", process_obj.name, self.pid, "zygote" if context.zygote else "exec",
                       f" with packages {', '.join(shipped)}" if shipped else "")
        self.finalizer = _mp_util.Finalize(self, Popen._release, (self.__dict__,))
        _live.add(self)
        if _modules.registry_version() != modver:  # changed while we were starting it
            self._push_modules(_modules.snapshots())

    def _push_modules(self, snaps):
        chan = self._chan
        if chan is None or self.returncode is not None:
            return
        changed = [s for s in snaps if self._hashes.get(s.name) != s.hash]
        if changed:
            payload = pickle.dumps(("modules", [s.to_bytes() for s in changed]), protocol=5)
            self._unsent.append(chan.stage(payload, 0, None, 0) if self._unsent else chan.put(payload, 0, None, 0))
            for s in changed:
                self._hashes[s.name] = s.hash
            _log.debug("sent new sources of %s to pid %d", ", ".join(s.name for s in changed), self.pid)
        while self._unsent and (self._unsent[0] is None or chan.publish(self._unsent[0])):
            self._unsent.popleft()

    @staticmethod
    def _release(state):
        state["_child"] = None
        state["_chan"] = None
        state["_unsent"] = None

    # -- what BaseProcess uses ------------------------------------------------------------------
    def poll(self, flag=os.WNOHANG):
        """The exit code (negative: the killing signal), or None while running; ``flag=0`` waits."""
        if self.returncode is None and self._child is not None:
            rc = self._child.poll() if flag & os.WNOHANG else self._child.wait()
            if rc is not None:
                self.returncode = rc
                if rc != 0:
                    self._remove_torch_segments()
        return self.returncode

    def _remove_torch_segments(self):
        """A worker that ended abnormally (a signal, a non-zero status) may have died inside
        torch's share_memory_(), between creating /dev/shm/torch_<pid>_* and unlinking it: remove
        what it left. Only names nobody has open are removed (a write lease): a process that got
        the pid since and is inside that window itself has its file open, so it is left alone."""
        from . import _torch  # light (no torch import): only on an abnormal exit

        left = _torch.remove_left_segments(self.pid)
        if left:
            _log.debug("removed %d torch segment(s) left by pid %d: %s", len(left), self.pid, ", ".join(left))

    def wait(self, timeout=None):
        """Wait up to ``timeout`` seconds (None: forever) for the exit; the exit code, or None on timeout."""
        if self.returncode is None:
            if timeout is not None and not _mp_connection.wait([self.sentinel], timeout):
                return None
            return self.poll(0)
        return self.returncode

    def _send_signal(self, sig):
        if self.returncode is None and self._child is not None:
            self._child.send_signal(sig)

    def terminate(self):
        """Send SIGTERM through the worker's pidfd (nothing if it has exited)."""
        self._send_signal(signal.SIGTERM)

    def kill(self):
        """Send SIGKILL through the worker's pidfd (nothing if it has exited)."""
        self._send_signal(signal.SIGKILL)

    def close(self):
        """Release the worker's pidfd and sentinel (after it exited)."""
        if self.finalizer is not None:
            self.finalizer()
