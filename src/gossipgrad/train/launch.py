"""``gossipgrad train`` after its options are parsed: checks, the run folder's lock, the local
workers, the comparison.

``train_command(cfg)`` checks everything that can be checked before a worker starts (exit 2 with
one line: the dataset and model, the schedule against ``--nproc``, ``--device cuda`` without a
GPU, what ``--resume`` names, flags that a resumed run cannot change), locks the run folder (a
second run on the same ``--out`` exits 2 at once), then starts ``--nproc`` worker processes per
algorithm through torch's own launcher (``torch.distributed.launcher.api.elastic_launch``).

Everything listens on the loopback interface only: the rendezvous store and the workers' store
are bound to 127.0.0.1 and gloo to the loopback device. A failed run is reported in one line
naming the rank whose own code failed first (each worker records its failure in the rendezvous
store; a rank that only lost its connection to a failed peer records nothing there); SIGTERM
exits 143 and Ctrl-C 130, without worker tracebacks. The launcher's log folder is removed after a
successful run and named after a failed one.

A stopped worker (SIGSTOP, a debugger) does not hold the job: its peers name it within
``--timeout-s``, and when the launcher then ends the workers, the signal it sends (SIGTERM)
would stay pending on the stopped process until torch elastic's 30 s grace ended in a SIGKILL;
``_wake_stopped_workers`` sends it SIGCONT, so it ends at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from gossipgrad.train import failures, report, run_state
from gossipgrad.train.config import ConfigError, TrainConfig
from gossipgrad.train.data import load_dataset
from gossipgrad.train.lock import RunBusyError, run_lock
from gossipgrad.train.models import build_model, default_model
from gossipgrad.train.recipe import check_amp
from gossipgrad.train.worker import default_out, ignore_signals, worker


def train_command(cfg: TrainConfig) -> int:
    """Check, lock, run each algorithm of ``cfg`` on local workers, print the comparison;
    returns the exit status."""
    # The parent never computes with more than one thread: OpenMP threads alive at fork time
    # deadlock the forked workers' first parallel region (`--nproc 1` hung in a futex).
    torch.set_num_threads(1)
    out = Path(default_out(cfg))
    cfg = replace(cfg, out=str(out))
    problem = preflight(cfg)
    if problem:
        return _error(problem, 2)
    try:
        with run_lock(out):
            return _train_locked(cfg, out)
    except RunBusyError as error:
        return _error(str(error), 2)


def _train_locked(cfg: TrainConfig, out: Path) -> int:
    began = time.perf_counter()
    for algo in cfg.algos():
        try:
            launch(replace(cfg, algo=algo))
        except failures.RunFailed as error:
            return _error(f"{algo} run failed: {error}", 1)
        except (KeyboardInterrupt, SignalException) as error:
            # torch's handler would raise again on a second signal, even at exit
            ignore_signals(signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
            signum = getattr(error, "sigval", signal.SIGINT)
            how = "interrupted" if signum == signal.SIGINT else f"stopped by {signum.name}"
            hint = run_state.after_interrupt(cfg, algo)
            sys.stderr.write(f"gossipgrad: {how} during the {algo} run; see {out}; {hint}\n")
            return 128 + signum
    summary = report.write_report(out)
    print(f"\n{summary['table']}")
    training = sum(run["train_time_s"] for run in summary["runs"].values())
    print(
        f"\nrun folder {out} (report.png, summary.json, <algo>/model.pt, metrics.jsonl); "
        f"wall time {time.perf_counter() - began:.0f} s, of which training {training:.1f} s "
        "(the rest: starting workers, loading data, evaluating, writing)"
    )
    return 0


def _error(message: str, status: int) -> int:
    sys.stderr.write(f"gossipgrad: error: {message}\n")
    return status


# --- before any worker starts -------------------------------------------------------------------


def preflight(cfg: TrainConfig) -> str | None:
    """The first problem that can be found before any worker starts, as one line, or None.
    Builds the dataset and model once (forked workers also inherit what this imported)."""
    try:
        cfg.gossip_options()  # the engine's own checks, e.g. --wire-dtype int8 with --mode params
        model = _check_data_and_model(cfg)
        _check_device(cfg)
        _check_layout(cfg)
        for algo in cfg.algos():
            run_state.check_resume(cfg, algo, model)
    except (ConfigError, _Refused, run_state.ResumeError) as error:
        return str(error)
    return None


class _Refused(ValueError):
    """A check before launch failed; the message is the one line to print."""


def _check_data_and_model(cfg: TrainConfig) -> str:
    """The model's name (``auto`` resolved), once the dataset and the model could be built."""
    try:
        _, _, info = load_dataset(cfg.dataset, seed=cfg.seed)
    except ValueError as error:
        raise _Refused(f"--dataset {cfg.dataset}: {error}") from None
    model = default_model(info) if cfg.model == "auto" else cfg.model
    try:
        build_model(model, info)
    except ValueError as error:
        raise _Refused(f"--model {cfg.model}: {error}") from None
    return model


