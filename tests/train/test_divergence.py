"""Divergence guard: a consensus distance above --consensus-warn is warned about and recorded; a
replica that goes non-finite shows as nan in the metrics, is warned about, and is left out of the
exported model."""

from __future__ import annotations

import math
import os
from pathlib import Path

import sklearn.model_selection  # noqa: F401 - imported once here, the forked ranks inherit it
import torch
import torch._dynamo  # noqa: F401 - (DDP imports it on first use)
from _dist import run_world
from torch import nn

from gossipgrad.train import loop
from gossipgrad.train.config import TrainConfig
from gossipgrad.train.data import DatasetInfo
from gossipgrad.train.metrics import MetricsLog, read_metrics


def _records(consensus: list[float | None]) -> list[dict]:
    return [{"step": 10 * (i + 1), "consensus": c} for i, c in enumerate(consensus)]


def test_warns_when_the_distance_goes_above_and_records_every_time(tmp_path, capsys) -> None:
    log = MetricsLog(tmp_path, algo="gossip", total_steps=60, quiet=True, consensus_warn=0.5)
    for record in _records([0.1, 0.7, None, 0.9, 0.2, float("nan")]):
        log.record(record)
    log.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "gossipgrad: warning: step 20: consensus distance 0.7 is above --consensus-warn 0.5: "
        "the replicas are drifting apart (lower --lr, or try --sync or --schedule exact)",
        "gossipgrad: warning: step 60: consensus distance nan is above --consensus-warn 0.5: "
        "the replicas are drifting apart (lower --lr, or try --sync or --schedule exact)",
    ]  # step 40 is still above: recorded, not warned again
    warned = {r["step"]: r.get("warning") for r in read_metrics(tmp_path)}
    assert warned == {
        10: None,
        20: "consensus distance 0.7 > --consensus-warn 0.5",
        30: None,
        40: "consensus distance 0.9 > --consensus-warn 0.5",
        50: None,
        60: "consensus distance nan > --consensus-warn 0.5",
    }


def test_zero_disables_and_a_resumed_run_does_not_warn_twice(tmp_path, capsys) -> None:
    log = MetricsLog(tmp_path, algo="gossip", total_steps=20, quiet=True, consensus_warn=0.0)
    log.record({"step": 10, "consensus": 1e6})
    log.close()
    assert "warning" not in read_metrics(tmp_path)[0]
    history = _records([0.9])  # the checkpoint's history ends above the threshold
    log = MetricsLog(tmp_path, algo="gossip", total_steps=20, history=history, consensus_warn=0.5)
    log.record({"step": 20, "consensus": 0.8})
    log.close()
    assert "gossipgrad: warning" not in capsys.readouterr().err
    assert read_metrics(tmp_path)[-1]["warning"].startswith("consensus distance 0.8 >")


def _train(rank: int, world: int, out: str, consensus_warn: float) -> dict:
    cfg = TrainConfig(
        algo="gossip",
        out=out,
        quiet=True,
        max_steps=15,
        log_every=5,
        consensus_every=5,
        consensus_warn=consensus_warn,
    )
    return loop.train(cfg.validate(), "gossip")


def test_training_with_a_tiny_threshold_warns_on_rank_0(tmp_path: Path, capfd) -> None:
    summary = run_world(_train, 2, str(tmp_path / "tiny"), 1e-9)[0]
    err = capfd.readouterr().err
    assert err.count("gossipgrad: warning:") == 1, err  # once, from rank 0 only
    records = read_metrics(tmp_path / "tiny" / "gossip")
    assert f"step 5: consensus distance {records[0]['consensus']:.3g} is above" in err
    assert [r["step"] for r in records if "warning" in r] == [5, 10, 15]
    assert summary["consensus_warnings"] == 3

    summary = run_world(_train, 2, str(tmp_path / "default"), TrainConfig().consensus_warn)[0]
    assert "gossipgrad: warning:" not in capfd.readouterr().err
    assert summary["consensus_warnings"] == 0


def nan_mlp(info: DatasetInfo) -> nn.Module:
    """An MLP whose rank 1 outputs NaN from its 3rd training forward on (bad data, say)."""

    class _Diverging(nn.Sequential):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rank = int(os.environ.get("RANK", torch.distributed.get_rank()))
            self.calls += self.training
            if rank == 1 and self.training and self.calls >= 3:
                x = x * math.nan
            return super().forward(x)

    return _Diverging(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, info.num_classes))


def _diverge(rank: int, world: int, out: str) -> dict:
    cfg = TrainConfig(
        algo="gossip",
        out=out,
        quiet=True,
        max_steps=12,
        log_every=4,
        consensus_every=4,
        on_nonfinite="skip",
        model=f"{__file__}:nan_mlp",
    )
    return loop.train(cfg.validate(), "gossip")


def test_a_non_finite_replica_is_nan_in_metrics_and_left_out_of_the_model(tmp_path, capfd):
    summary = run_world(_diverge, 3, str(tmp_path))[0]
    err = capfd.readouterr().err
    assert summary["excluded_ranks"] == [1]
    assert math.isnan(summary["consensus_distance"])
    weights = torch.load(tmp_path / "gossip" / "model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())  # never a NaN model
    assert summary["test_accuracy"] > 0.3
    records = read_metrics(tmp_path / "gossip")
    assert all(math.isnan(r["loss"]) and math.isnan(r["consensus"]) for r in records)
    assert all(r["nonfinite_ranks"] == [1] and "warning" in r for r in records)
    assert "gossipgrad: warning: step 4: the training loss is nan (replicas of ranks [1]" in err
    assert "gossipgrad: warning: step 4: consensus distance nan is above" in err
    assert (
        "gossipgrad: warning: gossip: rank 1 holds NaN or inf at step 12 (diverged): the exported "
        "model is the exact average of the 2 finite replicas" in err
    )
