"""The contenders of benchmarks/lm.py: their names, what each should send, and how each trains.

    c = parse("diloco-h8")                  # Contender(family="diloco", period=8, ...)
    runner = Runner(c, module, settings)    # collective: build in the same order on every rank
    runner.step(x, y); runner.finish(); exported = runner.export(scratch); runner.close()

Names (``parse``; other K, H and settings work too):

- ``ddp``: torch ``DistributedDataParallel``;
- ``localsgd-kK``: torch post-local SGD (``PostLocalSGDOptimizer`` + ``PeriodicModelAverager``,
  period K, from the first step);
- ``diloco-hH``: torchft's ``DiLoCo`` (Douillard et al. 2023): H inner steps, then the
  pseudo-gradient (global minus local) is all-reduced and an outer SGD step with Nesterov
  momentum (lr 0.7, m 0.9 unless ``-outerLRmM``) moves the global weights; a torchft ``Manager``
  per host and the ``Lighthouse`` on host 0;
- ``sdiloco-hH[-fF][-tT][-aA]``: torchft's streaming DiLoCo (Douillard et al. 2025): the model
  in F fragments (default 2, whole transformer blocks; the embeddings join the first, the head
  the last), one synchronised every H/F steps so that each is every H, staggered; the all-reduce
  overlaps T inner steps (default 1), after which the fragment is ``lerp(global, local, A)``
  (default 0.5 with overlap, the paper's alpha). ``diloco`` takes ``-fF -tT -aA`` too;
- ``gossip[-kK][-bf16|-fp16|-int8][-outerLRmM]``: ``gossipgrad.wrap(module, "gossip", ...)`` with
  ``gossip_every=K`` and ``outer_lr``, ``outer_momentum`` (the outer step on gossip's
  pseudo-gradient; none by default).

Every contender's inner optimizer is AdamW with a linear warm-up and a cosine decay (``lr_factor``).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import OUTER as _OUTER  # noqa: E402
from peers import expected_bytes as _peers_bytes  # noqa: E402
from peers import parse as _peers_parse  # noqa: E402

_DILOCO = re.compile(r"(s?diloco)-h(\d+)(?:-f(\d+))?(?:-t(\d+))?(?:-a([0-9.]+))?")


@dataclass(frozen=True)
class Contender:
    """A contender, parsed from its name."""

    name: str
    family: str  # "ddp", "localsgd", "diloco" or "gossip"
    period: int = 0  # localsgd: K; diloco: H
    fragments: int = 1  # diloco: F (> 1: streaming)
    delay: int = 0  # diloco: inner steps the all-reduce overlaps (tau)
    alpha: float = 0.0  # diloco: lerp(global, local, alpha) after an overlapped sync
    outer: tuple[float, float] | None = None  # outer (lr, Nesterov momentum)
    gossip: tuple[tuple[str, Any], ...] = ()  # gossip: GossipOptions overrides

    @property
    def peer(self) -> bool:
        """Neither gossipgrad nor DDP (whose final loss is the target): the bar to beat."""
        return self.family not in ("gossip", "ddp")

    def label(self) -> str:
        outer = f"outer Nesterov lr {self.outer[0]} m {self.outer[1]}" if self.outer else ""
        if self.family == "ddp":
            return "DDP"
        if self.family == "localsgd":
            return f"torch post-local SGD, K = {self.period}"
        if self.family == "diloco":
            what = "streaming DiLoCo" if self.fragments > 1 else "DiLoCo"
            parts = [f"H = {self.period}", outer]
            parts += [f"{self.fragments} fragments"] if self.fragments > 1 else []
            parts += [f"overlap {self.delay}, alpha {self.alpha}"] if self.delay else []
            return f"{what} (torchft), " + ", ".join(parts)
        base = _peers_parse(self.name.split("-outer")[0]).label()
        return base + (f", {outer}" if outer else "")


def parse(name: str) -> Contender:
    """The contender ``name`` stands for; ``ValueError`` naming the forms there are."""
    if name == "ddp":
        return Contender(name, "ddp")
    if m := re.fullmatch(r"localsgd-k(\d+)", name):
        return Contender(name, "localsgd", period=int(m[1]))
    if m := _DILOCO.fullmatch(_OUTER.sub(r"\1", name)):
        streaming = m[1] == "sdiloco"
        h, f = int(m[2]), int(m[3] or (2 if streaming else 1))
        delay = int(m[4] or (1 if streaming else 0))
        alpha = float(m[5]) if m[5] else (0.5 if delay else 0.0)
        if h < 1 or f < 1 or h % f or delay >= h // f or not 0 <= alpha <= 1:
            raise ValueError(
                f"{name!r}: H must be a multiple of the fragments F, the overlap T < H / F and "
                f"0 <= alpha <= 1 (got H {h}, F {f}, T {delay}, alpha {alpha})"
            )
        return Contender(name, "diloco", h, f, delay, alpha, _outer(name) or (0.7, 0.9))
    base = _OUTER.sub(r"\1", name)
    if base.startswith("gossip"):
        try:
            spec = _peers_parse(base)
        except ValueError:
            spec = None
        if spec is not None and spec.family == "gossip":
            o = dict(spec.gossip)
            if outer := _outer(name):
                o["outer_lr"], o["outer_momentum"] = outer
            return Contender(name, "gossip", outer=outer, gossip=tuple(sorted(o.items())))
    raise ValueError(
        f"unknown contender {name!r}: ddp, localsgd-kK, diloco-hH, sdiloco-hH[-fF][-tT][-aA], "
        "gossip[-kK][-bf16|-fp16|-int8] (diloco and gossip take -outerLRmM, e.g. -outer0.7m0.9)"
    )


def _outer(name: str) -> tuple[float, float] | None:
    m = _OUTER.fullmatch(name)
    return (float(m[2]), float(m[3])) if m else None


def expected_bytes(c: Contender, fragment_numels: list[int], world: int, steps: int) -> float:
    """What ``c`` should put on a host's link per step on average over ``steps`` steps (payload
    only: a ring all-reduce sends 2(p-1)/p of a buffer per rank); ``fragment_numels``: the
    parameters of each of ``c``'s fragments (one for all but streaming DiLoCo)."""
    if world < 2 or steps < 1:
        return 0.0
    if c.family != "diloco":
        shapes = [[n] for n in fragment_numels]
        name = c.name.split("-outer")[0]  # the outer step sends nothing more
        return _peers_bytes(_peers_parse(name), shapes, world, steps)
    ring, syncs = 2 * (world - 1) / world, steps // (c.period // c.fragments)
    sent = sum(4 * fragment_numels[j % c.fragments] for j in range(syncs))
    return ring * sent / steps


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """The inner learning rate at ``step`` as a fraction of the peak: linear warm-up over
    ``warmup`` steps, then a cosine decay to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def fragments(module: Any, count: int) -> list[Any]:
    """``module`` (a ``GPT``) in ``count`` fragments of whole blocks; the embeddings join the
    first, the final norm and head the last."""
    from torch import nn

    blocks = list(module.blocks)
    if len(blocks) % count:
        raise ValueError(f"{len(blocks)} transformer blocks do not split into {count} fragments")
    n = len(blocks) // count
    parts = [nn.ModuleList(blocks[i * n : (i + 1) * n]) for i in range(count)]
    parts[0].extend([module.tokens, module.positions])
    parts[-1].extend([module.ln_f, module.head])
    return parts


# --- training --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What every runner shares (the worker's command line)."""

    lr: float
    weight_decay: float
    warmup: int  # lr warm-up steps
    total_steps: int
    timeout_s: float
    index: int  # the contender's position: its torchft ports


