"""Stragglers on real gloo ranks: DDP, gossip, bounded staleness and balancing, one slow rank.

    python benchmarks/stragglers.py --procs 4 8 --out benchmarks/results/stragglers.json

For each ``--procs`` p and ``--scenarios`` (``none``; ``slow2`` / ``slow4``: the last rank 2x / 4x
slower; ``random``: every rank, every step, independently with probability ``--random-q`` 4x
slower, i.e. an extra 3x), one run of p forked ranks (gloo over a FileStore, one thread each)
per ``--contenders``: ``ddp`` (``wrap(..., "allreduce")``, torch DDP), ``gossip`` (as today),
``gossip-stale`` (``max_staleness=--staleness``), ``gossip-balance`` (the speed-balanced batch
sampler) and ``gossip-both``. A contender whose API this checkout lacks is skipped (and said so).

Slowness is emulated without CPU (p ranks share few cores): the model's training forward sleeps
``factor * --per-sample-ms * len(batch)`` on top of its real compute. The sleep is a fixed cost
per sample, on every rank, multiplied by the rank's factor of that step; it dominates the real
compute (a small MLP on the teacher task of ``benchmarks/virtual_convergence.py``), so the
machine's load matters little, and a rank given fewer samples by balancing really is faster.

Measured on every rank, without barriers: each epoch's wall time on the rank's own clock; the
table gives the slowest rank's (when the last rank finished), for the first epoch, the median
of the others ("steady") and the mean of the last two ("last 2": balancing needs an epoch to
measure speeds and one to move samples, then converges over a few more), over the same
contender's no-straggler run; then the test accuracy of the averaged model and the consensus
distance before averaging. A second table puts the cost model's straggler projection
(``costmodel.step_time`` with a ``Stragglers`` spec that draws exactly this scenario's factors;
compute = the sleep, overhead calibrated from the contender's no-straggler run) beside the
measured step times.
Results are kept in ``--out``; a run already there with the same settings is not run again.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: forked ranks must not inherit OpenMP

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402, F401 - DDP imports it on first use: once here, not per rank
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DistributedSampler, TensorDataset  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import virtual_convergence as vc  # noqa: E402
from _forked import run_forked  # noqa: E402

import gossipgrad  # noqa: E402
import gossipgrad.allreduce  # noqa: E402, F401 - the engines, imported before the ranks fork
import gossipgrad.gossip  # noqa: E402, F401
from gossipgrad.options import GossipOptions  # noqa: E402
from gossipgrad.sampler import GossipShuffleSampler  # noqa: E402
from gossipgrad.sim import costmodel  # noqa: E402
from gossipgrad.train.models import build_model  # noqa: E402

SCENARIOS: tuple[str, ...] = ("none", "slow2", "slow4", "random")
# name -> (label, algo, uses max_staleness, balanced batch sampler)
CONTENDERS: dict[str, tuple[str, str, bool, bool]] = {
    "ddp": ("DDP", "allreduce", False, False),
    "gossip": ("gossip", "gossip", False, False),
    "gossip-stale": ("gossip + staleness", "gossip", True, False),
    "gossip-balance": ("gossip + balancing", "gossip", False, True),
    "gossip-both": ("gossip + staleness + balancing", "gossip", True, True),
}
RANDOM_EXTRA = 3.0  # a random slowdown adds 3x the step's compute (factor 4)
LOOPBACK = costmodel.Network(latency=100e-6, bandwidth=1e9)  # communication is small here


def available() -> dict[str, str]:
    """The contenders this checkout cannot run, with why."""
    missing = {}
    if "max_staleness" not in {f.name for f in dataclasses.fields(GossipOptions)}:
        missing["staleness"] = "GossipOptions has no max_staleness"
    if not hasattr(GossipShuffleSampler, "batch_sampler"):
        missing["balance"] = "GossipShuffleSampler has no batch_sampler"
    out = {}
    for name, (_, _, stale, balance) in CONTENDERS.items():
        why = [
            missing[k]
            for k, on in (("staleness", stale), ("balance", balance))
            if on and k in missing
        ]
        if why:
            out[name] = "; ".join(why)
    return out


def factors(scenario: str, world: int) -> list[float]:
    """The fixed slowdown factor of each rank (``random``: 1, the draws come on top)."""
    slow = {"slow2": 2.0, "slow4": 4.0}.get(scenario, 1.0)
    return [1.0] * (world - 1) + [slow]


class Slowed(nn.Module):
    """``net`` whose training forward also sleeps ``factor * per_sample_s * len(x)``; ``factor``
    is the rank's, times ``1 + RANDOM_EXTRA`` with probability ``q`` each step. Counts the time
    spent in its training forwards (``busy_s``) and the samples seen."""

    def __init__(
        self, net: nn.Module, per_sample_s: float, factor: float, q: float, seed: int
    ) -> None:
        super().__init__()
        self.net = net
        self.per_sample_s, self.factor, self.q = per_sample_s, factor, q
        self.rng = np.random.default_rng(seed)
        self.busy_s = 0.0
        self.slow_steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self.net(x)
        start = time.perf_counter()
        out = self.net(x)
        factor = self.factor
        if self.q > 0 and self.rng.random() < self.q:
            factor *= 1.0 + RANDOM_EXTRA
            self.slow_steps += 1
        time.sleep(factor * self.per_sample_s * len(x))
        self.busy_s += time.perf_counter() - start
        return out


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def _rank(rank: int, world: int, args: argparse.Namespace, scenario: str, name: str) -> dict:
    _, algo, stale, balance = CONTENDERS[name]
    data = vc._teacher(args.samples, args.seed)
    torch.manual_seed(args.seed)
    net = build_model("mlp", data.info, hidden=args.hidden)
    q = args.random_q if scenario == "random" else 0.0
    module = Slowed(net, args.per_sample_ms / 1e3, factors(scenario, world)[rank], q,
                    seed=args.seed * 1000 + rank)  # fmt: skip
    options: dict[str, Any] = {"seed": args.seed} if algo == "gossip" else {}
    if stale:
        options["max_staleness"] = args.staleness
    model = gossipgrad.wrap(module, algo, **options)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    dataset = TensorDataset(data.x_train, data.y_train)
    if algo == "allreduce":
        sampler: Any = DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed)
    elif balance:
        sampler = GossipShuffleSampler(
            dataset, balance=True, seed=args.seed, shuffle_fraction=args.shuffle
        )
        batches = sampler.batch_sampler(args.batch)
    else:
        sampler = GossipShuffleSampler(dataset, seed=args.seed, shuffle_fraction=args.shuffle)

    def waited() -> float:
        return float(getattr(model, "wait_time_s", 0.0))

    has_wait = hasattr(model, "wait_time_s")
    epochs, steps, samples = [], [], []
    dist.barrier()
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        if balance:
            batches.set_epoch(epoch)
            epoch_batches: Any = batches
        else:
            sampler.set_epoch(epoch)
            epoch_batches = _chunks(list(sampler), args.batch)
        start = time.perf_counter()
        n_steps = n_samples = 0
        for ids in epoch_batches:
            i = torch.as_tensor(list(ids), dtype=torch.long)
            s0, w0, b0 = time.perf_counter(), waited(), module.busy_s
            loss = F.cross_entropy(model(data.x_train[i]), data.y_train[i])
            if balance:
                loss = loss * batches.weight(len(i))
            loss.backward()
            opt.step()
            opt.zero_grad()
            if balance:
                took = time.perf_counter() - s0
                busy = took - (waited() - w0) if has_wait else module.busy_s - b0
                sampler.report_speed(len(i), busy)
            n_steps += 1
            n_samples += len(i)
        epochs.append(time.perf_counter() - start)
        steps.append(n_steps)
        samples.append(n_samples)
    train_s = time.perf_counter() - t0
    consensus = model.consensus_distance()
    model.average_replicas()
    if algo == "gossip":
        sampler.flush()
    return {
        "epoch_s": epochs,
        "steps": steps,
        "samples": samples,
        "train_s": train_s,
        "wait_s": waited() if has_wait else None,
        "busy_s": module.busy_s,
        "random_slow_steps": module.slow_steps,
        "accuracy": vc._accuracy(net, data),
        "consensus": consensus,
    }


def run(args: argparse.Namespace, world: int, scenario: str, name: str) -> list[dict]:
    """One run on ``world`` forked gloo ranks: each rank's result."""
    return run_forked(_rank, world, (args, scenario, name), args.timeout)


