"""The ``anomalib-moleflow`` command: its subcommands, argument errors and the one-line failure report.

    anomalib-moleflow continual --config mvtec_real [--data.root DIR] [--resume true]
    python -m anomalib_moleflow continual ...   # the same
    anomalib-moleflow add-product --model RUN --task cable        # a run learns another product
    anomalib-moleflow merge --base RUN0 --parts P1 P2 --output M  # experts trained apart (--run.only_task)

Each subcommand is a module of this package with ``HELP``, ``parser()`` and ``run(cfg) -> int``;
:data:`SUBCOMMANDS` lists them in the order ``--help`` shows.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Sequence
from types import ModuleType

from jsonargparse import ArgumentError, ArgumentParser

from anomalib_moleflow.cli import add_product, configs, continual, merge, predict
from anomalib_moleflow.continual.interruption import RunInterrupted

SUBCOMMANDS: dict[str, ModuleType] = {
    "continual": continual, "add-product": add_product, "merge": merge, "predict": predict, "configs": configs,
}
"""Subcommand name -> its module."""


def build_parser() -> ArgumentParser:
    """Top-level parser with its subcommands."""
    parser = ArgumentParser(prog="anomalib-moleflow", description="MoLE-Flow for anomalib.")
    subcommands = parser.add_subcommands(required=True)
    for name, module in SUBCOMMANDS.items():
        subcommands.add_subcommand(name, module.parser(), help=module.HELP)
    return parser


def error_line(exc: BaseException) -> str:
    """The one line a failure is reported with: its message, with the errno and the file of an OS error."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f" '{exc.filename}'" if exc.filename else ""
        text = f"{exc.strerror} ({name}) while writing or reading{where}"
        if exc.errno == errno.ENOSPC:
            text += "; the files written before are intact (every write is atomic): free space and resume with --resume true"
        return text
    return str(exc).replace("\n", " | ")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``anomalib-moleflow`` and ``python -m anomalib_moleflow``.

    Exit codes: 0 the command completed; 1 it failed (the message on stderr says what and where);
    2 bad command-line arguments; 128 + signal number when a signal stopped it (130 SIGINT,
    143 SIGTERM) after saving what finished.
    """
    parser = build_parser()
    args = list(argv) if argv is not None else sys.argv[1:]
    if not {"-h", "--help", "--print_config"} & set(args):
        parser.exit_on_error = False
        for action in parser._subcommands_action._name_parser_map.values():  # noqa: SLF001
            action.exit_on_error = False
    try:
        cfg = parser.parse_args(args)
    except ArgumentError as exc:  # one line naming the key or value, instead of usage and a traceback
        print(f"anomalib-moleflow: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    name = cfg.subcommand
    try:
        return SUBCOMMANDS[name].run(cfg[name])
    except RunInterrupted as exc:
        print(f"anomalib-moleflow {name}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (OSError, ValueError, RuntimeError) as exc:
        # bad data or settings, an occupied run folder, a checkpoint of another run or a changed one
        # (CheckpointError is a ValueError), a full disk, training that diverged: what and where
        print(f"anomalib-moleflow {name}: error: {error_line(exc)}", file=sys.stderr)
        return 1
