"""``python -m ringpool COMMAND``: ringpool's command-line tools.

Each command is a module that exposes ``add_arguments(parser)`` and ``main(args) -> int`` (the exit
code) and keeps its heavy imports inside ``main``, so ``--help`` stays instant. Commands:

- ``info``: versions, the kernel features ringpool relies on and whether they are present, THP
  mode, limits, the start-method name, ``RINGPOOL_*`` variables (``ringpool.info``).
- ``stress``: a mixed load over queues, pipes, the Executor and DataLoader, with optional fault
  injection, ending with a throughput table and the invariants it checked (``ringpool.stress``).

- ``bench``: a short benchmark of queues, task pools and worker start-up against the stdlib, as a
  Markdown report, optionally JSON and a PNG chart (``ringpool.bench``).

``--version`` prints ringpool's version. Adding a command is one entry in
``_COMMANDS`` and one module. An installed ringpool also has the console script ``ringpool``.

Exit codes: whatever the command returns (0 = success); 2 for usage errors (argparse's).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# name -> (module, one-line help)
_COMMANDS = {
    "bench": ("ringpool.bench", "a short benchmark against the stdlib (queues, pools, start-up); --chart PNG"),
    "info": ("ringpool.info", "print versions, kernel features, limits and settings (for bug reports)"),
    "stress": ("ringpool.stress", "run a mixed load (optionally killing processes) and check invariants"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m ringpool", description="ringpool command-line tools.")
    parser.add_argument("--version", action="version", version=f"ringpool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in _COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or "").split("\n\n")[0])
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return int(args._module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