def summarize(ranks: list[dict]) -> dict[str, Any]:
    """One row's measurements from the ranks' results (times: the slowest rank's)."""
    epoch_s = [max(r["epoch_s"][e] for r in ranks) for e in range(len(ranks[0]["epoch_s"]))]
    later = epoch_s[1:] or epoch_s
    steps = sum(ranks[0]["steps"])
    return {
        "epoch_s": epoch_s,
        "first_epoch_s": epoch_s[0],
        "steady_epoch_s": statistics.median(later),
        "train_s": max(r["train_s"] for r in ranks),
        "steps": steps,
        "step_s": max(r["train_s"] for r in ranks) / steps,
        "steady_step_s": statistics.median(later) / ranks[0]["steps"][-1],
        "last_epoch_samples": [r["samples"][-1] for r in ranks],
        "wait_s": [r["wait_s"] for r in ranks],
        "busy_s": [r["busy_s"] for r in ranks],
        "random_slow_steps": sum(r["random_slow_steps"] for r in ranks),
        "accuracy": ranks[0]["accuracy"],
        "consensus": ranks[0]["consensus"],
    }


# -- the cost model's projection -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScenarioStragglers(costmodel.Stragglers):
    """The cost model's straggler spec drawing this benchmark's factors: fixed per rank
    (``fixed``), times ``1 + extra`` with probability ``q`` per rank and step."""

    fixed: tuple[float, ...] = ()
    q: float = 0.0
    extra: float = RANDOM_EXTRA

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        out = np.broadcast_to(np.asarray(self.fixed, dtype=float), shape).copy()
        if self.q > 0:
            out *= 1.0 + self.extra * (rng.random(shape) < self.q)
        return out


