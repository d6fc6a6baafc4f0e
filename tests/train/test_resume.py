"""Resuming a run: bit for bit in every engine mode (through the real CLI), on another number of
ranks (the exact average of the saved replicas), with changed flags (applied and recorded; the
summary's figures count samples, so another --batch-size keeps them right) or fixed ones (refused
up front), never over checkpoints that cannot be used, and saying so when there is none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import sklearn.model_selection  # noqa: F401 - imported once here, the forked ranks inherit it
import torch
import torch._dynamo  # noqa: F401 - (DDP imports it on first use)
from _dist import run_world
from _manifest import rewrite_manifest

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


# --- through the real CLI -----------------------------------------------------------------------

_TINY = ["--algo", "gossip", "--nproc", "2", "--dataset", "digits", "--batch-size", "8"]
_TINY += ["--quiet", "--log-every", "5", "--consensus-every", "5"]

_MODEL = """
import math
import os

import torch.distributed as dist
from torch import nn

from gossipgrad.sampler import GossipShuffleSampler


def _report_speed(self, samples, seconds):
    # a deterministic speed: rank 1 computes at half rank 0's, so that --balance moves samples
    # the same way in every run (measured times would differ from run to run)
    self._shard.report_speed(samples, samples * (1 + dist.get_rank()) / 1000.0)


def model(info):
    \"\"\"An mlp with dropout (so the random generators matter), and deterministic speeds.\"\"\"
    if "RANK" in os.environ:  # in a worker only, not in the process that launches them
        GossipShuffleSampler.report_speed = _report_speed
    hidden = 64
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(info.input_shape), hidden), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(hidden, info.num_classes),
    )
