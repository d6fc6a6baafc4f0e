"""``GossipDataParallel.clip_grad_norm_``: clipping against the norm DDP would clip against."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from _dist import run_world
from torch import nn

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


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad.reshape(-1)