def spec(scenario: str, world: int, q: float, seed: int) -> ScenarioStragglers:
    fixed = tuple(factors(scenario, world))
    mean = np.mean(fixed) * (1 + RANDOM_EXTRA * q)
    spread = float(np.std(fixed) + RANDOM_EXTRA * math.sqrt(q * (1 - q)))  # > 0: simulated
    return ScenarioStragglers(spread=max(spread, 1e-9) / mean, steps=400, seed=seed,
                              fixed=fixed, q=q)  # fmt: skip


def projection(
    row: dict, base: dict, args: argparse.Namespace, model_bytes: float
) -> dict[str, float]:
    """Projected step time of ``row`` (a straggler scenario) from ``base`` (the same
    contender's no-straggler run): compute = the sleep of a full batch, the rest of the measured
    no-straggler step is the network's per-step overhead. Balanced contenders: the ideal, every
    rank's compute scaled by p / sum(1 / factor)."""
    world, scenario = row["procs"], row["scenario"]
    compute = args.per_sample_ms / 1e3 * args.batch
    overhead = max(0.0, base["steady_step_s"] - compute)
    net = dataclasses.replace(LOOPBACK, overhead=overhead)
    work = costmodel.Workload(compute=compute, model_bytes=model_bytes)
    algorithm = "ddp" if CONTENDERS[row["contender"]][1] == "allreduce" else "gossip-overlap"
    q = args.random_q if scenario == "random" else 0.0
    s = spec(scenario, world, q, args.seed)
    out = {"projected_step_s": costmodel.step_time(algorithm, world, net, work, stragglers=s)}
    if CONTENDERS[row["contender"]][3]:
        f = np.asarray(factors(scenario, world)) * (1 + RANDOM_EXTRA * q)
        balanced = costmodel.Workload(compute * world / float(np.sum(1 / f)), model_bytes)
        out["projected_step_s"] = costmodel.step_time(algorithm, world, net, balanced)
    out["projected_epoch_s"] = out["projected_step_s"] * row["steps"] / args.epochs
    return out


