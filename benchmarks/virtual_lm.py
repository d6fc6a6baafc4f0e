"""A character language model on the virtual cluster: gossip with and without the outer step,
against all-reduce and DiLoCo, in steps.

    python benchmarks/virtual_lm.py

(``--p 64 16 --steps 300 --batch 8``, the defaults: the run whose table is in the results file;
about 25 CPU-minutes, single-threaded; ``--quick`` runs a few steps of everything.)

The model: ``gossipgrad.train.models`` ``gpt`` with 2 layers of width 32, 4 heads, block 32 (33k
parameters), on ``pytext`` (``gossipgrad.train.data``: the Python standard library's sources,
300 KB, as characters: the 95 byte values that occur, renumbered; the last 10% held out). Every
replica trains on its own random windows, ``--batch`` (8) of 32 characters per step, with AdamW
(lr 3e-3 after 20 warmup steps, cosine to 3e-4, weight decay 0.01).
Contenders, each from the same initial model, the same batches and the same schedule:

- ``all-reduce``: gradients averaged over the replicas every step (one model on the global
  batch, which is the same computation);
- ``diloco H``: H AdamW steps on each replica, then the mean pseudo-gradient ``phi - mean(x)``
  (an exact all-reduce) and an outer ``torch.optim.SGD`` step on ``phi`` (Nesterov, lr 0.7,
  momentum 0.9, or ``(lr, mu)`` as named), every replica restarting from ``phi`` (DiLoCo);
- ``local SGD H``: the same with outer lr 1 and no momentum (``phi`` becomes the mean);
- ``gossip H``: ``VirtualCluster(gossip_every=H)``, overlapped (the engine's default);
- ``gossip+outer H (lr, mu[, sync])``: the same with ``outer_lr``, ``outer_momentum``;
  overlapped the outer step lands one exchange late, ``sync`` applies it at once;
- ``gossip 2, int8 wire``: every 2 steps with ``wire_dtype=torch.int8`` (about the bytes per
  step of gossip every 8 in float32).

For speed the replicas' parameters are views of tensors stacked over the replicas: one batched
forward and backward (``_forward``, checked against the model's own forward when the run
starts) and one AdamW over the stacked tensors (the same elementwise update as one AdamW per
replica); the virtual cluster's engines then end each step (``VirtualCluster.step_ended``) and
mix the replicas in place, as they do in ``train_step``. Every ``--eval-every`` steps the mean of
the replicas (the model a run exports) is evaluated on 128 held-out windows. Printed: per p, the
final validation loss (bits per character), the first evaluated step at which each contender
reaches all-reduce's final loss, and (rows with a period H) DiLoCo H's final loss. ``--out``
(default ``benchmarks/results/virtual_lm.json``) holds every curve.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gossipgrad.sim.virtual import VirtualCluster
from gossipgrad.train.data import DatasetInfo, load_dataset
from gossipgrad.train.models import build_model

BLOCK, LR, WARMUP = 32, 3e-3, 20
OUTER = (0.7, 0.9)  # DiLoCo's outer lr and Nesterov momentum


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "allreduce", "diloco", "gossip"
    every: int = 1
    outer: tuple[float, float] | None = None
    sync: bool = False
    options: tuple[tuple[str, Any], ...] = ()  # more GossipOptions


def contenders() -> list[Contender]:
    out = [Contender("all-reduce", "allreduce")]
    for h in (8, 32):
        out += [
            Contender(f"diloco {h}", "diloco", h, OUTER),
            Contender(f"diloco {h} (1.0, 0.5)", "diloco", h, (1.0, 0.5)),
            Contender(f"local SGD {h}", "diloco", h, (1.0, 0.0)),
            Contender(f"gossip {h}", "gossip", h),
            Contender(f"gossip+outer {h} (0.7, 0.9, sync)", "gossip", h, OUTER, sync=True),
            Contender(f"gossip+outer {h} (1.0, 0.5, sync)", "gossip", h, (1.0, 0.5), sync=True),
            Contender(f"gossip+outer {h} (1.0, 0.5)", "gossip", h, (1.0, 0.5)),
        ]
    int8 = (("wire_dtype", torch.int8),)
    return [*out, Contender("gossip 2, int8 wire", "gossip", 2, options=int8)]


# --- the model, stacked over the replicas -------------------------------------------------------


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per replica ``x @ w.T + b``: x ``[p, n, in]``, w ``[p, out, in]``, b ``[p, out]``."""
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def _norm(x: torch.Tensor, params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    y = F.layer_norm(x, x.shape[-1:])
    return y * params[f"{name}.weight"].unsqueeze(1) + params[f"{name}.bias"].unsqueeze(1)


def _forward(params: dict[str, torch.Tensor], idx: torch.Tensor, heads: int) -> torch.Tensor:
    """``gossipgrad.train.models.GPT.forward`` for ``p`` replicas at once: ``idx`` ``[p, B, T]``
    -> logits ``[p, B, T, vocab]``; ``params[name]`` is the replicas' ``name`` stacked."""
    p, batch, time = idx.shape
    rows = torch.arange(p).view(p, 1, 1)
    x = params["tokens.weight"][rows, idx] + params["positions.weight"][:, None, :time]
    d = x.shape[-1]
    x = x.reshape(p, batch * time, d)
    layers = 1 + max(int(n.split(".")[1]) for n in params if n.startswith("blocks."))
    for i in range(layers):
        pre = f"blocks.{i}"
        qkv = _linear(_norm(x, params, f"{pre}.ln1"), *_wb(params, f"{pre}.attn.qkv"))
        q, k, v = qkv.view(p * batch, time, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(p, batch * time, d)
        x = x + _linear(y, *_wb(params, f"{pre}.attn.proj"))
        h = F.gelu(_linear(_norm(x, params, f"{pre}.ln2"), *_wb(params, f"{pre}.mlp.0")))
        x = x + _linear(h, *_wb(params, f"{pre}.mlp.2"))
    logits = _linear(_norm(x, params, "ln_f"), *_wb(params, "head"))
    return logits.view(p, batch, time, -1)


def _wb(params: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return params[f"{name}.weight"], params[f"{name}.bias"]


def _loss(params: dict[str, torch.Tensor], idx: torch.Tensor, heads: int) -> torch.Tensor:
    """The sum over replicas of each replica's mean cross-entropy (so each replica's gradient is
    that of its own loss); idx ``[p, B, T + 1]``."""
    logits = _forward(params, idx[..., :-1], heads)
    ce = F.cross_entropy(logits.flatten(0, 2), idx[..., 1:].flatten(), reduction="none")
    return ce.view(idx.shape[0], -1).mean(1).sum()


def _stack(model: nn.Module, p: int) -> dict[str, torch.Tensor]:
    return {
        n: t.detach().unsqueeze(0).repeat(p, *([1] * t.dim())).requires_grad_()
        for n, t in model.named_parameters()
    }


def _characters(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Bytes renumbered over the values that occur (a character vocabulary), as int64 ids."""
    present = torch.unique(torch.cat([train, test])).long()
    table = torch.zeros(256, dtype=torch.long)
    table[present] = torch.arange(len(present))
    return table[train.long()], table[test.long()], len(present)


def _check_forward(model: nn.Module, heads: int, tokens: torch.Tensor) -> None:
    idx = tokens[: 2 * BLOCK].long().view(1, 2, BLOCK)
    with torch.no_grad():
        mine = _forward(_stack(model, 1), idx, heads)[0]
        theirs = model(idx[0])
    err = (mine - theirs).abs().max().item()
    if err > 1e-4:
        raise RuntimeError(f"the stacked forward differs from the model's by {err:.3g}")


# --- one run ------------------------------------------------------------------------------------


def _lr(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batches(tokens: torch.Tensor, p: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """``[p, batch, BLOCK + 1]`` windows, the same for every contender at ``(p, step, seed)``."""
    g = torch.Generator().manual_seed((seed * 1000 + p) * 1_000_000 + step)
    starts = torch.randint(0, len(tokens) - BLOCK - 1, (p, batch), generator=g)
    return tokens[starts[..., None] + torch.arange(BLOCK + 1)].long()


@torch.no_grad()
def _evaluate(params: dict[str, torch.Tensor], val: torch.Tensor, heads: int) -> float:
    mean = {n: t.mean(0, keepdim=True) for n, t in params.items()}
    return _loss(mean, val.unsqueeze(0), heads).item() / math.log(2)  # bits per character


def run(
    c: Contender,
    model: nn.Module,
    heads: int,
    p: int,
    steps: int,
    data: tuple[torch.Tensor, torch.Tensor],
    batch: int,
    eval_every: int,
    seed: int,
) -> dict[str, Any]:
    tokens, val = data
    width = 1 if c.kind == "allreduce" else p  # all-reduce: one model on the global batch
    params = _stack(model, width)
    inner = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=0.01)
    outer = slow = cluster = None
    if c.kind == "diloco":
        slow = [t.detach()[0].clone().requires_grad_() for t in params.values()]
        lr, mu = c.outer or OUTER
        outer = torch.optim.SGD(slow, lr=lr, momentum=mu, nesterov=mu > 0)
    elif c.kind == "gossip":
        options: dict[str, Any] = {"gossip_every": c.every, "sync": c.sync, "seed": seed}
        options.update(c.options)
        if c.outer is not None:
            options.update(outer_lr=c.outer[0], outer_momentum=c.outer[1])
        cluster = VirtualCluster(model, p, None, **options)
        for i, replica in enumerate(cluster.replicas):  # the replicas are views of the stack
            for name, prm in replica.named_parameters():
                prm.data = params[name].detach()[i]
    curve: list[tuple[int, float]] = [(0, _evaluate(params, val, heads))]
    began = time.perf_counter()
    for step in range(steps):
        idx = _batches(tokens, p, batch, step, seed)
        if c.kind == "allreduce":
            idx = idx.reshape(1, p * batch, BLOCK + 1)
        for group in inner.param_groups:
            group["lr"] = _lr(step, steps)
        _loss(params, idx, heads).backward()
        inner.step()
        inner.zero_grad()
        if cluster is not None:
            cluster.step_ended()
        elif outer is not None and slow is not None and (step + 1) % c.every == 0:
            _diloco_step(params, slow, outer)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, _evaluate(params, val, heads)))
    return {"curve": curve, "seconds": time.perf_counter() - began, "every": c.every}


@torch.no_grad()
def _diloco_step(
    params: dict[str, torch.Tensor], slow: list[torch.Tensor], outer: torch.optim.Optimizer
) -> None:
    """The mean pseudo-gradient, an outer step, and every replica restarts from ``phi``."""
    for phi, x in zip(slow, params.values(), strict=True):
        phi.grad = phi - x.mean(0)
    outer.step()
    for phi, x in zip(slow, params.values(), strict=True):
        x.copy_(phi.expand_as(x))


# --- the table ------------------------------------------------------------------------------------


def reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, loss in curve if loss <= target), None)


def table(p: int, results: dict[str, dict[str, Any]]) -> str:
    target = results["all-reduce"]["curve"][-1][1]
    lines = [
        f"p = {p}: validation loss in bits per character (all-reduce's final: {target:.3f})",
        "",
        "| contender | final loss | steps to all-reduce's loss | steps to DiLoCo H's loss "
        "| seconds |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        diloco = results.get(f"diloco {r['every']}") if r["every"] > 1 else None
        mark = "-" if diloco is None else _steps(reach(r["curve"], diloco["curve"][-1][1]))
        lines.append(
            f"| {name} | {r['curve'][-1][1]:.3f} | {_steps(reach(r['curve'], target))} "
            f"| {mark} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def _steps(hit: int | None) -> str:
    return "not reached" if hit is None else str(hit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--p", type=int, nargs="+", default=[64, 16])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8, help="windows per replica and step")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps of everything")
    parser.add_argument("--out", default="benchmarks/results/virtual_lm.json")
    args = parser.parse_args()
    steps, eval_every = (12, 4) if args.quick else (args.steps, args.eval_every)
    torch.set_num_threads(1)  # the fastest on a shared machine
    train, test, _ = load_dataset("pytext", block_size=BLOCK, max_bytes=300_000)
    train_ids, test_ids, vocab = _characters(train.tokens, test.tokens)
    info = DatasetInfo("pytext-characters", "lm", (BLOCK,), vocab)
    torch.manual_seed(args.seed)
    heads = 4
    model = build_model("gpt", info, n_layer=2, n_head=heads, d_model=32)
    _check_forward(model, heads, test_ids)
    windows = len(test_ids) // (BLOCK + 1)
    val = test_ids[: min(128, windows) * (BLOCK + 1)].view(-1, BLOCK + 1)
    data = (train_ids, val)
    report: dict[str, Any] = {
        "command": "python benchmarks/virtual_lm.py" + (" --quick" if args.quick else ""),
        "setup": {
            "model": "gpt n_layer=2 d_model=32 n_head=4 block 32",
            "parameters": sum(t.numel() for t in model.parameters()),
            "data": f"pytext 300 KB as {vocab} characters, 10% held out; 128 windows of 33",
            "batch_per_replica": args.batch,
            "inner": f"AdamW lr {LR} warmup {WARMUP} cosine to {LR / 10}, weight decay 0.01",
            "steps": steps,
            "eval_every": eval_every,
            "seed": args.seed,
        },
        "runs": {},
    }
    for p in args.p:
        results: dict[str, dict[str, Any]] = {}
        for c in contenders():
            results[c.name] = run(
                c, model, heads, p, steps, data, args.batch, eval_every, args.seed
            )
            final = results[c.name]["curve"][-1][1]
            print(f"p={p} {c.name}: {final:.3f} ({results[c.name]['seconds']:.0f} s)", flush=True)
        report["runs"][str(p)] = results
        print("\n" + table(p, results) + "\n", flush=True)
    if not args.quick:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
