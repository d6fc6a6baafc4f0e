"""The training job: one process per rank, launched by ``gossipgrad train`` or by torchrun.

    gossipgrad train --algo both                       # 4 local workers, gossip then all-reduce
    python -m gossipgrad.train --algo gossip           # one worker (a world of one)
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m gossipgrad.train --algo gossip --out runs/big --resume auto

Each worker reads RANK / WORLD_SIZE / LOCAL_RANK from the environment. Under torch elastic
(torchrun, or the launcher of ``gossipgrad train``) the process group is built over the agent's
store with a ``PrefixStore`` per restart attempt, so restarted workers (``--max-restarts``) meet
afresh; with ``--resume auto`` they continue from the last checkpoint.

Each algorithm of ``--algo`` runs through ``gossipgrad.train.loop.TrainingLoop``, which writes
``<out>/<algo>/`` (``metrics.jsonl``, ``checkpoints/``, ``model.pt``, ``summary.json``); then
``<out>/report.png`` and ``<out>/summary.json`` compare the algorithms run. Run by itself (under
torchrun), rank 0 holds the run folder's lock (``gossipgrad.train.lock``) while it trains.

A failing worker reports its failure to ``gossipgrad train`` (``gossipgrad.train.failures``), and
never lets a ``BaseException`` that is not an ``Exception`` (torch's ``CheckpointException``)
escape ``@record``, which would drop its cause. Ctrl-C or SIGTERM ends a worker without a
traceback (``_stop_signals``); under torchrun, rank 0 says on Ctrl-C what the run can be
continued from, or how to have checkpoints next time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from gossipgrad.collectives import broadcast_object
from gossipgrad.train import failures, report, run_state
from gossipgrad.train.config import TrainConfig, load_config
from gossipgrad.train.files import describe
from gossipgrad.train.lock import RunBusyError, run_lock
from gossipgrad.train.loop import pick_device, train


def main(argv: list[str] | None = None) -> None:
    """``python -m gossipgrad.train [options]``: one worker (see the module docstring)."""
    cfg = load_config(sys.argv[1:] if argv is None else argv, prog="python -m gossipgrad.train")
    worker(cfg)


@record
def worker(cfg: TrainConfig, standalone: bool = True) -> dict[str, dict[str, Any]]:
    """One rank: join the process group and run each algorithm of ``cfg``; then, ``standalone``
    (not under ``gossipgrad train``, which does it itself), rank 0 writes the comparison report
    and prints the table. Returns ``{algo: summary}``."""
    try:
        with _stop_signals():
            return _work(cfg, standalone)
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # Ctrl-C: the launcher says so, once
    except (Exception, SystemExit):
        raise
    except BaseException as error:  # e.g. torch's CheckpointException: @record would drop it
        raise RuntimeError(failures.one_line(error)) from error


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """While training, SIGTERM and SIGHUP end the worker at once, as they end any process, and
    SIGINT raises ``KeyboardInterrupt`` once: a later SIGINT (Ctrl-C reaches the whole process
    group, and a launcher forwards it) is ignored, as it would raise again while the worker
    unwinds or while torch formats its error. A forked worker would otherwise inherit the
    launcher's handler, which raises for each signal, even inside an exception handler. The
    previous handlers come back when training ends without a Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():  # signals reach main only
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def interrupt(_signum: int, _frame: object) -> None:
        ignore_signals(signal.SIGINT)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is not _do_nothing:  # no Ctrl-C: not ending
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def ignore_signals(*signums: int) -> None:
    """Make ``signums`` do nothing from now on, with a Python handler that returns rather than
    SIG_IGN: Python raises OSError for a signal already pending when its handler becomes
    SIG_IGN."""
    for signum in signums:
        signal.signal(signum, _do_nothing)


def _do_nothing(_signum: int, _frame: object) -> None:
    return