# -- the tables ----------------------------------------------------------------------------------


def tables(rows: list[dict], args: argparse.Namespace) -> str:
    by = {(r["procs"], r["scenario"], r["contender"]): r for r in rows}
    lines = [
        f"{args.epochs} epochs of {args.samples} teacher samples, batch {args.batch}/rank, "
        f"{args.per_sample_ms:g} ms/sample emulated (x the rank's factor), staleness "
        f"S={args.staleness}, random: q={args.random_q:g} per rank-step of 4x; epoch times of "
        "the slowest rank (first; steady = median of the others; last 2 = mean of the last two, "
        "once balancing has converged), x the same contender's no-straggler steady epoch; last "
        "rank's samples: its share of the last epoch's (the slow one in slow2/slow4)\n",
        "| p | scenario | contender | epoch s (first) | epoch s (steady) | epoch s (last 2) | "
        "no-straggler s | x no-straggler (steady) | x (last 2) | accuracy | consensus | "
        "last rank's samples |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = by.get((r["procs"], "none", r["contender"]))
        ref = base["steady_epoch_s"] if base else math.nan
        last = _last_two(r)
        lines.append(
            f"| {r['procs']} | {r['scenario']} | {CONTENDERS[r['contender']][0]} | "
            f"{r['first_epoch_s']:.2f} | {r['steady_epoch_s']:.2f} | {last:.2f} | {ref:.2f} | "
            f"{r['steady_epoch_s'] / ref:.2f} | {last / ref:.2f} | {r['accuracy']:.3f} | "
            f"{r['consensus']:.4f} | "
            f"{r['last_epoch_samples'][-1] / sum(r['last_epoch_samples']):.3f} |"
        )
    proj = [r for r in rows if "projected_step_s" in r]
    if proj:
        lines += [
            "\nCost model (costmodel.step_time with this scenario's Stragglers; compute = the "
            "sleep, overhead from the no-straggler run; balancing: the ideal p / sum(1/f))\n",
            "| p | scenario | contender | measured step ms | projected step ms | error |",
            "|---|---|---|---|---|---|",
        ]
        for r in proj:
            m, pr = r["steady_step_s"], r["projected_step_s"]
            lines.append(
                f"| {r['procs']} | {r['scenario']} | {CONTENDERS[r['contender']][0]} | "
                f"{1e3 * m:.1f} | {1e3 * pr:.1f} | {100 * (pr - m) / m:+.0f}% |"
            )
    lines.append("")
    for p in sorted({r["procs"] for r in rows}):
        for label, measure in (("steady", _steady), ("last 2 epochs", _last_two)):
            ratios = {}
            for name in CONTENDERS:
                row, base = by.get((p, "slow2", name)), by.get((p, "none", name))
                if row and base:
                    ratios[name] = measure(row) / base["steady_epoch_s"]
            gossip = {k: v for k, v in ratios.items() if k != "ddp"}
            if gossip:
                best = min(gossip, key=gossip.get)  # type: ignore[arg-type]
                ddp = f", DDP {ratios['ddp']:.2f}" if "ddp" in ratios else ""
                lines.append(
                    f"p={p} one 2x straggler ({label}): best gossip epoch / no-straggler epoch = "
                    f"{gossip[best]:.2f} ({CONTENDERS[best][0]}; target <= 1.3, ideal "
                    f"{p / (p - 0.5):.2f}{ddp})"
                )
    return "\n".join(lines)


def _steady(row: dict) -> float:
    return float(row["steady_epoch_s"])


def _last_two(row: dict) -> float:
    """The mean of the last two epochs (balancing has converged by then)."""
    return statistics.fmean(row["epoch_s"][-2:])


def _loadavg() -> str:
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        return f.read().strip()
    return ""


def main() -> None:
    args = _parse()
    torch.set_num_threads(1)
    missing = available()
    contenders = [c for c in args.contenders if c not in missing]
    for name in args.contenders:
        if name in missing:
            print(f"skipped {name}: {missing[name]}", flush=True)
    stored: list[dict] = []
    if args.out and args.out.exists():
        stored = json.loads(args.out.read_text()).get("runs", [])
    data = vc._teacher(64, args.seed)
    model_bytes = float(
        sum(p.numel() * 4 for p in build_model("mlp", data.info, hidden=args.hidden).parameters())
    )
    loads = [_loadavg()]
    rows = []
    scenarios = sorted(set(args.scenarios) | {"none"}, key=SCENARIOS.index)
    for world in args.procs:
        for scenario in scenarios:
            for name in contenders:
                ident = {
                    "procs": world,
                    "scenario": scenario,
                    "contender": name,
                    "samples": args.samples,
                    "epochs": args.epochs,
                    "batch": args.batch,
                    "hidden": args.hidden,
                    "lr": args.lr,
                    "shuffle": args.shuffle,
                    "per_sample_ms": args.per_sample_ms,
                    "random_q": args.random_q,
                    "staleness": args.staleness if CONTENDERS[name][2] else None,
                    "seed": args.seed,
                }
                row = next(
                    (r for r in stored if all(r.get(k) == v for k, v in ident.items())), None
                )
                if row is None:
                    start = time.perf_counter()
                    row = {**ident, **summarize(run(args, world, scenario, name))}
                    row["loadavg"] = _loadavg()
                    print(
                        f"p={world} {scenario:6s} {name:15s} epoch {row['first_epoch_s']:.2f} /"
                        f" {row['steady_epoch_s']:.2f} s, accuracy {row['accuracy']:.3f} "
                        f"({time.perf_counter() - start:.0f} s, load {row['loadavg']})",
                        flush=True,
                    )
                    stored = [r for r in stored if not all(r.get(k) == v for k, v in ident.items())]
                    stored.append(row)
                    if args.out:
                        _write(args, stored, missing)
                rows.append(row)
    loads.append(_loadavg())
    by = {(r["procs"], r["scenario"], r["contender"]): r for r in rows}
    for r in rows:
        base = by.get((r["procs"], "none", r["contender"]))
        if r["scenario"] != "none" and base:
            r.update(projection(r, base, args, model_bytes))
    if args.out:
        _write(args, stored, missing, loads)
    print()
    print(tables(rows, args))
    print(f"\nload average: start {loads[0]}; end {loads[-1]}")


def _write(
    args: argparse.Namespace, stored: list[dict], missing: dict, loads: list | None = None
) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "benchmark": "benchmarks/stragglers.py",
        "gossipgrad_file": gossipgrad.__file__,
        "skipped": missing,
    }
    if loads:
        doc["loadavg"] = loads
    doc["runs"] = stored
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    ap.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--samples", type=int, default=6144, help="teacher training samples")
    ap.add_argument("--batch", type=int, default=16, help="per rank (balancing: the mean)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--shuffle", type=float, default=0.25, help="gossip shuffle_fraction")
    ap.add_argument("--staleness", type=int, default=4, help="max_staleness S")
    ap.add_argument("--per-sample-ms", type=float, default=2.0, help="emulated cost per sample")
    ap.add_argument("--random-q", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/stragglers.json"))
    ap.add_argument("--quick", action="store_true", help="smoke test: p=2, 2 short epochs")
    args = ap.parse_args()
    if args.quick:
        args.procs, args.epochs, args.samples = [2], 2, 128
        args.per_sample_ms = 0.5
        if args.scenarios == list(SCENARIOS):
            args.scenarios = ["none", "slow2"]
    return args


if __name__ == "__main__":
    main()
