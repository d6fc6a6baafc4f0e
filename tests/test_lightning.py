"""``gossipgrad.lightning``: Trainer and Fabric train with gossip on 2 CPU processes (gloo), save
the replicas' exact average, and ``trainer.test`` scores that one model.

Processes are forked by Lightning's own launcher (``start_method="fork"``): the children inherit
the imported Lightning, so a run takes about a second. Each rank writes what it saw to a file.
"""

from __future__ import annotations

import faulthandler
import importlib
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import optimizer as optimizers
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning", reason="pip install 'gossipgrad[lightning]'")

from gossipgrad.lightning import GossipFabricStrategy, GossipStrategy  # noqa: E402

TIMEOUT = timedelta(seconds=60)  # a lost partner fails the test instead of hanging it


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    """A deadlock (ranks in different collectives) ends the run with every thread's traceback
    instead of hanging it: neither gloo nor Lightning's launcher times out then."""
    faulthandler.dump_traceback_later(240, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Fork only from a process set to one intra-op thread: earlier tests in this pytest process
    may have started OpenMP's thread pool, and a forked child that enters a parallel region of
    that pool waits forever for threads it does not have (seen: a rank stuck in batch_norm)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x[:, :3].argmax(1))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The average of float tensors; integer buffers (BatchNorm's step count) stay local."""
    first = states[0]
    return {
        k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
        for k, v in first.items()
    }


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"{k} differs")


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.allclose(a[k], b[k], atol=1e-4) for k in a)


