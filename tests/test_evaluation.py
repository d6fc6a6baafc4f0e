"""Held-out evaluation helpers: the replicas' average copied into a scratch module."""

from __future__ import annotations

import copy

import torch
from _dist import run_world

from gossipgrad.evaluation import average_into
from gossipgrad.mixing import replica_tensors


def _average_into_scratch(rank: int, world: int) -> tuple[list, list, list]:
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    scratch = copy.deepcopy(module)
    with torch.no_grad():
        for t in replica_tensors(module):
            t.fill_(float(rank + 1))  # rank 0 holds 1s, rank 1 holds 2s
    before = [t.clone() for t in replica_tensors(module)]
    average_into(scratch, module)
    return before, replica_tensors(module), replica_tensors(scratch)


def test_average_into_fills_the_scratch_copy_with_the_mean_only() -> None:
    for rank, (before, own, averaged) in enumerate(run_world(_average_into_scratch, 2)):
        assert len(own) == len(averaged) == 6  # weight, bias, BN weight, bias, mean, var
        assert all(torch.equal(b, o) for b, o in zip(before, own, strict=True)), rank
        assert all(torch.equal(t, torch.full_like(t, 1.5)) for t in averaged), rank
