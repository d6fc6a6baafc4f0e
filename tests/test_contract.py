"""Every wrapper satisfies ``gossipgrad.DataParallel``, and ``average_replicas(into=...)`` writes
the replicas' exact mean into another module while leaving the replicas as they are."""

from __future__ import annotations

import copy

import pytest
import torch
from _dist import run_world

import gossipgrad
from gossipgrad.mixing import replica_tensors

_ALGOS = [("gossip", {}), ("allreduce", {}), ("hierarchical", {"ranks_per_node": 1})]


def _average_into_scratch(rank: int, world: int, algo: str, extra: dict) -> tuple:
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    scratch = copy.deepcopy(module)
    model = gossipgrad.wrap(module, algo, **extra)
    with torch.no_grad():
        for t in replica_tensors(module):
            t.fill_(float(rank + 1))  # rank 0 holds 1s, rank 1 holds 2s
    before = [t.clone() for t in replica_tensors(module)]
    model.average_replicas(into=scratch)
    is_contract = isinstance(model, gossipgrad.DataParallel)
    return is_contract, before, replica_tensors(module), replica_tensors(scratch)


@pytest.mark.parametrize(("algo", "extra"), _ALGOS, ids=[a for a, _ in _ALGOS])
def test_average_into_fills_the_scratch_copy_with_the_mean_only(algo: str, extra: dict) -> None:
    results = run_world(_average_into_scratch, 2, algo, extra)
    for rank, (is_contract, before, own, averaged) in enumerate(results):
        assert is_contract, algo
        assert len(own) == len(averaged) == 6  # weight, bias, BN weight, bias, mean, var
        assert all(torch.equal(b, o) for b, o in zip(before, own, strict=True)), rank
        assert all(torch.equal(t, torch.full_like(t, 1.5)) for t in averaged), rank


def _copies(rank: int, world: int, algo: str, extra: dict) -> int:
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    model = gossipgrad.wrap(module, algo, **extra)
    twin = copy.deepcopy(model.module)  # an EMA or scratch copy of a wrapped module
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin(torch.randn(4, 3)).sum().backward()  # its hooks are inert: no step of the wrapper
    twin_opt.step()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()  # the wrapper's one step ends here
    model.flush()
    return model.step


@pytest.mark.parametrize(("algo", "extra"), _ALGOS, ids=[a for a, _ in _ALGOS])
def test_a_wrapped_module_can_be_deep_copied(algo: str, extra: dict) -> None:
    assert run_world(_copies, 2, algo, extra) == [1, 1]
