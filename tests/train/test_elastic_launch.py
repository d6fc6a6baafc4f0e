"""``gossipgrad train --elastic``: one worker is SIGKILLed mid-run, the others go on, its agent
restarts it and it joins back from a live peer; flags it does not take answer in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from gossipgrad import checkpoint
from gossipgrad.train.config import load_config
from gossipgrad.train.elastic_launch import RUN, _resume_path

_COMMAND = [sys.executable, "-m", "gossipgrad.train.cli", "train", "--elastic", "--algo", "gossip"]


def _run(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
        "GOSSIPGRAD_TEST_DIE_FLAG": str(tmp_path / "died"),
    }
    return subprocess.run(
        [*_COMMAND, "--out", str(tmp_path / "out"), "--timeout-s", "20", *flags],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )


def test_a_killed_worker_is_restarted_and_joins_while_the_others_go_on(tmp_path: Path) -> None:
    """The worker killed at its 20th step is restarted and joins back; a checkpoint is written
    every 25 steps all along (by 2 ranks after the kill); ``--resume auto`` on 2 ranks then
    continues from the newest one."""
    done = _run(tmp_path, "--nproc", "3", "--max-restarts", "1", "--max-steps", "250",
                "--model", "_dies_once:build", "--checkpoint-every", "25",
                "--keep-checkpoints", "20")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "died").exists(), "no worker was killed: the test proves nothing"
    run = tmp_path / "out" / "gossip-elastic"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 250 and summary["world_size"] == 3, summary
    sizes = [change["world_size"] for change in summary["changes"]]
    assert sizes[:1] == [2] and 3 in sizes, summary["changes"]  # left, then joined back
    assert summary["accuracy"] > 0.5, summary
    saved = checkpoint.list_checkpoints(run / "checkpoints")
    assert [checkpoint.step_of(path) for path in saved] == list(range(25, 250, 25))
    assert 2 in {checkpoint.saved_world_size(path) for path in saved}  # written after the kill
    again = _run(tmp_path, "--nproc", "2", "--max-steps", "260", "--model", "_dies_once:build",
                 "--checkpoint-every", "25", "--resume", "auto")  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == str(saved[-1]) and summary["steps"] == 260, summary
    assert summary["world_size"] == 2 and summary["accuracy"] > 0.5, summary


def test_flags_it_does_not_take_answer_in_one_line(tmp_path: Path) -> None:
    done = _run(tmp_path, "--resume", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert done.stderr.startswith(f"gossipgrad: error: --resume {tmp_path / 'nowhere'}: no such")
    done = _run(tmp_path, "--schedule", "hypercube")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "gossipgrad: error: --elastic does not take --schedule hypercube (a power of two only)"
    )


def test_resume_finds_the_newest_intact_checkpoint(tmp_path: Path) -> None:
    """``--resume auto``, a run folder, a checkpoints folder, a ``step_*`` folder: the newest
    intact checkpoint (a damaged newer one is passed over); None when there is none yet."""
    folder = tmp_path / "out" / RUN / "checkpoints"
    for step in (10, 20, 30):
        checkpoint.save(folder, step, {"w": torch.full((2,), float(step))}, keep=5)
    (folder / "step_00000030" / "rank0.json").write_text("{}")  # damaged: its hash is wrong

    def found(resume: str) -> Path | None:
        return _resume_path(load_config(["--resume", resume]), folder)

    newest = folder / "step_00000020"
    assert found("auto") == newest
    assert found(str(tmp_path / "out")) == newest
    assert found(str(folder)) == newest
    assert found(str(folder / "step_00000010")) == folder / "step_00000010"
    assert _resume_path(load_config(["--resume", "auto"]), tmp_path / "empty") is None
