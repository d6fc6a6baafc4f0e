"""The ``gossipgrad`` command.

    gossipgrad train                         # digits, 4 local workers, gossip then all-reduce
    gossipgrad train --algo gossip --nproc 8 --dataset pytext --epochs 1 --out runs/text
    gossipgrad train --config run.toml --lr 0.1 --resume auto
    gossipgrad train --help                  # every option with its default

``gossipgrad train`` starts ``--nproc`` worker processes on this machine, once per algorithm,
then prints a side-by-side table and writes ``report.png`` and ``summary.json`` in the run folder
(``gossipgrad.train.launch``). For several machines, run the same workers with torchrun (see
``gossipgrad.train.worker``).

This module imports neither torch nor the engines: ``--help``, ``--version`` and every option
error answer at once; torch is imported only once the options are known to be good.
"""

from __future__ import annotations

import os
import sys

from gossipgrad.train.config import ConfigError, TrainConfig, check_launch, load_config
from gossipgrad.train.files import describe

_USAGE = """usage: gossipgrad <command> [options]

commands:
  train    train a model data-parallel with gossip and/or all-reduce, and compare them
           (gossipgrad train --help lists every option)
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gossipgrad`` console script; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0
    if args and args[0] == "--version":
        print(f"gossipgrad {version()}")
        return 0
    if not args or args[0] != "train":
        given = f"unknown command {args[0]!r}" if args else "no command given"
        sys.stderr.write(f"gossipgrad: error: {given}; try 'gossipgrad train'\n")
        return 2
    # c10d logs a store client's broken connection with a C++ stack trace; the one-line error
    # says what happened (TORCH_CPP_LOG_LEVEL=INFO brings them back). torch reads this once, when
    # it is first imported: before the options (a --model plugin imports torch), unless the
    # package's __init__ imported it already.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    return run(load_config(args[1:]))


def run(cfg: TrainConfig) -> int:
    """``gossipgrad train`` with validated options: checks, then the workers. The one place
    where an ``OSError`` about a file (a run folder that cannot be used: ``--out`` names a file,
    a read-only file system, a name too long, a link planted in it) becomes one line naming the
    path and why, exit 2."""
    try:
        check_launch(cfg)
    except ConfigError as error:
        return _error(str(error))
    try:
        if cfg.elastic:
            from gossipgrad.train.elastic_launch import elastic_command  # imports torch

            return elastic_command(cfg)
        from gossipgrad.train.launch import train_command  # imports torch

        return train_command(cfg)
    except OSError as error:
        return _error(describe(error, cfg.out or "runs"))


def _error(message: str) -> int:
    sys.stderr.write(f"gossipgrad: error: {message}\n")
    return 2


def version() -> str:
    """The installed package's version, read without importing the package's modules."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("gossipgrad")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        from gossipgrad import __version__

        return __version__


if __name__ == "__main__":
    sys.exit(main())
