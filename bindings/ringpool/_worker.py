"""The first code a ringpool exec-mode worker runs (see ringpool.popen).

Does what the stdlib's ``spawn._main`` does, reading from the worker's ringpool channel instead
of a pipe: preparation data first (sys.path, cwd, the parent's ``__main__``, name, authkey), then
the process object, then ``_bootstrap`` with a pidfd of the parent as the parent sentinel.
"""
import io
import os
import sys


def main():
    from multiprocessing import process, spawn
    from multiprocessing import reduction

    from . import _core
    from .popen import CHANNEL_FDS

    chan = _core.Channel.attach(*CHANNEL_FDS)
    frame = chan.get(60.0)
    if frame is None:
        sys.stderr.write("ringpool worker: no process object arrived from the parent\n")
        os._exit(255)
    stream = io.BytesIO(frame)
    prep_data = reduction.pickle.load(stream)
    if prep_data.get("start_method") == "ringpool":
        from .context import register_start_method

        register_start_method()
    process.current_process()._inheriting = True
    try:
        spawn.prepare(prep_data)
        self = reduction.pickle.load(stream)
    finally:
        del process.current_process()._inheriting
    try:
        parent_sentinel = os.pidfd_open(os.getppid())
    except OSError:
        parent_sentinel = None
    exitcode = self._bootstrap(parent_sentinel=parent_sentinel)
    os._exit(exitcode)
