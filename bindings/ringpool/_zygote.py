"""The zygote: one preloaded Python process per ringpool context that forks workers.

Started by the context's supervisor (``python -c "...; from ringpool._zygote import main; main()"``)
with its control socket at descriptor 3. It reads its configuration (sys.path, preload), imports
the preload modules (or, in the automatic mode, the parent's: ``_auto_preload``), says READY (or
why not), and enters the C++ fork loop
(``_core.zygote_serve``). That call returns None in the zygote when the parent tells it to stop,
and ``(fd_base, nfds)`` in each forked worker, which then runs ``ringpool._worker.run``. The
worker is a child of the parent process (docs/design/spawner.md), not of the zygote.
"""
import gc
import importlib
import json
import os
import pickle
import sys
import time
import traceback

from . import _core
from . import modules
from ._pool_worker import undumpable
from ._worker import run
from .bundle import _install_environment

CONTROL_FD = 3


# What every worker imports after its fork: imported once here instead. In a worker each of these
# cost milliseconds of CPU (a sys.path search, and a compile where no .pyc was written: the
# zygote runs with -B), on the path from start() to the target's first line.
_WORKER_MODULES = ("ringpool._worker", "ringpool._pool_worker", "ringpool.popen", "ringpool._torch",
                   "multiprocessing.spawn", "multiprocessing.synchronize")


def _import_worker_modules():
    for name in _WORKER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # (multiprocessing.synchronize without sem_open): the worker reports it
            pass


def _check_threads(core, after, advice):
    threads = core.thread_count()
    if threads != 1:
        raise RuntimeError(
            f"after {after} the zygote runs {threads} threads; a process with threads cannot be forked "
            f"safely ({advice}, or use get_context(zygote=False))")


# The automatic preload excludes a module whose import leaves a thread running, and starts over;
# after this many such restarts it starts over with no automatic preload at all (each restart
# repeats the imports done so far: a bound on the zygote's start time, not a likely case).
_AUTO_RESTARTS = 3
# A thread an import started may end this soon (a short-lived helper) before the import counts as
# one that leaves a thread running.
_THREAD_GRACE = 0.1


def _threads_end(core, within):
    deadline = time.monotonic() + within
    while core.thread_count() != 1:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _auto_preload(core, config):
    """The automatic preload: the parent's modules (``context._preloadable_modules``), one at a
    time in the parent's import order, so a package's import brings in most of its submodules and
    the rest are found in sys.modules (nothing is imported twice).

    A module that fails to import is skipped. A module whose import leaves a thread running makes
    this process unable to fork safely, and a thread cannot be undone: the zygote starts over
    (``_start_over``, an exec of itself) without that module and what its import brought in (one
    of them started the thread). Returns the note for the parent's log (JSON, or "" if nothing
    was skipped).
    """
    exclude = set(config.get("auto_exclude", ()))
    threads = list(config.get("auto_threads", ()))  # (name, modules it brought in), restarts so far
    skipped, failed = [], set()
    for name in config.get("auto_preload") or ():
        if name in sys.modules or _within(name, exclude) or _within(name, failed):
            continue  # (a submodule of a failed or excluded package would import the package again)
        before = set(sys.modules)
        try:
            importlib.import_module(name)
        except (Exception, SystemExit) as e:  # a module that exits on import is skipped too
            lines = traceback.format_exception_only(type(e), e)
            skipped.append((name, lines[-1].strip() if lines else type(e).__name__))
            failed.add(name)
        if core.thread_count() != 1 and not _threads_end(core, _THREAD_GRACE):
            brought = (set(sys.modules) - before) - {name}
            _start_over(config, exclude | brought | {name}, [*threads, (name, len(brought))])
    if not (skipped or threads or config.get("auto_off")):
        return ""
    return json.dumps({"skipped": skipped, "threads": threads, "off": bool(config.get("auto_off"))})


def _within(name, packages):
    """name or one of its parent packages is in packages."""
    while True:
        if name in packages:
            return True
        name, dot, _ = name.rpartition(".")
        if not dot:
            return False


def _start_over(config, exclude, threads):
    """Exec this zygote again (same pid, so the parent's pidfd, control socket and ready timer
    stay valid, and PDEATHSIG stays set) with the configuration in an inherited memfd, whose
    number is the one argument after ``-c``. Does not return."""
    config = {**config, "auto_exclude": sorted(exclude), "auto_threads": threads}
    if len(threads) > _AUTO_RESTARTS:
        config["auto_preload"], config["auto_off"] = (), True
    fd = os.memfd_create("ringpool-zygote-config", 0)  # no MFD_CLOEXEC: the new image reads it
    with open(fd, "wb", closefd=False) as f:
        pickle.dump(config, f)
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(CONTROL_FD, True)
    sys.stdout.flush()
    sys.stderr.flush()
    argv = sys.orig_argv[:sys.orig_argv.index("-c") + 2]  # without the previous start over's fd
    os.execv(sys.executable, [*argv, str(fd)])


def _receive_config(core):
    if len(sys.argv) > 1:  # started over by _start_over
        fd = int(sys.argv[1])
        del sys.argv[1:]
        with open(fd, "rb") as f:  # closes it: no worker inherits it
            return pickle.load(f)
    return pickle.loads(core.zygote_receive_config(CONTROL_FD, 60.0))


