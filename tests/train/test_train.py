"""The training loop (``TrainingLoop``) on 2 gloo ranks forked by ``_dist.run_world``: what a run
writes, exact resume from a checkpoint, held-out evaluation that leaves the replicas alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import sklearn.model_selection  # noqa: F401 - imported once here, the forked ranks inherit it
import torch
import torch._dynamo  # noqa: F401 - (DDP imports it on first use)
from _dist import run_world

from gossipgrad import checkpoint
from gossipgrad.train import cli, loop, sampling, worker
from gossipgrad.train.config import TrainConfig
from gossipgrad.train.data import load_dataset

_METRIC_KEYS = {"step", "epoch", "time", "loss", "acc", "consensus", "lr", "samples_per_s"}


def _train(rank: int, world: int, algo: str, out: str, options: dict) -> dict:
    options = {"log_every": 5, "consensus_every": 5, **options}
    cfg = TrainConfig(algo=algo, out=out, quiet=True, **options)
    return loop.train(cfg.validate(), algo)


def test_a_run_writes_model_summary_and_metrics(tmp_path: Path) -> None:
    summaries = run_world(_train, 2, "gossip", str(tmp_path), {"epochs": 1, "max_steps": 12})
    assert summaries[0] == summaries[1]  # every rank returns the same summary
    summary = summaries[0]
    assert summary["steps"] == 12 and summary["world_size"] == 2
    assert 0.3 < summary["test_accuracy"] <= 1.0  # 12 steps already beat chance (0.1)
    assert summary["bytes_per_rank_per_step"] > 0
    run = tmp_path / "gossip"
    assert json.loads((run / "summary.json").read_text())["steps"] == 12
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10]
    assert all(set(r) == _METRIC_KEYS for r in records)
    assert all(r["consensus"] is not None and r["consensus"] > 0 for r in records)
    weights = torch.load(run / "model.pt", weights_only=True)
    assert set(weights) == {"1.weight", "1.bias", "3.weight", "3.bias"}


@pytest.mark.parametrize("algo", ["gossip", "allreduce"])
def test_resume_continues_exactly(tmp_path: Path, algo: str) -> None:
    # 16 steps straight, against 8 steps, stop, resume for 8 more (crossing an epoch end at
    # step 11). Both checkpoint every 8 steps, so both do the same operations.
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    options = {"epochs": 3, "batch_size": 64, "checkpoint_every": 8}
    run_world(_train, 2, algo, straight, {**options, "max_steps": 16})
    run_world(_train, 2, algo, stopped, {**options, "max_steps": 8})
    first = torch.load(Path(stopped) / algo / "model.pt", weights_only=True)
    resumed = run_world(_train, 2, algo, stopped, {**options, "max_steps": 16, "resume": "auto"})
    assert resumed[0]["steps"] == 16

    a = torch.load(Path(straight) / algo / "model.pt", weights_only=True)
    b = torch.load(Path(stopped) / algo / "model.pt", weights_only=True)
    assert not torch.equal(first["1.weight"], b["1.weight"])  # it did train after resuming
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit

    def history(run: str) -> list[tuple]:
        lines = (Path(run) / algo / "metrics.jsonl").read_text().splitlines()
        return [
            (r["step"], r["epoch"], r["loss"], r["acc"], r["consensus"])
            for r in map(json.loads, lines)
        ]

    assert history(straight) == history(stopped)  # the metrics history continues too
    kept = checkpoint.list_checkpoints(Path(stopped) / algo / "checkpoints")
    assert [p.name for p in kept] == ["step_00000008", "step_00000016"]


def test_resume_refuses_what_is_not_this_runs_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no checkpoint there"):
        run_world(_train, 2, "allreduce", str(tmp_path), {"max_steps": 2, "resume": str(tmp_path)})
    run_world(_train, 2, "gossip", str(tmp_path), {"max_steps": 2, "checkpoint_every": 2})
    gossips = str(tmp_path / "gossip" / "checkpoints" / "step_00000002")
    with pytest.raises(RuntimeError, match="from a run with algo 'gossip'.* --algo gossip"):
        run_world(_train, 2, "allreduce", str(tmp_path), {"max_steps": 2, "resume": gossips})
    with pytest.raises(RuntimeError, match="already holds checkpoints .* --resume auto"):
        run_world(_train, 2, "gossip", str(tmp_path), {"max_steps": 2})  # would mix two runs


def test_resumable_distributed_sampler_continues_mid_epoch() -> None:
    data = list(range(20))
    full = sampling.ResumableDistributedSampler(data, num_replicas=2, rank=0, seed=3)
    full.set_epoch(1)
    order = list(full)
    partial = sampling.ResumableDistributedSampler(data, num_replicas=2, rank=0, seed=3)
    partial.set_epoch(1)
    it = iter(partial)
    head = [next(it) for _ in range(4)]
    state = partial.state_dict()
    assert state == {"epoch": 1, "yielded": 4}
    again = sampling.ResumableDistributedSampler(data, num_replicas=2, rank=0, seed=3)
    again.load_state_dict(state)
    assert head + list(again) == order
    assert list(again) == order  # the next pass is a whole epoch again


def test_default_out(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert worker.default_out(TrainConfig(resume="auto")).startswith("runs/")  # none yet: new
    for name in ("20250101-000000", "20260101-000000"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    assert worker.default_out(TrainConfig(resume="auto")) == "runs/20260101-000000"
    assert worker.default_out(TrainConfig(out="mine", resume="auto")) == "mine"
    assert worker.default_out(TrainConfig()) not in ("runs/20260101-000000", "runs/20250101-000000")


_EVAL_KEYS = {"step", "epoch", "time", "test_loss", "test_acc", "eval_s"}


@pytest.mark.parametrize("algo", ["gossip", "allreduce"])
def test_eval_every_records_the_average_and_leaves_the_replicas_alone(
    tmp_path: Path, algo: str
) -> None:
    # 2 epochs of 11 steps: one evaluation at the end of epoch 1, and the final one at step 22.
    plain, evaluated = str(tmp_path / "plain"), str(tmp_path / "evaluated")
    options = {"epochs": 2, "batch_size": 64}
    run_world(_train, 2, algo, plain, options)
    summary = run_world(_train, 2, algo, evaluated, {**options, "eval_every": 1})[0]

    a = torch.load(Path(plain) / algo / "model.pt", weights_only=True)
    b = torch.load(Path(evaluated) / algo / "model.pt", weights_only=True)
    for name in a:
        assert torch.equal(a[name], b[name]), name  # evaluating changed nothing, bit for bit
    lines = (Path(evaluated) / algo / "metrics.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, lines) if "test_acc" in r]
    assert [(r["step"], r["epoch"]) for r in evals] == [(11, 1), (22, 2)]
    assert all(set(r) == _EVAL_KEYS for r in evals)
    assert all(0.0 <= r["test_acc"] <= 1.0 and r["eval_s"] > 0 for r in evals)
    assert evals[0]["test_acc"] > 0.3  # the average of 11 steps' replicas beats chance (0.1)
    assert evals[-1]["test_acc"] == summary["test_accuracy"]
    assert 0 < evals[0]["time"] < evals[1]["time"] == summary["train_time_s"]


def _stopwatch_pauses() -> tuple[float, float]:
    watch = loop.Stopwatch(offset=5.0)
    with watch.paused():
        time.sleep(0.05)
    return watch.elapsed(), time.perf_counter()


def test_the_stopwatch_starts_at_its_offset_and_stands_still_when_paused() -> None:
    began = time.perf_counter()
    elapsed, ended = _stopwatch_pauses()
    assert 5.0 <= elapsed < 5.0 + (ended - began) - 0.05 + 1e-3


def test_gossip_every_and_int8_cut_the_bytes(tmp_path: Path) -> None:
    # The exchange of step s leaves at the end of step s - 1, and exchange 0 is never sent: over
    # 8 steps, --gossip-every 4 sends those of steps 4 and 8, plain gossip those of steps 1 to 8;
    # int8 sends 0.26 of float32's bytes.
    small = ["--nproc", "2", "--epochs", "1", "--max-steps", "8", "--quiet", "--algo", "gossip"]
    argv = [*small, "--gossip-every", "4", "--wire-dtype", "int8", "--out", str(tmp_path / "few")]
    assert cli.main(["train", *argv]) == 0
    few = json.loads((tmp_path / "few" / "gossip" / "summary.json").read_text())
    plain = run_world(_train, 2, "gossip", str(tmp_path / "plain"), {"epochs": 1, "max_steps": 8})
    ratio = few["bytes_per_rank_per_step"] / plain[0]["bytes_per_rank_per_step"]
    assert ratio == pytest.approx(2 / 8 * 0.26, rel=0.15), ratio
    assert few["config"]["gossip_every"] == 4 and few["preset"] == {"name": "none", "values": {}}


def test_resume_mid_warmup_follows_the_uninterrupted_schedule(tmp_path: Path) -> None:
    # 11 steps per epoch: warmup to step 11, stop at 8 (mid-warmup), cosine after; max-steps
    # stops the run early without reshaping the schedule (which spans --epochs).
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    options = {
        "epochs": 3,
        "batch_size": 64,
        "checkpoint_every": 8,
        "lr_schedule": "cosine",
        "warmup_epochs": 1.0,
        "amp": "bf16",
        "grad_clip": 1.0,
        "label_smoothing": 0.1,
        "log_every": 1,
    }
    run_world(_train, 2, "gossip", straight, {**options, "max_steps": 16})
    run_world(_train, 2, "gossip", stopped, {**options, "max_steps": 8})
    run_world(_train, 2, "gossip", stopped, {**options, "max_steps": 16, "resume": "auto"})
    a = torch.load(Path(straight) / "gossip" / "model.pt", weights_only=True)
    b = torch.load(Path(stopped) / "gossip" / "model.pt", weights_only=True)
    for name in a:
        assert torch.equal(a[name], b[name]), name

    def lrs(run: str) -> list[float]:
        lines = (Path(run) / "gossip" / "metrics.jsonl").read_text().splitlines()
        return [r["lr"] for r in map(json.loads, lines) if "lr" in r]

    assert lrs(straight) == lrs(stopped)
    steps = lrs(straight)
    assert steps[0] == pytest.approx(0.05 / 11) and steps[10] == pytest.approx(0.05)
    assert steps[:11] == sorted(steps[:11]) and steps[11:] == sorted(steps[11:], reverse=True)


def test_the_schedule_shapes() -> None:
    from gossipgrad.train.recipe import lr_factor

    assert [lr_factor(s, "constant", 2, 10) for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, "cosine", 2, 10) == 1.0 and lr_factor(10, "cosine", 2, 10) == 0.0
    assert [lr_factor(s, "step", 0, 8) for s in (0, 3, 4, 6)] == pytest.approx([1, 1, 0.1, 0.01])


def test_fp16_is_refused_off_cuda() -> None:
    from gossipgrad.train.recipe import check_amp

    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device.*--amp bf16"):
        check_amp("fp16", torch.device("cpu"))
    check_amp("bf16", torch.device("cpu"))


def test_balance_and_bounded_staleness_train_in_lockstep(tmp_path: Path) -> None:
    # --balance: every rank takes ceil(N / (p * batch)) steps per epoch (batches of its own
    # size); --max-staleness: exchanges mixed 2 steps late. Both still learn the task.
    options = {"epochs": 2, "balance": True, "max_staleness": 2, "batch_size": 32}
    summaries = run_world(_train, 2, "gossip", str(tmp_path), options)
    train_size = len(load_dataset("digits", seed=0)[0])
    assert summaries[0]["steps"] == 2 * -(-train_size // (2 * 32))
    assert summaries[0]["test_accuracy"] > 0.8
    assert summaries[0]["config"]["max_staleness"] == 2