class _Probe(L.LightningModule):
    """A small classifier that records, per rank, its replica when training starts, at the end
    of each training epoch (before ModelCheckpoint saves) and after fit, and what wrapped it."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        self.out = out
        self.seen: dict[str, Any] = {"epoch_end": []}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        return loss

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("test_loss", F.cross_entropy(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    def on_train_start(self) -> None:
        self.seen["start"] = _state(self)

    def on_train_epoch_end(self) -> None:
        self.seen["epoch_end"].append(_state(self))
        if self.current_epoch == 0:  # collective, while rank 0's progress bar syncs train_loss
            self.trainer.save_checkpoint(self.out / "manual.ckpt")
        wrapper = self.trainer.strategy.model
        self.seen |= {"wrapper": type(wrapper).__name__, "bytes": wrapper.bytes_sent_last_step}
        self.seen |= {"gossip_steps": wrapper.step, "optimizer_steps": self.trainer.global_step}

    def on_fit_end(self) -> None:  # after the strategy's teardown
        self.seen["final"] = _state(self)
        self.seen["hooks_left"] = _hooks_left(self)
        torch.save(self.seen, self.out / f"rank{self.global_rank}.pt")


def _hooks_left(module: nn.Module) -> int:
    """Hooks still on torch's optimizers and on ``module``'s parameters (private torch state:
    what ``GossipDataParallel.close`` must have emptied)."""
    left = len(optimizers._global_optimizer_pre_hooks)
    left += len(optimizers._global_optimizer_post_hooks)
    return left + sum(len(p._post_accumulate_grad_hooks or {}) for p in module.parameters())


def _trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=GossipStrategy(start_method="fork", timeout=TIMEOUT),
        logger=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_trainer_fits_with_gossip_saves_the_average_and_tests_it(tmp_path: Path) -> None:
    model = _Probe(tmp_path)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_epochs=2, save_top_k=-1, filename="{epoch}"
    )  # saves after epoch 1 of 0, 1, 2
    trainer = _trainer(tmp_path, max_epochs=3, accumulate_grad_batches=2, callbacks=[checkpoints])
    trainer.fit(model, DataLoader(_data(256, seed=0), batch_size=16, shuffle=True))
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    replicas = [[s["epoch_end"][epoch] for s in seen] for epoch in range(3)]

    assert [s["wrapper"] for s in seen] == ["GossipDataParallel"] * 2
    assert all(s["bytes"] > 0 for s in seen)
    # accumulate_grad_batches=2: the accumulating forwards do not gossip (block_backward_sync)
    assert [s["gossip_steps"] for s in seen] == [s["optimizer_steps"] for s in seen] == [12, 12]
    assert all(_differ(*pair) for pair in replicas), "equal replicas: that is all-reduce"
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=1.ckpt", "manual.ckpt"]
    manual = torch.load(tmp_path / "manual.ckpt")["state_dict"]
    _assert_equal(manual, _mean(replicas[0]), atol=1e-5)
    saved = torch.load(tmp_path / "epoch=1.ckpt")["state_dict"]
    _assert_equal(saved, _mean(replicas[1]), atol=1e-5)  # the exact average was saved
    final = seen[0]["final"]
    _assert_equal(final, seen[1]["final"])  # fit ends with one model: the average
    _assert_equal(final, _mean(replicas[2]), atol=1e-5)
    _assert_equal(_state(model), final)  # the module in hand is that model too
    assert [s["hooks_left"] for s in seen] == [0, 0]  # teardown closed the wrapper

    test = _data(64, seed=1)
    (metrics,) = trainer.test(model, DataLoader(test, batch_size=32), verbose=False)
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model.net(test.tensors[0]), test.tensors[1]).item()
    assert metrics["test_loss"] == pytest.approx(expected, abs=1e-5)


def test_trainer_resumes_every_replica_from_the_saved_average(tmp_path: Path) -> None:
    train = DataLoader(_data(128, seed=0), batch_size=16, shuffle=True)
    _trainer(tmp_path, max_epochs=1).fit(_Probe(tmp_path), train)
    (path,) = tmp_path.rglob("epoch=*.ckpt")  # ModelCheckpoint's
    saved = torch.load(path)["state_dict"]
    resumed = _Probe(tmp_path)  # fresh weights: the checkpoint must replace them on every rank
    _trainer(tmp_path, max_epochs=2).fit(resumed, train, ckpt_path=path)
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    for s in seen:
        _assert_equal(s["start"], saved)
        assert s["optimizer_steps"] == 8 and len(s["epoch_end"]) == 1  # epoch 1 only
    assert _differ(seen[0]["epoch_end"][0], seen[1]["epoch_end"][0])  # and gossiped on


def _fabric_run(fabric: L.Fabric, out: Path) -> None:
    torch.manual_seed(fabric.global_rank)  # different initial weights: rank 0's are broadcast
    model, optimizer = fabric.setup(*_model_and_optimizer())
    gossip = fabric.strategy.data_parallel(model)
    x, y = _data(64, seed=10 + fabric.global_rank).tensors  # each rank its own data
    for step in range(6):  # batches 0 and 3 accumulate: 4 optimizer steps, 4 gossip steps
        accumulating = step % 3 == 0
        with fabric.no_backward_sync(model, enabled=accumulating):
            fabric.backward(F.cross_entropy(model(x), y))
        if not accumulating:
            optimizer.step()
            optimizer.zero_grad()
    seen = {"before": _state(model), "steps": gossip.step, "bytes": gossip.bytes_sent_last_step}
    fabric.save(out / "fabric.ckpt", {"model": model, "optimizer": optimizer})
    seen["after_save"] = _state(model)
    fabric.backward(F.cross_entropy(model(x), y))  # the replicas move apart again
    optimizer.step()
    fabric.load(out / "fabric.ckpt", {"model": model})
    seen["after_load"] = _state(model)
    torch.save(seen, out / f"fabric{fabric.global_rank}.pt")


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.2)


def test_fabric_trains_with_gossip_and_saves_the_average(tmp_path: Path) -> None:
    strategy = GossipFabricStrategy(start_method="fork", timeout=TIMEOUT)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch(_fabric_run, tmp_path)
    seen = [torch.load(tmp_path / f"fabric{r}.pt") for r in range(2)]

    assert [s["steps"] for s in seen] == [4, 4]  # two of six backwards in no_backward_sync
    assert all(s["bytes"] > 0 for s in seen)
    assert _differ(seen[0]["before"], seen[1]["before"])
    saved = torch.load(tmp_path / "fabric.ckpt")["model"]
    _assert_equal(saved, _mean([s["before"] for s in seen]), atol=1e-5)
    for s in seen:
        _assert_equal(s["after_save"], saved)
        _assert_equal(s["after_load"], saved)


def test_options_are_checked_when_the_strategy_is_built() -> None:
    assert GossipStrategy(sync=True, streams=2).options.streams == 2
    with pytest.raises(TypeError, match="syncc"):
        GossipStrategy(syncc=True)
    with pytest.raises(ValueError, match="mode"):
        GossipFabricStrategy(mode="bogus")


def test_fabric_data_parallel_names_what_to_pass() -> None:
    with pytest.raises(ValueError, match=r"fabric\.setup"):
        GossipFabricStrategy().data_parallel(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"fabric\.setup"):
        GossipFabricStrategy()._backward_sync_control.no_backward_sync(nn.Linear(2, 2), True)


def test_without_lightning_the_import_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning.fabric.strategies", None)
    monkeypatch.delitem(sys.modules, "gossipgrad.lightning")
    with pytest.raises(ImportError, match=r"pip install 'gossipgrad\[lightning\]'"):
        importlib.import_module("gossipgrad.lightning")
