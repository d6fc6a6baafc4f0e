"""The all-reduce baseline and ``wrap``: the same extra methods as gossip, on DDP."""

from __future__ import annotations

import pytest
import torch
from _dist import run_world
from _toy import batch, toy_model
from torch import nn

import gossipgrad
from gossipgrad import AllReduceDataParallel


def _reassigned_buffer(rank: int, world: int, algo: str) -> list[float]:
    module = toy_model()
    model = gossipgrad.wrap(module, algo)
    # A module may replace a buffer object after wrapping; averaging must cover the new one.
    module[1].running_mean = torch.full((16,), float(rank))
    model.average_replicas()
    return module[1].running_mean.tolist()


@pytest.mark.parametrize("algo", ["allreduce", "gossip"])
def test_average_covers_a_buffer_replaced_after_wrapping(algo: str) -> None:
    results = run_world(_reassigned_buffer, 2, algo)
    assert results[0] == results[1] == [0.5] * 16


def _counts(rank: int, world: int) -> tuple[int, int, float]:
    model = AllReduceDataParallel(toy_model(batchnorm=False))  # BatchNorm stats stay local
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(3):
        x, y = batch(rank, t)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        model(batch(rank, 9)[0])  # evaluation forwards are not steps
    return model.step, model.bytes_sent_last_step, model.consensus_distance()


def test_steps_bytes_and_identical_replicas() -> None:
    model_bytes = sum(p.numel() * 4 for p in toy_model(batchnorm=False).parameters())
    for step, sent, distance in run_world(_counts, 3):
        assert step == 3
        assert sent == int(2 * 2 / 3 * model_bytes), "a ring all-reduce sends 2 (p-1)/p models"
        assert distance < 1e-6