class Runner:
    """One contender's wrapper, inner optimizer and schedule, alive for a whole seed."""

    def __init__(self, c: Contender, module: Any, s: Settings) -> None:
        import torch

        self.c, self.module, self.model = c, module, module
        self.adamw = torch.optim.AdamW(module.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        factor = lambda step: lr_factor(step, s.warmup, s.total_steps)  # noqa: E731
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.adamw, factor)
        self.opt: Any = self.adamw
        self._closers: list[Any] = []
        timeout = timedelta(seconds=s.timeout_s)
        if c.family == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(module, init_sync=False)
        elif c.family == "localsgd":
            from torch.distributed.algorithms.model_averaging.averagers import (
                PeriodicModelAverager,
            )
            from torch.distributed.optim import PostLocalSGDOptimizer

            averager = PeriodicModelAverager(period=c.period, warmup_steps=0)
            self.opt = PostLocalSGDOptimizer(self.adamw, averager)
        elif c.family == "gossip":
            import gossipgrad
            from gossipgrad.options import WIRE_DTYPES

            o = dict(c.gossip)
            if "wire_dtype" in o:
                o["wire_dtype"] = WIRE_DTYPES[o["wire_dtype"]]
            self.model = gossipgrad.wrap(module, "gossip", init_sync=False, timeout=timeout, **o)
            self._closers.append(self.model.close)
        else:
            self._diloco(s, timeout)

    def _diloco(self, s: Settings, timeout: timedelta) -> None:
        """torchft's DiLoCo (collective): a replica group per host, the lighthouse on host 0."""
        from _torchft_diloco import TorchftDiLoCo

        c = self.c
        self.diloco = TorchftDiLoCo(
            fragments(self.module, c.fragments),
            self.adamw,
            sync_every=c.period,
            outer=c.outer or (0.7, 0.9),
            index=s.index,
            name=c.name,
            timeout=timeout,
            delay=c.delay,
            alpha=c.alpha,
        )
        self._closers.append(self.diloco.close)

    def fragment_numels(self) -> list[int]:
        count = self.c.fragments if self.c.family == "diloco" else 1
        parts = fragments(self.module, count) if count > 1 else [self.module]
        return [sum(p.numel() for p in part.parameters()) for part in parts]

    def step(self, x: Any, y: Any) -> float:
        """One training step (the timed unit); the training loss."""
        from gossipgrad.train.models import task_loss

        loss = task_loss(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.schedule.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def finish(self) -> None:
        """Complete what is in flight (inside the timed segment, before evaluating)."""
        if self.c.family == "gossip":
            self.model.flush()
        elif self.c.family == "diloco":
            self.diloco.finish()

    def export(self, scratch: Any) -> Any:
        """The model this contender exports (collective): DDP's replica, else the exact
        average of the replicas."""
        import torch
        import torch.distributed as dist

        if self.c.family == "ddp":
            return self.module
        if self.c.family == "gossip":
            self.model.average_replicas(into=scratch)
            return scratch
        flat = torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat, scratch.parameters())
        return scratch

    def close(self) -> None:
        """Remove the hooks, stop torchft's servers (collective)."""
        for close in self._closers:
            close()
