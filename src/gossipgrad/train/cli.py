"""The ``gossipgrad`` command.

    gossipgrad train                         # digits, 4 local workers, gossip then all-reduce
    gossipgrad train --algo gossip --nproc 8 --dataset pytext --epochs 1 --out runs/text
    gossipgrad train --config run.toml --lr 0.1 --resume auto
    gossipgrad train --help                  # every option with its default

``gossipgrad train`` starts ``--nproc`` worker processes on this machine through torch's own
launcher (``torch.distributed.launcher.api.elastic_launch``), once per algorithm, then prints a
side-by-side table and writes ``report.png`` and ``summary.json`` in the run folder. Everything
listens on the loopback interface only: the rendezvous store and the workers' store are bound to
127.0.0.1 and gloo to the loopback device. For several machines, run the same workers with
torchrun (see ``gossipgrad.train``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from gossipgrad import __version__
from gossipgrad.train import report
from gossipgrad.train.config import TrainConfig, load_config
from gossipgrad.train.data import load_dataset
from gossipgrad.train.models import build_model, default_model
from gossipgrad.train.worker import default_out, worker

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
        print(f"gossipgrad {__version__}")
        return 0
    if not args or args[0] != "train":
        given = f"unknown command {args[0]!r}" if args else "no command given"
        sys.stderr.write(f"gossipgrad: error: {given}; try 'gossipgrad train'\n")
        return 2
    cfg = load_config(args[1:])
    problem = _preflight(cfg)
    if problem:
        sys.stderr.write(f"gossipgrad: error: {problem}\n")
        return 2
    return train_command(cfg)


def _preflight(cfg: TrainConfig) -> str | None:
    """Build the dataset and model once here, so that a bad combination fails in one line before
    any worker starts (forked workers also inherit what this imported)."""
    try:
        _, _, info = load_dataset(cfg.dataset, seed=cfg.seed)
    except ValueError as error:
        return f"--dataset {cfg.dataset}: {error}"
    try:
        build_model(default_model(info) if cfg.model == "auto" else cfg.model, info)
    except ValueError as error:
        return f"--model {cfg.model}: {error}"
    return None


def train_command(cfg: TrainConfig) -> int:
    """Run each algorithm of ``cfg`` on local workers, then print the comparison."""
    out = Path(default_out(cfg))
    cfg = replace(cfg, out=str(out))
    began = time.perf_counter()
    for algo in cfg.algos():
        try:
            launch(replace(cfg, algo=algo))
        except ChildFailedError as error:
            sys.stderr.write(f"gossipgrad: error: {algo} run failed: {_first_failure(error)}\n")
            return 1
        except (KeyboardInterrupt, SignalException):
            sys.stderr.write(f"gossipgrad: interrupted during the {algo} run; see {out}\n")
            return 130
    summary = report.write_report(out)
    print(f"\n{summary['table']}")
    print(
        f"\nrun folder {out} (report.png, summary.json, <algo>/model.pt, metrics.jsonl); "
        f"total {time.perf_counter() - began:.0f} s"
    )
    return 0


def launch(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``gossipgrad.train.worker(cfg)`` on ``cfg.nproc`` local processes with torch's elastic
    launcher (restarting failed workers up to ``cfg.max_restarts`` times); return rank 0's
    result. The rendezvous listens on 127.0.0.1 only."""
    start_method = "fork" if sys.platform == "linux" else "spawn"
    if start_method == "fork":
        _preload(cfg)
    env = {
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # workers host their own store, on loopback
        "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc))
        ),
    }
    loopback = _loopback_interface()
    if loopback is not None and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = loopback
    with _loopback_store(cfg.timeout_s) as port, _environment(env), _quiet_worker_tracebacks():
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=cfg.nproc,
            rdzv_backend="c10d",
            rdzv_endpoint=f"127.0.0.1:{port}",
            rdzv_configs={"is_host": False},  # the store below is the host
            run_id=f"gossipgrad-{uuid.uuid4().hex[:8]}",
            max_restarts=cfg.max_restarts,
            start_method=start_method,
            local_addr="127.0.0.1",
            monitor_interval=0.1,
        )
        results = elastic_launch(config, worker)(cfg, False)
    return results[0]


@contextlib.contextmanager
def _quiet_worker_tracebacks() -> Iterator[None]:
    """The elastic launcher logs every failed worker's traceback; ``train_command`` reports the
    first one in a line instead (the full traceback stays in the worker's error file)."""
    logger = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _preload(cfg: TrainConfig) -> None:
    """Import once, here, the heavy modules every worker needs (forked workers inherit them):
    scikit-learn for digits, DDP's torch._dynamo, DCP, matplotlib for the report."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    if cfg.dataset == "digits":
        import sklearn.datasets  # noqa: F401
        import sklearn.model_selection  # noqa: F401


@contextlib.contextmanager
def _loopback_store(timeout_s: float) -> Iterator[int]:
    """A TCPStore for the rendezvous on a free port of 127.0.0.1 (a TCPStore binds every
    interface unless handed a socket that is already bound)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        is_master=True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=listener.detach(),
    )
    try:
        yield port
    finally:
        del store


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the workers, and restore the previous values after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _loopback_interface() -> str | None:
    names = (
        {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    )
    return next((name for name in ("lo", "lo0") if name in names), None)


def _first_failure(error: Any) -> str:
    """The root cause of a ChildFailedError, as one line (the worker's own exception)."""
    rank, failure = error.get_first_failure()
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message).strip().splitlines()
    detail = text[-1] if text else f"exit code {failure.exitcode}"
    return f"rank {rank}: {detail} (worker log: {failure.error_file})"


if __name__ == "__main__":
    sys.exit(main())
