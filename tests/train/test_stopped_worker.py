"""A stopped worker (issue 26, case 2): SIGSTOP one worker of `gossipgrad train` for longer than
``--timeout-s`` and the job ends within seconds of the timeout, its last line naming the stopped
rank. The peers name it: the job's own collectives are behind ``collectives.arrive``, and one
that gloo times out without naming a rank (DDP's all-reduce, the evaluation's) is followed by a
roll call in the job's store (``collectives.name_the_absent``). The launcher wakes a stopped
worker that it asked to end (``launch._wake_stopped_workers``) instead of waiting torch
elastic's 30 s grace.

Rank 1 stops itself through ``--model FILE:function`` (this file), at a chosen point, after
writing the time; or the test stops it from outside at a random moment, as an operator would.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch import nn

from gossipgrad.train.data import DatasetInfo
from gossipgrad.train.models import build_model

_SCRIPT = Path(sys.executable).with_name("gossipgrad")
_COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gossipgrad.train.cli"]
_TIMEOUT_S = 5
_FOLDER_ENV = "GOSSIPGRAD_TEST_STOP_FOLDER"  # where the workers note their pid and the stop


def _stopping_mlp(info: DatasetInfo, when: str) -> nn.Module:
    """gossipgrad's mlp whose rank 1 SIGSTOPs itself at its 5th training forward (``when`` is
    "training") or its first evaluation forward ("end": the end-of-run evaluation), after
    writing the time in ``stopped_at`` ("never": it writes ``training`` at its 3rd training
    forward instead); every worker writes its pid in ``pid_<rank>``."""
    mlp = build_model("mlp", info)
    folder = Path(os.environ.get(_FOLDER_ENV, "."))
    rank = os.environ.get("RANK")
    if rank is not None:
        (folder / f"pid_{rank}").write_text(str(os.getpid()))

    class Stopping(type(mlp)):  # type: ignore[misc]
        forwards = 0

        def forward(self, x):  # type: ignore[no-untyped-def]
            self.forwards += self.training
            due = self.forwards == 5 if when == "training" else not self.training
            if when == "never" and rank == "1" and self.forwards == 3:
                (folder / "training").write_text("")
            due = due and when != "never"
            if rank == "1" and due and not (folder / "stopped_at").exists():
                (folder / "stopped_at").write_text(repr(time.time()))
                os.kill(os.getpid(), signal.SIGSTOP)
            return super().forward(x)

    mlp.__class__ = Stopping
    return mlp


def stops_in_training(info: DatasetInfo) -> nn.Module:
    return _stopping_mlp(info, "training")


def stops_at_the_end(info: DatasetInfo) -> nn.Module:
    return _stopping_mlp(info, "end")


def never_stops(info: DatasetInfo) -> nn.Module:
    return _stopping_mlp(info, "never")


def _start(tmp_path: Path, model: str, extra: list[str]) -> subprocess.Popen[str]:
    argv = [*_COMMAND, "train", "--nproc", "2", "--dataset", "digits"]
    argv += ["--model", model, "--batch-size", "8", "--timeout-s", str(_TIMEOUT_S), "--quiet"]
    argv += ["--log-every", "1", "--out", str(tmp_path / "run"), *extra]
    env = {**os.environ, _FOLDER_ENV: str(tmp_path), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        argv, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _end(run: subprocess.Popen[str], folder: Path) -> tuple[str, float]:
    """The job's stderr and the time it ended; fails if a worker outlived it (killed then)."""
    try:
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    ended = time.time()
    left = [p.name for p in folder.glob("pid_*") if _alive(int(p.read_text()))]
    if left:
        os.killpg(run.pid, signal.SIGKILL)
    assert not left, f"workers left running after the job ended: {left}"
    return err, ended


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs or is stopped (not gone, not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _check(
    err: str, stopped_at: float, ended: float, status: int | None, algo: str = "gossip"
) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 1, err
    assert lines and lines[-1].startswith(f"gossipgrad: error: {algo} run failed: "), err
    named = re.search(r"\brank 1 did not (reach|answer)\b", lines[-1])
    assert named, f"the last line does not name rank 1 as the one that stopped: {lines[-1]}"
    assert "Timed out waiting" not in lines[-1], lines[-1]
    took = ended - stopped_at
    assert took < _TIMEOUT_S + 10, f"the job ended {took:.1f} s after rank 1 stopped"


@pytest.mark.parametrize(
    ("model", "algo"),
    [
        ("stops_in_training", "gossip"),  # rank 0 waits at the next metrics record (arrive)
        ("stops_at_the_end", "gossip"),  # rank 0 waits in the evaluation's all-reduce
        ("stops_in_training", "allreduce"),  # rank 0 waits in DDP's all-reduce
    ],
)
def test_a_stopped_worker_is_named_and_the_job_ends_soon_after_the_timeout(
    tmp_path: Path, model: str, algo: str
) -> None:
    extra = ["--max-steps", "8"] if model == "stops_at_the_end" else ["--epochs", "20"]
    run = _start(tmp_path, f"{__file__}:{model}", [*extra, "--algo", algo])
    err, ended = _end(run, tmp_path)
    stopped = tmp_path / "stopped_at"
    assert stopped.is_file(), f"rank 1 never stopped: {err}"
    _check(err, float(stopped.read_text()), ended, run.returncode, algo)


def test_a_worker_stopped_from_outside_at_any_moment_is_named(tmp_path: Path) -> None:
    run = _start(tmp_path, f"{__file__}:never_stops", ["--epochs", "50", "--algo", "gossip"])
    deadline = time.monotonic() + 120
    while not (tmp_path / "training").exists() and run.poll() is None:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)
    time.sleep(random.uniform(0.0, 1.0))  # anywhere in a step, or between steps
    stopped_at = time.time()
    os.kill(int((tmp_path / "pid_1").read_text()), signal.SIGSTOP)
    err, ended = _end(run, tmp_path)
    _check(err, stopped_at, ended, run.returncode)
