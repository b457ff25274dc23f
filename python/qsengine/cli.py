"""The ``qsengine`` command line.

Each sub-command lives beside the API it drives and registers itself through a
``add_parser(subparsers)`` function listed in ``_COMMANDS``; this file only
dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (module, function) pairs; each function adds one or more sub-commands.
_COMMANDS: list[tuple[str, str]] = [
    ("qsengine.specs.cli", "add_parser"),  # list, show
    ("qsengine.study", "add_parser"),  # study, simulate
    ("qsengine.packing", "add_parser"),  # pack
    ("qsengine.study_routing", "add_parser"),  # route, routing-study
    ("qsengine.sweep_cli", "add_parser"),  # sweep, report
    ("qsengine.validation.cli", "add_parser"),  # validate
]


def build_parser() -> argparse.ArgumentParser:
    from qsengine import __version__

    parser = argparse.ArgumentParser(
        prog="qsengine",
        description="MoE vs quality-matched dense decode serving simulator.",
    )
    parser.add_argument("--version", action="version", version=f"qsengine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, func in _COMMANDS:
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._argv = argv  # the command as given (a resume hint repeats it)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ValueError, TypeError) as exc:
        print(f"qsengine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qsengine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
