"""Which rank failed first, and why, in one line.

torch's elastic error summary picks the earliest failure by a timestamp of 1 s resolution, so
ties go to rank 0, which usually only lost its connection to the rank that really failed. So
each worker of ``gossipgrad train`` that fails reports to the launcher's store (its address is in
``GOSSIPGRAD_FAILURE_STORE``), with ``compare_set`` so that the first report of each kind wins:

- a failure of the rank's own code (its model raised, a checkpoint could not be written, its own
  parameters went non-finite) under ``own/<attempt>``;
- a rank that only lost a peer (``PeerError``, torch's ``DistError``, gloo's "Connection closed
  by peer", NaN received from a partner) under ``lost/<attempt>``, used when no rank's own code
  failed.

``describe`` turns the launcher's ``ChildFailedError`` into ``rank 1: ValueError: ... (worker
log: ...)`` from those reports; when no rank's own code failed, a rank killed by a signal (it
could report nothing) comes before the ranks that lost it, and torch's summary comes last.
"""

from __future__ import annotations

import os
import re
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException

from gossipgrad.errors import NonFiniteError, PeerError

STORE_ENV = "GOSSIPGRAD_FAILURE_STORE"
_KEY = "gossipgrad/failure/{kind}/{attempt}"
_LOST_PEER = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|connectFullMesh|Socket Timeout|"
    r"failed to recv|failed to send",
    re.IGNORECASE,
)


class RunFailed(RuntimeError):
    """A run of workers failed; the message names the rank that failed first and why."""


def one_line(error: BaseException) -> str:
    """``ValueError: the first line of its message`` (C++ errors append stack traces)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else "(no message)"
    return f"{type(error).__name__}: {text[:500]}"


def lost_a_peer(error: BaseException) -> bool:
    """Whether ``error`` only says that another rank went away or sent NaN."""
    if isinstance(error, (PeerError, dist.DistError)):
        return True
    if isinstance(error, NonFiniteError):
        return "received from rank" in str(error)
    return isinstance(error, RuntimeError) and bool(_LOST_PEER.search(str(error)))


def report(error: BaseException) -> None:
    """Record this rank's failure in the launcher's store, if there is one (first report of each
    kind wins); never raises."""
    address = os.environ.get(STORE_ENV)
    if not address or isinstance(error, SignalException):  # stopped from outside: not a cause
        return
    host, _, port = address.rpartition(":")
    kind = "lost" if lost_a_peer(error) else "own"
    key = _KEY.format(kind=kind, attempt=os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = os.environ.get("RANK", "0")
    try:
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=5))
        store.compare_set(key, "", f"{rank}\n{one_line(error)}")
    except Exception:  # noqa: BLE001, S110 - the launcher still has torch's own summary
        pass


def describe(error: Any, store: dist.Store, max_restarts: int) -> str:
    """One line for the launcher's ``ChildFailedError``: the rank whose own code failed first in
    the last attempt, else a rank killed by a signal, else the first rank that lost a peer, else
    torch's first failure."""
    attempt = _attempt(error, max_restarts)
    own, lost = (_reported(store, kind, attempt) for kind in ("own", "lost"))
    if own is not None:
        return f"rank {own[0]}: {own[1]}{_log_of(error, own[0])}"
    killed = sorted(r for r, f in error.failures.items() if (f.exitcode or 0) < 0)
    if killed:
        return f"rank {killed[0]}: killed by {_signal_name(-error.failures[killed[0]].exitcode)}"
    if lost is not None:
        return f"rank {lost[0]}: {lost[1]}{_log_of(error, lost[0])}"
    rank, failure = error.get_first_failure()
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = str(message).strip().splitlines()
    detail = lines[-1] if lines else f"exit code {failure.exitcode}"
    return f"rank {rank}: {detail}{_log_of(error, rank)}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _reported(store: dist.Store, kind: str, attempt: int) -> tuple[int, str] | None:
    key = _KEY.format(kind=kind, attempt=attempt)
    if not store.check([key]):
        return None
    rank, text = store.get(key).decode().split("\n", 1)
    return int(rank), text


def _attempt(error: Any, max_restarts: int) -> int:
    """The restart attempt that failed (its number is in the workers' log folders)."""
    for failure in error.failures.values():
        found = re.search(r"attempt_(\d+)", str(failure.error_file))
        if found:
            return int(found.group(1))
    return max_restarts


def _log_of(error: Any, rank: int) -> str:
    """`` (worker log: FILE)`` for ``rank``: its error file, also when the launcher stopped it
    before noting its failure (the files of one attempt are ``attempt_N/<local rank>/``)."""
    failure = error.failures.get(rank)
    if failure is not None:
        return f" (worker log: {failure.error_file})"
    for other in error.failures.values():
        guess = Path(other.error_file).parent.parent / str(rank) / "error.json"
        if guess.is_file():
            return f" (worker log: {guess})"
    return ""
