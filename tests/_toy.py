"""Shared by the engine tests: a toy model and data, a recorder of torch.distributed calls, and a
small task trained to compare accuracy with the all-reduce baseline."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import gossipgrad


def toy_model(seed: int = 0, batchnorm: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    norm = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
    return nn.Sequential(nn.Linear(6, 16), norm, nn.ReLU(), nn.Linear(16, 3))


def flat(module: nn.Module, buffers: bool = True) -> torch.Tensor:
    tensors = list(module.parameters())
    if buffers:
        tensors += [b for b in module.buffers() if b.is_floating_point()]
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def batch(rank: int, step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 6, generator=g).to(dtype)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def train_steps(
    model: nn.Module, steps: int, rank: int, dtype: torch.dtype = torch.float32
) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for t in range(steps):
        x, y = batch(rank, t, dtype)
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
        opt.zero_grad()


def perturb_(module: nn.Module, rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype))


class Recorder:
    """Wraps torch.distributed's point-to-point and collective calls and records them."""

    COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "barrier")

    def __init__(self, events: list[tuple]) -> None:
        self.events = events
        self.originals = {n: getattr(dist, n) for n in ("isend", "irecv", *self.COLLECTIVES)}

    def __enter__(self) -> Recorder:
        for name, fn in self.originals.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self.originals.items():
            setattr(dist, name, fn)

    def _wrap(self, name: str, fn: Any) -> Any:
        events = self.events

        def call(*args: Any, **kwargs: Any) -> Any:
            if name in ("isend", "irecv"):
                tensor, peer = args[0], args[1]
                events.append((name, peer, tensor.numel() * tensor.element_size()))
                return _RecordedWork(fn(*args, **kwargs), events, name)
            events.append((name,))
            return fn(*args, **kwargs)

        return call


class _RecordedWork:
    def __init__(self, work: Any, events: list[tuple], what: str) -> None:
        self.work, self.events, self.what = work, events, what

    def wait(self, *args: Any) -> Any:
        out = self.work.wait(*args)
        self.events.append(("wait", self.what))
        return out


def _teacher_task(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(20, 5, generator=g)
    x = torch.randn(6000, 20, generator=g)
    y = (x @ w + 0.3 * torch.randn(6000, 5, generator=g)).argmax(dim=1)
    return x[:4000], y[:4000], x[4000:], y[4000:]


def fit(rank: int, world: int, algo: str) -> float:
    x, y, xt, yt = _teacher_task()
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    model = gossipgrad.wrap(module, algo)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    shard = torch.arange(rank, len(x), world)
    g = torch.Generator().manual_seed(rank)
    for _ in range(6):
        order = shard[torch.randperm(len(shard), generator=g)]
        for i in range(0, len(order), 25):
            idx = order[i : i + 25]
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
    model.average_replicas()
    with torch.no_grad():
        return (module(xt).argmax(1) == yt).float().mean().item()