def _work(cfg: TrainConfig, standalone: bool) -> dict[str, dict[str, Any]]:
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))
    device = pick_device(cfg)
    init_distributed("nccl" if device.type == "cuda" else "gloo", timedelta(seconds=cfg.timeout_s))
    try:
        cfg = replace(cfg, out=_shared_out(cfg))
        with _hold_run_folder(Path(cfg.out), standalone, timedelta(seconds=cfg.timeout_s)):
            results: dict[str, dict[str, Any]] = {}
            for algo in cfg.algos():
                with _say_if_interrupted(cfg, algo, standalone):
                    results[algo] = train(cfg, algo)
            if dist.get_rank() == 0 and standalone:
                summary = report.write_report(Path(cfg.out))
                print(f"\n{summary['table']}\n\nreport: {Path(cfg.out) / report.REPORT_IMAGE}")
    except BaseException as error:
        if not isinstance(error, (KeyboardInterrupt, SystemExit)):
            failures.report(error)  # first, before the launcher stops this process
        raise  # without destroying the group: a peer may be gone, and exiting frees it all
    dist.destroy_process_group()
    return results


@contextlib.contextmanager
def _say_if_interrupted(cfg: TrainConfig, algo: str, standalone: bool) -> Iterator[None]:
    """Standalone (under torchrun), rank 0 says on Ctrl-C what the run can be continued from, or
    how to have a checkpoint next time (``gossipgrad train``'s launcher says it itself)."""
    try:
        yield
    except KeyboardInterrupt:
        if standalone and dist.get_rank() == 0:
            hint = run_state.after_interrupt(cfg, algo)
            sys.stderr.write(f"gossipgrad: interrupted during the {algo} run; {hint}\n")
        raise


@contextlib.contextmanager
def _hold_run_folder(out: Path, standalone: bool, timeout: timedelta) -> Iterator[None]:
    """Standalone, rank 0 locks the run folder for the whole job; every rank learns whether it
    could, and why not in one line (under ``gossipgrad train`` the launcher holds the lock)."""
    with contextlib.ExitStack() as stack:
        busy = None
        if standalone and dist.get_rank() == 0:
            try:
                stack.enter_context(run_lock(out))
            except RunBusyError as error:
                busy = str(error)
            except OSError as error:  # an --out that cannot be used
                busy = describe(error, out)
        if standalone:
            busy = broadcast_object(busy, None, timeout, "the run folder's lock")
        if busy:
            raise RunBusyError(busy)
        yield


def init_distributed(backend: str, timeout: timedelta) -> None:
    """Initialise the default process group from the environment (no-op if already done)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # a plain `python -m gossipgrad.train`: a world of one
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by hand
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
        return
    # Under torch elastic: one key space per restart attempt, or restarted gloo workers would
    # find the previous attempt's keys and fail to connect.
    store = dist.PrefixStore(f"attempt_{attempt}", elastic_store(rank, world, timeout))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def elastic_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The store of torch elastic's workers: the agent's, or one that rank 0 hosts on
    MASTER_ADDR only."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or rank != 0:
        return dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    # Rank 0 hosts the store. TCPStore alone listens on every interface; a socket bound to
    # MASTER_ADDR keeps it there (the loopback address for `gossipgrad train`).
    listener = socket.create_server((addr, port))
    return dist.TCPStore(
        addr, port, world, is_master=True, timeout=timeout, master_listen_fd=listener.detach()
    )


def default_out(cfg: TrainConfig) -> str:
    """The run folder: ``--out``; with ``--resume auto`` and no ``--out``, the newest folder in
    ``runs/``; else a new ``runs/<date-time>``."""
    if cfg.out:
        return cfg.out
    runs = Path("runs")
    if cfg.resume == "auto" and runs.is_dir():
        earlier = sorted(p for p in runs.iterdir() if p.is_dir())
        if earlier:
            return str(earlier[-1])
    return str(runs / datetime.now().strftime("%Y%m%d-%H%M%S"))


def _shared_out(cfg: TrainConfig) -> str:
    """``default_out(cfg)`` as rank 0 sees it, for every rank."""
    timeout = timedelta(seconds=cfg.timeout_s)
    return broadcast_object(default_out(cfg), None, timeout, "the run folder's name")