def _check_layout(cfg: TrainConfig) -> None:
    rpn, world = cfg.ranks_per_node, cfg.nproc
    if "hierarchical" in cfg.algos() and rpn and (rpn > world or world % rpn):
        divisors = [k for k in range(1, world + 1) if world % k == 0]
        raise _Refused(
            f"--ranks-per-node must divide --nproc {world} (one of {divisors}), got {rpn}"
        )


def _check_device(cfg: TrainConfig) -> None:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise _Refused("--device cuda: no CUDA device is available here; use --device cpu")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    try:
        check_amp(cfg.amp, torch.device("cuda" if cuda else "cpu"))
    except ValueError as error:
        raise _Refused(str(error)) from None


# --- the workers --------------------------------------------------------------------------------


def launch(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``gossipgrad.train.worker(cfg)`` on ``cfg.nproc`` local processes with torch's elastic
    launcher (restarting failed workers up to ``cfg.max_restarts`` times); return rank 0's
    result. Raises ``failures.RunFailed`` naming the rank that failed first."""
    start_method = "fork" if sys.platform == "linux" else "spawn"
    if start_method == "fork":
        _preload(cfg)
    env = {
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # workers host their own store, on loopback
        # c10d's warnings carry C++ stack traces (a store client whose host died): the one-line
        # error says what happened; TORCH_CPP_LOG_LEVEL=INFO brings them back
        "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"),
        "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc))
        ),
    }
    loopback = _loopback_interface()
    if loopback is not None and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = loopback
    logs = tempfile.mkdtemp(prefix="gossipgrad-logs-")
    with loopback_store(cfg.timeout_s) as (store, port):
        env[failures.STORE_ENV] = f"127.0.0.1:{port}"
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=cfg.nproc,
            rdzv_backend="c10d",
            rdzv_endpoint=f"127.0.0.1:{port}",
            rdzv_configs={"is_host": False},  # the store above is the host
            run_id=f"gossipgrad-{uuid.uuid4().hex[:8]}",
            max_restarts=cfg.max_restarts,
            start_method=start_method,
            local_addr="127.0.0.1",
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        with _environment(env), _quiet_launcher(), _wake_stopped_workers():
            try:
                results = elastic_launch(config, worker)(cfg, False)
            except ChildFailedError as error:
                raise failures.RunFailed(
                    failures.describe(error, store, cfg.max_restarts)
                ) from None
    shutil.rmtree(logs, ignore_errors=True)  # kept when the run failed: its error files are there
    return results[0]


# The signals that end a worker (the launcher's, torch elastic's), by their bit in the pending
# masks of /proc/PID/status (bit n - 1 for signal n)
_ENDING = sum(1 << (s - 1) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT))


@contextlib.contextmanager
def _wake_stopped_workers(period_s: float = 0.25) -> Iterator[None]:
    """While inside, a thread sends SIGCONT to every child of this process (the workers) that is
    stopped with a signal pending that ends it, so that it ends now rather than when torch
    elastic's grace period runs out (Linux: /proc; elsewhere nothing is done)."""
    if not Path("/proc/self/task").is_dir():
        yield
        return
    done = threading.Event()
    watch = threading.Thread(
        target=_wake_loop, args=(done, period_s), name="gossipgrad-wake-stopped", daemon=True
    )
    watch.start()
    try:
        yield
    finally:
        done.set()
        watch.join()


def _wake_loop(done: threading.Event, period_s: float) -> None:
    me = os.getpid()
    while not done.wait(period_s):
        for pid in _stopped_children(me):
            if _ending_signal_pending(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGCONT)


def _stopped_children(parent: int) -> list[int]:
    """The children of ``parent`` in state T (stopped): from /proc/PID/task/*/children where the
    kernel has it, else from every /proc/*/stat."""
    listed = list(Path(f"/proc/{parent}/task").glob("*/children"))
    if listed:
        pids = []
        for children in listed:
            with contextlib.suppress(OSError, ValueError):
                pids += [int(pid) for pid in children.read_text().split()]
    else:
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if _state_and_parent(pid) == ("T", parent)]


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` of ``pid`` from /proc/PID/stat, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state, parent = stat[stat.rindex(")") + 2 :].split()[:2]  # the name may hold ")"
        return state, int(parent)
    except (OSError, ValueError):
        return None


def _ending_signal_pending(pid: int) -> bool:
    """Whether SIGTERM, SIGINT, SIGHUP or SIGQUIT is pending on process ``pid``."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    pending = 0
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("SigPnd", "ShdPnd"):
            with contextlib.suppress(ValueError):
                pending |= int(value.strip(), 16)
    return bool(pending & _ENDING)


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """The elastic launcher logs every failed worker's traceback and every signal it forwards;
    ``train_command`` reports the root cause in a line instead (the full traceback stays in the
    worker's error file)."""
    names = (
        "torch.distributed.elastic.multiprocessing.api",
        "torch.distributed.elastic.agent.server.api",
        "torch.multiprocessing.spawn",
    )
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
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
def loopback_store(timeout_s: float) -> Iterator[tuple[dist.TCPStore, int]]:
    """A TCPStore for the rendezvous on a free port of 127.0.0.1, and its port (a TCPStore binds
    every interface unless handed a socket that is already bound)."""
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
        yield store, port
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
