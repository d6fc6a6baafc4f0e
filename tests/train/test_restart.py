"""Elastic restart: a rank SIGKILLed mid-training is restarted by the launcher, the job resumes
from the last checkpoint, and it ends as accurate as a run that was never interrupted.

The fault comes from the model, through ``--model FILE:function`` (no hook in gossipgrad): a file
written here whose forward kills its own process on rank 1 at a given training step, in the first
attempt only. test_cli.py checks the resume mechanics with an exiting rank; this test adds a real
SIGKILL, the bound on the work lost, and the accuracy against an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