"""


def _model_file(folder: Path) -> str:
    source = folder / "dropout_mlp.py"
    source.write_text(_MODEL)
    return f"{source}:model"


def _cli(out: Path, *flags: str) -> dict:
    assert cli.main(["train", *_TINY, *flags, "--out", str(out)]) == 0
    return json.loads((out / "gossip" / "summary.json").read_text())


def _assert_same_model(a: Path, b: Path) -> None:
    first, second = (torch.load(p / "gossip" / "model.pt", weights_only=True) for p in (a, b))
    assert first.keys() == second.keys()
    for name in first:
        difference = (first[name].double() - second[name].double()).abs().max().item()
        assert torch.equal(first[name], second[name]), f"{name} differs by {difference:.3g}"


def _folder(out: Path, step: int) -> Path:
    return out / "gossip" / "checkpoints" / checkpoint.checkpoint_name(step)


def test_a_tracking_run_stopped_at_40_and_resumed_to_60_equals_60_straight(tmp_path: Path) -> None:
    """Issue 26, case 1: the trackers and last gradients are in the checkpoint."""
    flags = ["--tracking", "--epochs", "1", "--checkpoint-every", "20"]
    _cli(tmp_path / "straight", *flags, "--max-steps", "60")
    _cli(tmp_path / "resumed", *flags, "--max-steps", "40")
    summary = _cli(tmp_path / "resumed", *flags, "--max-steps", "60", "--resume", "auto")
    assert summary["resumed_from"] == str(_folder(tmp_path / "resumed", 40))
    assert summary["steps"] == 60
    _assert_same_model(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.parametrize("mode", [[], ["--max-staleness", "2"], ["--tracking"]])
def test_taking_checkpoints_changes_nothing_in_the_run(tmp_path: Path, mode: list[str]) -> None:
    """The exchange in flight at a checkpoint is saved (waited for, not mixed), so a run with
    checkpoints equals the same run without them, bit for bit."""
    flags = ["--epochs", "1", "--max-steps", "30", *mode]
    _cli(tmp_path / "plain", *flags)
    _cli(tmp_path / "checkpointed", *flags, "--checkpoint-every", "7")
    _assert_same_model(tmp_path / "plain", tmp_path / "checkpointed")


_MODES = {
    "tracking": ["--tracking"],
    "max-staleness": ["--max-staleness", "2"],
    "gossip-every": ["--gossip-every", "3"],
    "average-every": ["--average-every", "7"],
    "wire-dtype": ["--wire-dtype", "int8"],
    "balance": ["--balance"],
}


@pytest.mark.parametrize("mode", list(_MODES))
def test_every_engine_mode_resumes_bit_for_bit(tmp_path: Path, mode: str) -> None:
    """100 steps straight against the same run resumed at step 50, across an epoch's end (the
    shuffle's exchange, --balance's new shard sizes), with dropout (the random generators). The
    resumed run starts from the straight run's checkpoint of step 50, which is what a run stopped
    there leaves (a checkpoint holds the state at its step, whatever comes after)."""
    flags = [*_MODES[mode], "--model", _model_file(tmp_path), "--epochs", "2"]
    flags += ["--checkpoint-every", "25", "--max-steps", "100"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _cli(straight, *flags)
    shutil.copytree(_folder(straight, 50), _folder(resumed, 50))
    summary = _cli(resumed, *flags, "--resume", "auto")
    assert summary["resumed_from"] == str(_folder(resumed, 50)) and summary["steps"] == 100
    _assert_same_model(straight, resumed)


def test_a_resume_with_another_batch_size_counts_samples_not_steps(tmp_path: Path) -> None:
    """Issue 26, case 9: 40 steps of 8, then the rest of the epoch in steps of 16."""
    _cli(tmp_path, "--epochs", "1", "--max-steps", "40", "--checkpoint-every", "40")
    summary = _cli(tmp_path, "--epochs", "1", "--batch-size", "16", "--resume", "auto")
    shard = 1437 // 2  # digits' 1437 training samples, the smaller shard of 2 ranks
    rest = (shard - 40 * 8) // 16  # whole batches of 16 left in the epoch
    assert summary["steps"] == 40 + rest == 64
    assert summary["epochs"] == 1.0
    samples = 2 * (40 * 8 + rest * 16)
    assert summary["samples_per_s"] * summary["train_time_s"] == pytest.approx(samples)


def test_a_checkpoint_nested_100000_deep_is_skipped_for_the_previous_one(
    tmp_path: Path, capfd
) -> None:
    """Issue 26, case 6: the newest rank0.json nested 100,000 deep, its manifest recomputed."""
    _cli(tmp_path, "--epochs", "1", "--max-steps", "8", "--checkpoint-every", "4")
    damaged = _folder(tmp_path, 8)
    (damaged / "rank0.json").write_text("[" * 100_000 + "]" * 100_000)
    rewrite_manifest(damaged)
    capfd.readouterr()
    summary = _cli(tmp_path, "--epochs", "1", "--max-steps", "12", "--resume", "auto")
    assert summary["resumed_from"] == str(_folder(tmp_path, 4)) and summary["steps"] == 12
    assert summary["resume_skipped"] == [str(damaged)]
    err = capfd.readouterr().err
    assert f"gossipgrad: warning: skipped checkpoint {str(damaged)!r}: " in err, err
    assert "rank0.json' is damaged: nested too deep to read" in err and "Traceback" not in err


def test_resume_auto_without_a_checkpoint_says_it_starts_from_step_0(tmp_path: Path, capfd) -> None:
    """Issue 26, case 11: --resume auto on a folder with no checkpoint."""
    summary = _cli(tmp_path, "--epochs", "1", "--max-steps", "4", "--resume", "auto")
    assert summary["resumed_from"] is None and summary["steps"] == 4
    err = capfd.readouterr().err
    line = (
        f"gossipgrad: note: --resume auto: no checkpoint in "
        f"{str(tmp_path / 'gossip' / 'checkpoints')!r} yet, so the gossip run starts from step 0"
    )
    assert err.count(line) == 1, err


def test_a_state_that_only_one_rank_cannot_use_is_skipped_on_every_rank(tmp_path: Path) -> None:
    """rank1.json is valid JSON, but no state (its sampler's entry is gone): only rank 1 finds
    out, and every rank goes on to the previous checkpoint together."""
    out = str(tmp_path)
    run_world(_train, 2, out, {"max_steps": 8, "checkpoint_every": 4})
    damaged = tmp_path / "gossip" / "checkpoints" / "step_00000008"
    tree = json.loads((damaged / "rank1.json").read_text())
    del tree["sampler"]
    (damaged / "rank1.json").write_text(json.dumps(tree))
    rewrite_manifest(damaged)
    summaries = run_world(_train, 2, out, {"max_steps": 12, "resume": "auto"}, timeout=90)
    for summary in summaries:
        assert summary["resumed_from"].endswith("step_00000004") and summary["steps"] == 12
        assert summary["resume_skipped"] == [str(damaged)]


def test_gradients_mode_resumes_its_partners_bit_for_bit(tmp_path: Path) -> None:
    """--mode gradients picks each exchange's partner by the exchanges made (one per backward),
    which the checkpoint carries: on 4 ranks the partners change from exchange to exchange."""
    options = {"mode": "gradients", "epochs": 1, "checkpoint_every": 6, "max_steps": 12}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_world(_train, 4, str(straight), options)
    shutil.copytree(_folder(straight, 6), _folder(resumed, 6))
    summary = run_world(_train, 4, str(resumed), {**options, "resume": "auto"})[0]
    assert summary["resumed_from"] == str(_folder(resumed, 6))
    _assert_same_model(straight, resumed)


def _saved_trackers(rank: int, world: int, path: str) -> list[torch.Tensor]:
    return checkpoint.load(path)["gossip"]["trackers"]


def _resumed_trackers(rank: int, world: int, out: str, options: dict) -> list[torch.Tensor]:
    run = loop.TrainingLoop(_cfg(out, **options), "gossip")
    return [t.clone() for t in run.model._engine._trackers]


def test_trackers_resume_on_another_world_size_as_their_average(tmp_path: Path) -> None:
    """Like the replicas and the momentum: the mean tracker stays the mean last gradient."""
    out = str(tmp_path)
    run_world(_train, 4, out, {"tracking": True, "max_steps": 8, "checkpoint_every": 8})
    saved = run_world(_saved_trackers, 4, str(_folder(tmp_path, 8)))
    resumed = run_world(_resumed_trackers, 2, out, {"tracking": True, "resume": "auto"})
    assert not torch.equal(saved[0][0], saved[1][0])  # the ranks' trackers differed
    for trackers in resumed:
        for i, tracker in enumerate(trackers):
            average = _mean([s[i] for s in saved])
            torch.testing.assert_close(tracker, average, rtol=0, atol=1e-7)
