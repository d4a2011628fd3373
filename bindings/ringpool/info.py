"""``python -m ringpool info``: what ringpool finds on this system, to paste into a bug report.

Versions (ringpool, Python, and cloudpickle, numpy, torch, tqdm where installed: read from their
metadata, nothing imported), every kernel feature the runtime probes (``_platform.features()``:
required ones, and best-effort ones used where present), the transparent huge pages mode, the
limits that bound how many workers and handles a process can have, whether the start-method name
``"ringpool"`` resolves without a call (the .pth), and the ``RINGPOOL_*`` variables set.
``--json`` prints the same as one JSON object.

Exit code 0, or 1 when a required kernel feature is missing (the package import refuses then, so
only a caller that got this far with a partial system sees it: a seccomp filter added later).
"""
from __future__ import annotations

import json
import os
import sys

import ringpool

from . import _platform

_THP = "/sys/kernel/mm/transparent_hugepage/"
_PACKAGES = ("cloudpickle", "numpy", "torch", "tqdm")


def add_arguments(p):
    """The ``info`` command's options (``--json``)."""
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _version(dist):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _thp(name):
    """The selected value of a THP setting ("madvise"), or None where the kernel has no THP."""
    try:
        with open(_THP + name) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else text.strip()


def _limit(resource_module, name):
    soft, hard = resource_module.getrlimit(getattr(resource_module, name))
    unlimited = resource_module.RLIM_INFINITY
    return {"soft": None if soft == unlimited else soft, "hard": None if hard == unlimited else hard}


def _start_method():
    import multiprocessing
    import site

    folders = [*site.getsitepackages(), site.getusersitepackages()]
    pth = next((os.path.join(d, "ringpool-start-method.pth") for d in folders
                if os.path.isfile(os.path.join(d, "ringpool-start-method.pth"))), None)
    return {
        # The .pth imports _ringpool_start_method at interpreter start; ringpool itself does not.
        "pth_file": pth,
        "loaded_at_start": "_ringpool_start_method" in sys.modules,
        "registered": "ringpool" in multiprocessing.get_all_start_methods(),
    }


def collect():
    """Everything ``info`` prints, as a dict of plain data."""
    import platform
    import resource

    feats = _platform.features()
    return {
        "ringpool": {"version": ringpool.__version__, "path": os.path.dirname(ringpool.__file__)},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "packages": {name: _version(name) for name in _PACKAGES},
        "kernel": {"release": os.uname().release, "machine": os.uname().machine,
                   "minimum": _platform.MIN_LINUX},
        "features": [{"name": f.name, "since": f.since, "use": f.use, "required": f.required,
                      "present": not f.errno, "error": f.error or None} for f in feats],
        "transparent_hugepages": {"enabled": _thp("enabled"), "defrag": _thp("defrag")},
        # ringpool._core raises the soft descriptor limit to the hard one when it loads.
        "limits": {"RLIMIT_NOFILE": _limit(resource, "RLIMIT_NOFILE"),
                   "RLIMIT_NPROC": _limit(resource, "RLIMIT_NPROC")},
        "cpus": len(os.sched_getaffinity(0)),
        "start_method": _start_method(),
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RINGPOOL_")},
    }


def _text(info):
    def n(v):
        return "unlimited" if v is None else str(v)

    rp, py, k = info["ringpool"], info["python"], info["kernel"]
    lines = [f"ringpool {rp['version']} ({rp['path']})",
             f"Python {py['version']} ({py['implementation']}, {py['executable']})"]
    lines += [f"  {name} {ver or 'not installed'}" for name, ver in info["packages"].items()]
    lines.append(f"Linux {k['release']} ({k['machine']}); ringpool needs {k['minimum']} or later")
    for kind, required in (("required", True), ("used where present", False)):
        lines.append(f"kernel features, {kind}:")
        for f in info["features"]:
            if f["required"] == required:
                state = "yes" if f["present"] else f"NO ({f['error']})"
                lines.append(f"  {f['name']:<34} {state:<5} Linux {f['since']}: {f['use']}")
    thp = info["transparent_hugepages"]
    lines.append(f"transparent huge pages: enabled={thp['enabled'] or 'absent'}, defrag={thp['defrag'] or 'absent'}"
                 " (the zygote uses them when enabled is madvise or always)")
    for name, lim in info["limits"].items():
        lines.append(f"{name}: soft {n(lim['soft'])}, hard {n(lim['hard'])}")
    lines.append(f"CPUs usable: {info['cpus']}")
    sm = info["start_method"]
    lines.append(f"start method 'ringpool': {'registered' if sm['registered'] else 'not registered'}; "
                 f".pth {sm['pth_file'] or 'not installed (a checkout: call ringpool.register_start_method())'}"
                 f"{', loaded at start' if sm['loaded_at_start'] else ''}")
    env = info["environment"]
    lines.append("RINGPOOL_* variables: " + (", ".join(f"{k}={v}" for k, v in env.items()) or "none set"))
    return "\n".join(lines)


def main(args):
    """Print the report; exit code 1 if a required kernel feature is missing."""
    info = collect()
    print(json.dumps(info, indent=2) if args.json else _text(info), flush=True)
    return 1 if any(f["required"] and not f["present"] for f in info["features"]) else 0
