"""``GossipDataParallel.clip_grad_norm_``: clipping against the norm DDP would clip against."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist import run_world
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gossipgrad import GossipDataParallel
from gossipgrad._clipping import AverageNormEstimate


def _norms(rank: int, world: int) -> list[tuple[float, float, float]]:
    """Per step: the local gradient's norm, the norm of the average over ranks (what DDP clips
    against, by an all-reduce in the test) and clip_grad_norm_'s estimate of it."""
    torch.manual_seed(0)
    model = GossipDataParallel(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(rank)
    teacher = torch.randn(20, 5, generator=torch.Generator().manual_seed(9))
    out = []
    for _ in range(30):
        x = torch.randn(8, 20, generator=data)
        nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1)).backward()
        local = torch.cat([_grad(p) for p in model.parameters()])
        mean = local.clone()
        dist.all_reduce(mean)
        estimate = model.clip_grad_norm_(math.inf).item()
        out.append((local.norm().item(), (mean / world).norm().item(), estimate))
        opt.step()
        opt.zero_grad()
    model.close()
    return out


def test_the_estimate_is_closer_to_the_average_gradients_norm_than_the_local_norm() -> None:
    for steps in run_world(_norms, 4):
        settled = steps[5:]
        local = [abs(math.log(a / m)) for a, m, _ in settled]
        estimate = [abs(math.log(e / m)) for _, m, e in settled]
        assert sum(local) / len(local) > 0.3  # the local norm is far off (noise not averaged)
        assert sum(estimate) / len(estimate) < 0.5 * sum(local) / len(local)


def test_clipping_scales_to_the_threshold_and_returns_the_norm_clipped_against() -> None:
    def clip(rank: int, world: int) -> tuple[float, float]:
        model = GossipDataParallel(nn.Linear(4, 2))
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(rank))
        model(x).pow(2).sum().backward()
        norm = model.clip_grad_norm_(1e-3).item()
        after = torch.cat([_grad(p) for p in model.parameters()]).norm().item()
        model.close()
        return norm, after

    for norm, after in run_world(clip, 2):
        assert norm > 1e-3
        assert after == pytest.approx(1e-3, rel=1e-3)  # first step: local norm


def test_pure_noise_is_scaled_by_one_over_root_p_and_pure_signal_not_at_all() -> None:
    g = torch.Generator().manual_seed(0)
    noise, signal = AverageNormEstimate(16), AverageNormEstimate(16)
    direction = torch.randn(1000, generator=g)
    for _ in range(200):
        noisy = noise.update([torch.randn(1000, generator=g)])
        steady = signal.update([direction])
    assert noisy / math.sqrt(1000) == pytest.approx(1 / 4, rel=0.25)
    assert steady == pytest.approx(direction.norm().item(), rel=1e-6)


Wrapped = GossipDataParallel | DistributedDataParallel


def _clipped_steps(
    model: Wrapped, opt: torch.optim.Optimizer, rank: int, steps: range
) -> list[float]:
    """Train ``steps`` with clipping at 0.05 (every step clips: ``GossipDataParallel``'s
    estimate, DDP's norm of the average); the norms clipped against."""
    teacher = torch.randn(20, 5, generator=torch.Generator().manual_seed(9))
    norms = []
    for t in steps:
        x = torch.randn(8, 20, generator=torch.Generator().manual_seed(100 * rank + t))
        nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1)).backward()
        if isinstance(model, GossipDataParallel):
            norms.append(model.clip_grad_norm_(0.05).item())
        else:
            norms.append(nn.utils.clip_grad_norm_(model.parameters(), 0.05).item())
        opt.step()
        opt.zero_grad()
    return norms


def _resumed_with_clipping(rank: int, world: int, wrapper: str) -> tuple[bool, bool, float]:
    """Ten clipped steps straight, and five, a checkpoint, five more in a new wrapper: whether
    both end equal, whether the estimate was saved, and the least norm clipped against."""

    def fresh(seed: int) -> tuple[Wrapped, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        module = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
        model: Wrapped = (
            GossipDataParallel(module) if wrapper == "gossip" else DistributedDataParallel(module)
        )
        return model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

    def engine_state(model: Wrapped) -> dict[str, Any]:
        return model.gossip_state() if isinstance(model, GossipDataParallel) else {}

    straight, opt = fresh(0)
    norms = _clipped_steps(straight, opt, rank, range(10))
    want = nn.utils.parameters_to_vector(straight.module.parameters()).detach()
    _close(straight)

    first, opt = fresh(0)
    _clipped_steps(first, opt, rank, range(5))
    state = copy.deepcopy((first.module.state_dict(), opt.state_dict(), engine_state(first)))
    _close(first)
    resumed, opt = fresh(1)
    resumed.module.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    if isinstance(resumed, GossipDataParallel):
        resumed.load_gossip_state(state[2])
    _clipped_steps(resumed, opt, rank, range(5, 10))
    got = nn.utils.parameters_to_vector(resumed.module.parameters()).detach()
    _close(resumed)
    return torch.equal(got, want), "clip_norm_estimate" in state[2], min(norms)


def test_a_resume_mid_run_keeps_the_estimate_and_continues_bit_for_bit_as_under_ddp() -> None:
    for equal, _, least in run_world(_resumed_with_clipping, 2, "ddp"):
        assert least > 0.05 and equal
    for equal, saved, least in run_world(_resumed_with_clipping, 2, "gossip"):
        assert least > 0.05  # every step clipped: the estimate decides each step's size
        assert saved
        assert equal


def _close(model: Wrapped) -> None:
    if isinstance(model, GossipDataParallel):
        model.close()


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad.reshape(-1)
