"""Resuming a run: on another number of ranks (the exact average of the saved replicas), with
changed flags (applied and recorded) or fixed ones (refused up front), and never over checkpoints
that cannot be used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sklearn.model_selection  # noqa: F401 - imported once here, the forked ranks inherit it
import torch
import torch._dynamo  # noqa: F401 - (DDP imports it on first use)
from _dist import run_world

from gossipgrad import checkpoint
from gossipgrad.train import cli, loop
from gossipgrad.train.config import TrainConfig
from gossipgrad.train.metrics import read_metrics

_BASE = {"algo": "gossip", "quiet": True, "log_every": 4, "consensus_every": 4, "epochs": 3}


def _cfg(out: str, **options) -> TrainConfig:
    return TrainConfig(out=out, **{**_BASE, **options}).validate()


def _train(rank: int, world: int, out: str, options: dict) -> dict:
    return loop.train(_cfg(out, **options), "gossip")


def _saved(rank: int, world: int, path: str) -> tuple[dict, list]:
    state = checkpoint.load(path)
    momentum = [s["momentum_buffer"] for _, s in sorted(state["optim"]["state"].items())]
    return state["model"], momentum


def _resume(rank: int, world: int, out: str, options: dict) -> dict:
    """Resume, note what the run starts from, then train to the end."""
    run = loop.TrainingLoop(_cfg(out, **options), "gossip")
    start = {
        "model": {k: v.clone() for k, v in run.module.state_dict().items()},
        "momentum": [
            run.optimizer.state[p]["momentum_buffer"].clone() for p in run.module.parameters()
        ],
        "lr": run.optimizer.param_groups[0]["lr"],
        "step": run.progress.step,
        "position": run.sampler.state_dict()["yielded"],
    }
    return {"start": start, "summary": run.run()}


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return (sum(t.double() for t in tensors) / len(tensors)).to(tensors[0].dtype)


def test_a_checkpoint_of_4_ranks_resumes_on_2_from_the_exact_average(tmp_path: Path) -> None:
    out = str(tmp_path)
    run_world(_train, 4, out, {"max_steps": 8, "checkpoint_every": 8})
    saved = run_world(_saved, 4, str(tmp_path / "gossip" / "checkpoints" / "step_00000008"))
    resumed = run_world(_resume, 2, out, {"max_steps": 20, "resume": "auto"})

    models, momenta = [m for m, _ in saved], [b for _, b in saved]
    assert not torch.equal(models[0]["1.weight"], models[1]["1.weight"])  # replicas differed
    for rank, result in enumerate(resumed):
        start = result["start"]
        for name in models[0]:
            average = _mean([m[name] for m in models])
            torch.testing.assert_close(start["model"][name], average, rtol=0, atol=1e-7)
        for i, buffer in enumerate(start["momentum"]):
            torch.testing.assert_close(buffer, _mean([b[i] for b in momenta]), rtol=0, atol=1e-7)
        assert start["step"] == 8, rank
        assert start["position"] == 8 * 32 * 4 // 2  # the samples the 4 ranks saw, re-sharded
    summary = resumed[0]["summary"]
    assert summary["steps"] == 20 and summary["world_size"] == 2
    assert summary["resumed_world_size"] == 4
    assert summary["resumed_from"].endswith("step_00000008")
    steps = [r["step"] for r in read_metrics(tmp_path / "gossip") if "loss" in r]
    assert steps == [4, 8, 12, 16, 20]  # the history carries on
    assert summary["test_accuracy"] > 0.5


def test_a_checkpoint_of_2_ranks_resumes_on_3(tmp_path: Path) -> None:
    out = str(tmp_path)
    run_world(_train, 2, out, {"max_steps": 8, "checkpoint_every": 8})
    summary = run_world(_train, 3, out, {"max_steps": 12, "resume": "auto"})[0]
    assert (summary["steps"], summary["world_size"], summary["resumed_world_size"]) == (12, 3, 2)


def test_changed_flags_are_applied_and_recorded(tmp_path: Path) -> None:
    out = str(tmp_path)
    run_world(_train, 2, out, {"max_steps": 8, "checkpoint_every": 8})
    options = {"max_steps": 12, "resume": "auto", "lr": 0.5, "log_every": 2}
    resumed = run_world(_resume, 2, out, options)
    assert resumed[0]["start"]["lr"] == 0.5  # not the checkpoint's 0.05
    summary = resumed[0]["summary"]
    assert summary["config"]["lr"] == 0.5
    assert summary["resumed_changes"] == {
        "lr": [0.05, 0.5],
        "max_steps": [8, 12],
        "log_every": [4, 2],
        "checkpoint_every": [8, 0],
    }
    saved = json.loads((tmp_path / "gossip" / "summary.json").read_text())
    assert saved["resumed_changes"]["lr"] == [0.05, 0.5]


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--optimizer", "adam", "with optimizer 'sgd', but this run has optimizer 'adam'"),
        ("--seed", "3", "with seed 0, but this run has seed 3"),
        ("--model", "cnn", "with model 'mlp', but this run has model 'cnn'"),
    ],
)
def test_fixed_flags_are_refused_before_launch(tmp_path: Path, capsys, flag, value, said) -> None:
    run_world(_train, 2, str(tmp_path), {"max_steps": 4, "checkpoint_every": 4})
    argv = ["train", "--algo", "gossip", "--nproc", "2", "--quiet", "--resume", "auto"]
    assert cli.main([*argv, flag, value, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gossipgrad: error: checkpoint "), err
    old = said.split(" ")[2].strip("',")
    assert said in err and f"resume with {flag} {old}," in err and err.count("\n") == 1, err
    kept = checkpoint.list_checkpoints(tmp_path / "gossip" / "checkpoints")
    assert [p.name for p in kept] == ["step_00000004"]


def _damage(path: Path) -> None:
    data = next(path.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


def test_never_trains_from_step_0_over_checkpoints_it_cannot_use(tmp_path: Path) -> None:
    out = str(tmp_path)
    run_world(_train, 2, out, {"max_steps": 8, "checkpoint_every": 4})
    folder = tmp_path / "gossip" / "checkpoints"
    for path in checkpoint.list_checkpoints(folder):
        _damage(path)
    with pytest.raises(RuntimeError) as info:
        run_world(_train, 2, out, {"max_steps": 12, "resume": "auto"})
    message = str(info.value).splitlines()[0]
    assert "ResumeError: --resume: none of the 2 checkpoints" in message
    assert "step_00000008: checkpoint" in message and "step_00000004: checkpoint" in message
    assert "does not match its checksum" in message
    assert len(checkpoint.list_checkpoints(folder)) == 2  # nothing was rotated away


def test_checkpoints_without_manifest_are_named_before_launch(tmp_path: Path, capsys) -> None:
    run_world(_train, 2, str(tmp_path), {"max_steps": 8, "checkpoint_every": 4})
    for path in checkpoint.list_checkpoints(tmp_path / "gossip" / "checkpoints"):
        (path / checkpoint.MANIFEST).unlink()
    argv = ["train", "--algo", "gossip", "--nproc", "2", "--quiet", "--resume", "auto"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 checkpoints" in err and err.count("has no manifest.json") == 2, err


def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(
    tmp_path: Path, capfd
) -> None:
    out = str(tmp_path)
    run_world(_train, 2, out, {"max_steps": 8, "checkpoint_every": 4})
    folder = tmp_path / "gossip" / "checkpoints"
    _damage(folder / "step_00000008")
    (folder / ".tmp-step_00000012").mkdir()  # what an interrupted save left
    summary = run_world(_train, 2, out, {"max_steps": 12, "resume": "auto"})[0]
    assert summary["resumed_from"].endswith("step_00000004") and summary["steps"] == 12
    assert summary["resume_skipped"] == [str(folder / "step_00000008")]
    err = capfd.readouterr().err
    assert f"gossipgrad: warning: skipped checkpoint '{folder / 'step_00000008'}': " in err
    assert not (folder / ".tmp-step_00000012").exists()  # removed at the start of the run