# Set by _settle_torch_pool when it ran (the workers inherit the module, so tests can see it).
TORCH_POOL_SETTLED = False


def _settle_torch_pool():
    """Give torch's intra-op pthreadpool its one-thread size here, once, when torch runs one
    intra-op thread (``torch.get_num_threads() == 1``).

    That pool (caffe2's, used by NNPACK/QNNPACK/XNNPACK ops) is made on first use with one thread
    per core, whatever the intra-op setting. A forked child rebuilds it at the size it had in its
    parent. DataLoader calls ``torch.set_num_threads(1)`` first thing in every worker: without
    this, each worker makes the pool with a thread per core, spins the threads up and joins them
    again (3-8 ms of CPU, up to 13 ms of wall time before the first batch on the project VM). With
    one intra-op thread, one pool thread is the size the setting asks for; the call joins the
    threads it made, so the zygote stays single-threaded. With more intra-op threads nothing is
    done: the pool would keep threads, and a zygote with threads cannot fork.
    """
    global TORCH_POOL_SETTLED
    torch = sys.modules.get("torch")
    get, set_ = getattr(torch, "get_num_threads", None), getattr(torch, "set_num_threads", None)
    if get is None or set_ is None or get() != 1:
        return
    set_(1)
    TORCH_POOL_SETTLED = True


def _preload_main(main):
    """Import the parent's main module as ``__mp_main__``, as spawn does in each worker, once here.

    spawn.prepare in a worker then finds it in place and does not run it again. A main module that
    fails to import here is left to each worker, which reports the error as spawn would.
    """
    from multiprocessing import process, spawn

    saved = sys.modules.get("__main__")
    # As in a spawn child: a main module that starts processes at import (no ``if __name__ ==
    # "__main__"`` guard) gets the stdlib's RuntimeError here instead of starting them from the
    # zygote; each worker then imports it again and reports that error, as spawn would.
    process.current_process()._inheriting = True
    try:
        spawn.prepare(main)
    except Exception:
        sys.modules["__main__"] = saved
        sys.modules.pop("__mp_main__", None)
    finally:
        del process.current_process()._inheriting


def main():
    config = _receive_config(_core)
    if "sys_path" in config:  # a Python parent's; the C++ Pool's zygote keeps its own
        ringpool_dir = sys.path[0]
        sys.path[:] = list(config["sys_path"])
        if ringpool_dir not in sys.path:
            sys.path.append(ringpool_dir)
    ok, message, note = True, "", ""
    try:
        if config.get("modules") or config.get("packages"):
            # Registered packages (a Python parent's, as snapshot bytes; the C++ Pool's, as plain
            # name/root/files): importable, and preloadable, from memory.
            for data in config.get("modules") or ():
                modules.install(modules.Snapshot.from_bytes(data))
            for pkg in config.get("packages") or ():
                modules.install(modules.Snapshot(pkg["name"], pkg["root"], pkg["files"]))
        if config.get("bundle"):  # the context's bundle: the workers' environment, preloadable
            _install_environment(*config["bundle"])
        if config.get("bundle_file"):  # the C++ Pool's bundle, read here
            with open(config["bundle_file"], "rb") as f:
                _install_environment(config["bundle_file"], f.read())
        _import_worker_modules()
        for name in config["preload"]:
            importlib.import_module(name)
        if config.get("auto_preload") is not None:
            note = _auto_preload(_core, config)
        _check_threads(_core, f"preloading {list(config['preload'])}", "preload less")
        main = config.get("main")
        if main:
            _preload_main(main)
            _check_threads(_core, "importing the main module", "use preload_main=False")
        _settle_torch_pool()
        _check_threads(_core, "sizing torch's thread pool", "set OMP_NUM_THREADS")
        if config.get("undumpable"):
            # The C++ Pool's zygote (its workers are not trusted): no task can then ptrace it, or
            # write its memory, to tamper with the workers it forks later (security.md, "Same
            # user"). A Python parent's zygote stays dumpable, for debuggers (py-spy, gdb).
            undumpable()
    except BaseException:
        ok, message = False, traceback.format_exc()
    if ok:
        # What the preload built is shared copy-on-write with every worker: keep the collector
        # from touching (and so copying) those objects' pages in each worker. The workers never
        # unfreeze (the gc module's documented recipe for fork without exec): a collection there
        # would walk every preloaded object and copy its page.
        gc.collect()
        gc.freeze()
        # Then huge pages for that memory: each fork copies, and each worker's exit tears down,
        # one page-table entry per 2 MiB instead of 512 (docs/design/spawner.md).
        if os.environ.get("RINGPOOL_ZYGOTE_HUGEPAGES", "1") != "0":
            try:
                _core.zygote_use_huge_pages()
            except Exception:  # an optimization only: the zygote serves without it
                traceback.print_exc()
    _core.zygote_send_ready(CONTROL_FD, ok, message if not ok else note)
    if not ok:
        os._exit(1)
    started = _core.zygote_serve(CONTROL_FD)
    if started is None:
        os._exit(0)
    fd_base, _nfds = started
    # A forked worker must never unwind into the zygote's code or run its interpreter's exit
    # (atexit handlers, buffered output): whatever happens, it leaves through os._exit.
    code = 1
    try:
        run(fd_base)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
