"""The `python -m megakernel` command line: a registry of subcommands, imported lazily.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and
`main(args) -> int`. A registered module that is not installed is left out of the help, so
the help lists exactly the subcommands that exist. Add a subcommand with one COMMANDS line.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Optional

from . import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("megakernel.run_main",
            "decode with the megakernel on the GPU (on a CPU-only machine: the demo)"),
    "demo": ("megakernel.demo",
             "CPU interpreter vs the reference model on the `tiny` preset"),
    "plan": ("megakernel.scheduler.dump",
             "plan a decode step and print the instruction streams and the schedule"),
    "bench": ("megakernel.bench_cli",
              "time the megakernel against eager, CUDA-graph and compiled PyTorch (GPU)"),
    "trace": ("megakernel.trace_cli",
              "per-instruction timeline of one step: Perfetto trace, Gantt PNG, calibration"),
    "ablate": ("megakernel.ablate_cli",
               "time a grid of overlap-mechanism switches beside the cost model (GPU)"),
}


def available() -> dict[str, tuple[str, str]]:
    """The registered subcommands whose module can be found."""
    found = {}
    for name, (module, help_text) in COMMANDS.items():
        try:
            if importlib.util.find_spec(module) is not None:
                found[name] = (module, help_text)
        except ModuleNotFoundError:
            pass
    return found


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Every available subcommand; only the one named in argv is imported."""
    parser = argparse.ArgumentParser(
        prog="python -m megakernel",
        description="megakernel: a Llama decode step as one persistent CUDA kernel.")
    parser.add_argument("--version", action="version", version=f"megakernel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in argv:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_main=module.main)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[:1])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._main(args) or 0)
