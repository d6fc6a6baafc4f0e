"""Restarting: a rank SIGKILLed mid-training is restarted by the launcher, the job resumes from
the last checkpoint, and it ends as accurate as a run that was never interrupted; a run stopped
by Ctrl-C says what it can be continued from (or how to have a checkpoint next time); a run that
fills the disk says so, keeps its earlier checkpoints, and continues once space is freed.

The fault comes from the model, through ``--model FILE:function`` (no hook in gossipgrad): a file
written here whose forward kills its own process on rank 1 at a given training step, in the first
attempt only. test_cli.py checks the resume mechanics with an exiting rank; this test adds a real
SIGKILL, the bound on the work lost, and the accuracy against an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gossipgrad import checkpoint
from gossipgrad.train import cli
from gossipgrad.train.metrics import read_metrics

_EVERY = 10  # --checkpoint-every
_KILL_AT = 35  # rank 1's training step at which it is killed: 5 steps after a checkpoint

_MODEL = '''
import os
import signal
from pathlib import Path

import torch

from gossipgrad.train.models import build_model

KILL_AT = {kill_at}


def model(info):
    """gossipgrad's mlp, whose rank 1 SIGKILLs itself at training step KILL_AT of the first
    attempt, after noting the step in killed_at."""
    mlp = build_model("mlp", info)

    class Killer(type(mlp)):
        steps = 0

        def forward(self, x):
            if self.training:
                self.steps += 1
                first = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
                if first and os.environ.get("RANK") == "1" and self.steps == KILL_AT:
                    (Path(__file__).parent / "killed_at").write_text(str(self.steps))
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().forward(x)

    mlp.__class__ = Killer
    return mlp
'''


def _train(folder: Path, kill_at: int) -> dict:
    folder.mkdir()
    source = folder / "faulty.py"
    source.write_text(_MODEL.format(kill_at=kill_at))
    argv = ["train", "--algo", "gossip", "--nproc", "2", "--epochs", "3", "--quiet"]
    argv += ["--model", f"{source}:model", "--log-every", "5", "--consensus-every", "5"]
    argv += ["--checkpoint-every", str(_EVERY), "--resume", "auto", "--max-restarts", "1"]
    assert cli.main([*argv, "--out", str(folder / "run")]) == 0
    return json.loads((folder / "run" / "gossip" / "summary.json").read_text())


def test_a_killed_rank_restarts_resumes_and_ends_as_accurate(tmp_path: Path) -> None:
    folders = [tmp_path / "straight", tmp_path / "killed"]
    straight = _train(folders[0], kill_at=0)  # 0: never killed
    killed = _train(folders[1], kill_at=_KILL_AT)

    assert not (tmp_path / "straight" / "killed_at").exists()
    killed_at = int((tmp_path / "killed" / "killed_at").read_text())
    assert killed_at == _KILL_AT  # the first attempt did die there, and the job still finished
    assert straight["resumed_from"] is None
    resumed_at = int(Path(killed["resumed_from"]).name.removeprefix("step_"))
    assert killed_at - _EVERY <= resumed_at < killed_at  # at most one checkpoint interval lost
    assert resumed_at == 30

    assert killed["steps"] == straight["steps"] == 3 * (1437 // 2 // 32)
    steps = [r["step"] for r in read_metrics(tmp_path / "killed" / "run" / "gossip")]
    assert steps == list(range(5, killed["steps"] + 1, 5))  # the history continues, no repeats
    assert abs(killed["test_accuracy"] - straight["test_accuracy"]) <= 0.015
    assert straight["test_accuracy"] > 0.8  # both actually learned
    # Resuming restores every state (model, optimizer, sampler, schedule, RNG), so the restarted
    # job even computes the same model, bit for bit.
    weights = [torch.load(f / "run" / "gossip" / "model.pt", weights_only=True) for f in folders]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


# --- Ctrl-C --------------------------------------------------------------------------------------

_SCRIPT = Path(sys.executable).with_name("gossipgrad")
_COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gossipgrad.train.cli"]
_TINY = ["--algo", "gossip", "--nproc", "2", "--dataset", "digits", "--model", "mlp"]
_TINY += ["--batch-size", "8", "--quiet"]


def _interrupted(out: Path, flags: list[str], ready: Path) -> str:
    """Start a long run, press Ctrl-C once ``ready`` exists, and return its standard error."""
    argv = [*_COMMAND, "train", *_TINY, "--epochs", "500", "--log-every", "1", *flags]
    run = subprocess.Popen(
        [*argv, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and run.poll() is None:
            assert time.monotonic() < deadline, "training did not get there"
            time.sleep(0.1)
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
        _, err = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130 and "Traceback" not in err, err
    return err


def test_ctrl_c_without_checkpoints_says_how_to_have_them(tmp_path: Path) -> None:
    """Issue 26, case 11: nothing is saved by default; the line says how to avoid that."""
    err = _interrupted(tmp_path, [], tmp_path / "gossip" / "metrics.jsonl")
    said = (
        f"gossipgrad: interrupted during the gossip run; see {tmp_path}; nothing was saved, as "
        "no --checkpoint-every was given: add --checkpoint-every N to write a checkpoint every "
        "N steps, which --resume auto continues from\n"
    )
    assert said in err, err


def test_ctrl_c_with_checkpoints_names_the_step_to_continue_from(tmp_path: Path) -> None:
    folder = tmp_path / "gossip" / "checkpoints"
    err = _interrupted(tmp_path, ["--checkpoint-every", "5"], folder / "step_00000010")
    found = re.search(r"; continue from step (\d+) with the same command and --resume auto", err)
    assert found and f"gossipgrad: interrupted during the gossip run; see {tmp_path}; " in err, err
    assert f"--resume auto --out {tmp_path}\n" in err, err
    newest = checkpoint.list_checkpoints(folder)[-1]
    assert int(found.group(1)) == checkpoint.step_of(newest) >= 10


# --- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root; tests/test_checkpoint.py emulates a full disk in-process)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mount -t tmpfs is not allowed here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_named_and_the_run_continues_once_space_is_freed(
    small_disk: Path, capsys
) -> None:
    """Issue 26, case 10: a checkpoint (about 340 KiB on tmpfs, the exchange in flight included)
    every 5 steps onto a disk with 450 KiB free: the first fits, the second fails on every rank
    (ENOSPC, or torch's "unexpected pos" of a short write), and the one line says the disk is
    full and how much is free. The first checkpoint is intact, and the run continues from it
    once space is freed."""
    filler = small_disk / "filler"
    filler.write_bytes(b"x" * (shutil.disk_usage(small_disk).free - (450 << 10)))
    out = small_disk / "run"
    argv = ["train", *_TINY, "--epochs", "1", "--max-steps", "20", "--checkpoint-every", "5"]
    assert cli.main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("gossipgrad: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    where = out / "gossip" / "checkpoints"
    assert f"cannot write checkpoint {str(where / 'step_00000010')!r}: the disk is full: " in err
    assert re.search(r"its file system has \d+\.\d KiB free, and the checkpoint needs about", err)
    assert [p.name for p in checkpoint.list_checkpoints(where, incomplete=True)] == [
        "step_00000005"
    ]
    assert checkpoint.validate(where / "step_00000005", any_world=True) is None  # intact
    filler.unlink()
    assert cli.main([*argv, "--resume", "auto", "--out", str(out)]) == 0
    summary = json.loads((out / "gossip" / "summary.json").read_text())
    assert summary["resumed_from"] == str(where / "step_00000005") and summary["steps"] == 20
