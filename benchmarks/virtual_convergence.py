"""Accuracy against the number of replicas p: all-reduce and gossip variants, simulated.

    python benchmarks/virtual_convergence.py
    python benchmarks/virtual_convergence.py --partition label-skew --shuffle 0.25
    python benchmarks/virtual_convergence.py --data teacher --schedule hypercube

The convergence table (README; 3 seeds, three data settings, the accuracy-at-scale variants):

    python benchmarks/virtual_convergence.py --data teacher --teacher-samples 60000 --epochs 4 \\
        --batch 16 --p 16 64 128 --settings iid label-skew label-skew:0.25 \\
        --variants allreduce overlapped pga tracking --seeds 0 1 2 --optimizer sgd \\
        --out benchmarks/results/virtual_convergence.json

Runs ``gossipgrad.sim.virtual.VirtualCluster`` (p replicas in one process, mixed by the engine's own
schedule, cadence, tracking and mixing code) for p in ``--p`` (default 4 8 16 32 64) and the
``--variants`` (default the first four):

- ``allreduce``: gradients averaged over all replicas every step (what DDP computes);
- ``params``: parameter gossip, synchronous (``GossipDataParallel(sync=True)``);
- ``overlapped``: parameter gossip with staleness 1 (the engine's default; "gossip" in the README);
- ``gradients``: gradients averaged with the step's partner only (``mode="gradients"``);
- ``pga``: overlapped gossip and an exact average every ``--pga-every`` steps (Gossip-PGA,
  ``average_every``);
- ``pga-state``: ``pga``, and the periodic average also averages the optimizers' state (momentum,
  Adam's moments; an experiment: the engine's ``average_every`` averages the replicas only);
- ``tracking``: overlapped gossip with gradient tracking (``tracking=True``: the optimizer steps
  along the tracked average gradient);
- ``tracking-pga``: both;
- ``tracking-pga-y``: both, and the periodic average also averages the trackers (so that step
  runs on the exact mean gradient; an experiment: the engine's ``average_every`` averages the
  replicas only).

``--gossip-every K`` applies to every parameter-gossip variant. Every run: the same initial MLP
(``gossipgrad.train.models`` ``mlp``), the same ``--optimizer`` (``sgd``: SGD with momentum;
``adamw``; ``muon``: ``torch.optim.Muon`` on the 2-D weights and AdamW on the rest), the same
``--epochs`` and per-replica ``--batch`` (so a larger p takes fewer, larger global steps), data
split into one shard per replica (``--settings``: ``iid``, ``label-skew`` or ``label-skew:F``, a
gossip shuffle of a fraction F of each shard per epoch; default ``--partition`` and ``--shuffle``).
Data:
scikit-learn's bundled digits (``gossipgrad.train.data.load_dataset("digits")``, 1437 train / 360
test images) or ``teacher``: 10-class labels from a random two-layer teacher network on Gaussian
inputs (``--teacher-samples``). A seed (``--seeds``) sets the data, the initial model, the batches
and the schedule's permutations.

Printed: per setting, a markdown table of the test accuracy of the averaged model (the exact mean
of the replicas, what a run exports), mean +- standard deviation over seeds, with the consensus
distance ``RMS ||x_i - mean|| / ||mean||`` at the end; one of the mean test accuracy of the
individual replicas; with several seeds, one of each variant's gap to all-reduce (paired by seed,
in points). ``--out`` writes every run to a JSON file (merged with what it holds: runs already there
with the same configuration are not run again, so an interrupted grid resumes). Single-threaded by
default (``--threads``); one run of the teacher task takes about 10 s of CPU.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gossipgrad.schedule import SCHEDULES
from gossipgrad.sim.virtual import PARTITIONS, VirtualCluster, replica_batches
from gossipgrad.train.data import DatasetInfo, load_dataset
from gossipgrad.train.models import build_model

LEGACY = ("allreduce", "params", "overlapped", "gradients")

# key: (table label, VirtualCluster keywords; "PGA" stands for --pga-every)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "allreduce": ("all-reduce", {"algo": "allreduce"}),
    "params": ("gossip params", {"algo": "gossip", "mode": "params", "sync": True}),
    "overlapped": ("gossip overlapped", {"algo": "gossip", "mode": "params", "sync": False}),
    "gradients": ("gossip gradients", {"algo": "gossip", "mode": "gradients", "sync": True}),
    "pga": ("gossip + PGA", {"algo": "gossip", "sync": False, "average_every": "PGA"}),
    "pga-state": (
        "gossip + PGA(state)",
        {"algo": "gossip", "sync": False, "average_every": "PGA"},
    ),
    "tracking": ("gossip + tracking", {"algo": "gossip", "sync": False, "tracking": True}),
    "tracking-pga": (
        "gossip + tracking + PGA",
        {"algo": "gossip", "sync": False, "tracking": True, "average_every": "PGA"},
    ),
    "tracking-pga-y": (
        "gossip + tracking + PGA(y)",
        {"algo": "gossip", "sync": False, "tracking": True, "average_every": "PGA"},
    ),
}

OPTIMIZERS = ("sgd", "adamw", "muon")
DEFAULT_LR = {"sgd": 0.05, "adamw": 3e-3, "muon": 0.005}  # all-reduce, iid, p = 16
ADAMW_LR_WITH_MUON = 3e-3  # the non-matrix parameters under --optimizer muon
WEIGHT_DECAY = 0.01  # AdamW's default, for AdamW and Muon alike


@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    info: DatasetInfo


@dataclass(frozen=True)
class Result:
    averaged_accuracy: float
    replica_accuracy: float
    consensus: float
    steps: int
    seconds: float


class MuonAdamW:
    """``torch.optim.Muon`` on the 2-D weights and ``torch.optim.AdamW`` on the other parameters
    (biases, norms), stepped together: what ``make_optimizer`` returns for Muon (Muon takes 2-D
    parameters only). Duck-types the part of ``torch.optim.Optimizer`` a training loop uses."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = DEFAULT_LR["muon"],
        adamw_lr: float = ADAMW_LR_WITH_MUON,
        weight_decay: float = WEIGHT_DECAY,
    ) -> None:
        params = list(params)
        matrices = [p for p in params if p.ndim == 2]
        others = [p for p in params if p.ndim != 2]
        self.optimizers: list[torch.optim.Optimizer] = []
        if matrices:
            self.optimizers.append(torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay))
        if others:
            self.optimizers.append(
                torch.optim.AdamW(others, lr=adamw_lr, weight_decay=weight_decay)
            )

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, closure: Callable[[], float] | None = None) -> None:
        if closure is not None:
            with torch.enable_grad():
                closure()
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def optimizer_factory(
    name: str, lr: float | None = None, momentum: float = 0.9
) -> Callable[[Iterable[nn.Parameter]], Any]:
    """``make_optimizer`` for ``name`` in ``OPTIMIZERS`` (``lr`` None: ``DEFAULT_LR``)."""
    lr = DEFAULT_LR[name] if lr is None else lr
    if name == "sgd":
        return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum)
    if name == "adamw":
        return lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=WEIGHT_DECAY)
    if name == "muon":
        return lambda ps: MuonAdamW(ps, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def variant_options(key: str, pga_every: int, gossip_every: int = 1) -> dict[str, Any]:
    """The ``VirtualCluster`` keywords of variant ``key`` (``wrap``'s, less ``algo``)."""
    _, options = VARIANTS[key]
    out = {k: (pga_every if v == "PGA" else v) for k, v in options.items()}
    if out.get("mode", "params") == "params" and out["algo"] == "gossip" and gossip_every > 1:
        out["gossip_every"] = gossip_every
    return out


class TrackerAveragingCluster(VirtualCluster):
    """Variant ``tracking-pga-y``: the periodic exact average also replaces every tracker (and
    the tracked direction the optimizer is about to read) by the mean over replicas."""

    @torch.no_grad()
    def average_replicas(self) -> None:
        super().average_replicas()
        groups = [self._trackers] if self._trackers else []
        if self._trackers and any(p.grad is not None for p in self.replicas[0].parameters()):
            grads = [[p.grad for p in r.parameters() if p.grad is not None] for r in self.replicas]
            groups.append(grads)
        for per_replica in groups:
            for group in zip(*per_replica, strict=True):
                mean = torch.stack(group).mean(0)
                for t in group:
                    t.copy_(mean)


class StateAveragingCluster(VirtualCluster):
    """Variant ``pga-state``: the periodic exact average also replaces every optimizer state
    tensor (SGD's momentum, AdamW's moments, Muon's momentum) by the mean over replicas."""

    @torch.no_grad()
    def average_replicas(self) -> None:
        super().average_replicas()
        per_replica = [
            [_state(opt, p) for p in r.parameters()]
            for r, opt in zip(self.replicas, self.optimizers, strict=True)
        ]
        for states in zip(*per_replica, strict=True):
            for name, value in states[0].items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim:
                    mean = torch.stack([s[name] for s in states]).mean(0)
                    for s in states:
                        s[name].copy_(mean)


def _state(optimizer: Any, p: torch.Tensor) -> dict[str, Any]:
    """``p``'s state in ``optimizer`` (or in one of a ``MuonAdamW``'s)."""
    for o in getattr(optimizer, "optimizers", [optimizer]):
        if p in o.state:
            return o.state[p]
    return {}


CLUSTERS: dict[str, type[VirtualCluster]] = {
    "tracking-pga-y": TrackerAveragingCluster,
    "pga-state": StateAveragingCluster,
}


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    make_optimizer = optimizer_factory(args.optimizer, args.lr, args.momentum)
    stored = _load(args.out) if args.out else []
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        data = _digits(seed) if args.data == "digits" else _teacher(args.teacher_samples, seed)
        torch.manual_seed(seed)
        model = build_model("mlp", data.info, hidden=args.hidden)
        for partition, shuffle in args.settings:
            for p in args.p:
                for key in args.variants:
                    ident = _identity(args, seed, partition, shuffle, p, key)
                    done = next((r for r in stored if _same(r, ident)), None)
                    if done is None:
                        result = _run(model, p, make_optimizer, key, data, args, seed, partition,
                                      shuffle)  # fmt: skip
                        done = {**ident, **asdict(result)}
                        if args.out:
                            _save(args.out, done, ident)
                    runs.append(done)
                    print(
                        f"seed={seed} {partition}:{shuffle} p={p:3d} {VARIANTS[key][0]:26s} "
                        f"steps={done['steps']:5d} averaged={done['averaged_accuracy']:.3f} "
                        f"replicas={done['replica_accuracy']:.3f} "
                        f"consensus={done['consensus']:.4f} ({done['seconds']:.1f} s)",
                        flush=True,
                    )
    _print_tables(runs, args)


def _identity(
    args: argparse.Namespace, seed: int, partition: str, shuffle: float, p: int, key: str
) -> dict[str, Any]:
    """What makes a run: its setting and every option that changes its result."""
    options = variant_options(key, args.pga_every, args.gossip_every)
    return {
        "data": args.data,
        "teacher_samples": args.teacher_samples if args.data == "teacher" else None,
        "epochs": args.epochs,
        "batch": args.batch,
        "hidden": args.hidden,
        "schedule": args.schedule,
        "optimizer": args.optimizer,
        "lr": DEFAULT_LR[args.optimizer] if args.lr is None else args.lr,
        "momentum": args.momentum if args.optimizer == "sgd" else None,
        "partition": partition,
        "shuffle": shuffle,
        "p": p,
        "variant": key,
        "average_every": options.get("average_every", 0),
        "gossip_every": options.get("gossip_every", 1),
        "seed": seed,
    }


def _same(run: dict[str, Any], ident: dict[str, Any]) -> bool:
    return all(run.get(k) == v for k, v in ident.items())


def _load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return list(json.loads(path.read_text())["runs"])


def _save(path: Path, run: dict[str, Any], ident: dict[str, Any]) -> None:
    """Add ``run`` to the file (replacing a run with the same identity), under a lock: several
    processes may add to one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"virtual_convergence-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = [r for r in _load(path) if not _same(r, ident)] + [run]
        doc = {
            "benchmark": "benchmarks/virtual_convergence.py",
            "fields": "averaged_accuracy: test accuracy of the exact mean of the replicas at the "
            "end; replica_accuracy: mean test accuracy of the replicas before that; consensus: "
            "RMS ||x_i - mean|| / ||mean|| at the end; seconds: wall time of the run",
            "torch": torch.__version__,
            "runs": runs,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)


def _run(
    model: nn.Module,
    p: int,
    make_optimizer: Callable[[Iterable[nn.Parameter]], Any],
    key: str,
    data: Data,
    args: argparse.Namespace,
    seed: int,
    partition: str,
    shuffle: float,
    replicas_out: list[torch.Tensor] | None = None,
) -> Result:
    """One run; ``replicas_out`` gets each replica's parameters (flat) at the end of training."""
    start = time.perf_counter()
    options = variant_options(key, args.pga_every, args.gossip_every)
    kind = CLUSTERS.get(key, VirtualCluster)
    cluster = kind(model, p, make_optimizer, schedule=args.schedule, seed=seed, **options)
    batches = replica_batches(
        data.y_train,
        p,
        epochs=args.epochs,
        batch_size=args.batch,
        partition=partition,
        shuffle_fraction=shuffle,
        seed=seed,
        schedule=args.schedule,
    )
    for _, ids in batches:
        cluster.train_step([(data.x_train[i], data.y_train[i]) for i in ids], F.cross_entropy)
    consensus = cluster.consensus_distance()
    if replicas_out is not None:
        replicas_out.extend(
            torch.cat([t.detach().reshape(-1) for t in r.parameters()]) for r in cluster.replicas
        )
    replica_accuracy = sum(_accuracy(r, data) for r in cluster.replicas) / p
    cluster.average_replicas()
    return Result(
        averaged_accuracy=_accuracy(cluster.replicas[0], data),
        replica_accuracy=replica_accuracy,
        consensus=consensus,
        steps=cluster.step,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def _accuracy(module: nn.Module, data: Data) -> float:
    module.eval()
    correct = (module(data.x_test).argmax(1) == data.y_test).float().mean().item()
    module.train()
    return correct


def _digits(seed: int) -> Data:
    train, test, info = load_dataset("digits", seed=seed)
    x_train, y_train = train.tensors  # type: ignore[attr-defined]
    x_test, y_test = test.tensors  # type: ignore[attr-defined]
    return Data(x_train, y_train, x_test, y_test, info)


def _teacher(samples: int, seed: int, dim: int = 32, classes: int = 10) -> Data:
    """Labels from a random tanh network 32 -> 64 -> 10 on standard Gaussian inputs."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim, 64, generator=g) / dim**0.5
    w2 = torch.randn(64, classes, generator=g) / 8.0
    x = torch.randn(samples + samples // 4, dim, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    info = DatasetInfo("teacher", "classification", (dim,), classes)
    return Data(x[:samples], y[:samples], x[samples:], y[samples:], info)


def summarize(runs: list[dict[str, Any]], field: str = "averaged_accuracy") -> dict[tuple, Any]:
    """``(optimizer, partition, shuffle, p, variant) -> (mean, std, n)`` of ``field`` over
    seeds."""
    groups: dict[tuple, list[float]] = {}
    for r in runs:
        key = (r["optimizer"], r["partition"], r["shuffle"], r["p"], r["variant"])
        groups.setdefault(key, []).append(r[field])
    return {k: _stats(v) for k, v in groups.items()}


def gaps(runs: list[dict[str, Any]]) -> dict[tuple, Any]:
    """``(optimizer, partition, shuffle, p, variant) -> (mean, std, n)`` of the variant's
    averaged accuracy minus all-reduce's on the same seed, in points."""
    reference = {
        (r["optimizer"], r["partition"], r["shuffle"], r["p"], r["seed"]): r["averaged_accuracy"]
        for r in runs
        if r["variant"] == "allreduce"
    }
    groups: dict[tuple, list[float]] = {}
    for r in runs:
        ref = reference.get((r["optimizer"], r["partition"], r["shuffle"], r["p"], r["seed"]))
        if ref is None or r["variant"] == "allreduce":
            continue
        key = (r["optimizer"], r["partition"], r["shuffle"], r["p"], r["variant"])
        groups.setdefault(key, []).append(100.0 * (r["averaged_accuracy"] - ref))
    return {k: _stats(v) for k, v in groups.items()}


def _stats(values: list[float]) -> tuple[float, float, int]:
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std, len(values)


def _cell(stats: tuple[float, float, int], digits: int = 3) -> str:
    mean, std, n = stats
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _print_tables(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    keys = list(args.variants)
    names = [VARIANTS[k][0] for k in keys]
    accuracy, replicas = summarize(runs), summarize(runs, "replica_accuracy")
    consensus, gap = summarize(runs, "consensus"), gaps(runs)
    steps = {(r["p"], r["partition"], r["shuffle"]): r["steps"] for r in runs}
    o = args.optimizer
    seeds = " ".join(map(str, args.seeds))
    lr = DEFAULT_LR[o] if args.lr is None else args.lr
    for partition, shuffle in args.settings:
        print(
            f"\ndata={args.data} partition={partition} shuffle={shuffle} "
            f"schedule={args.schedule} epochs={args.epochs} batch/replica={args.batch} "
            f"optimizer={o} lr={lr} momentum={args.momentum} hidden={args.hidden} "
            f"pga_every={args.pga_every} gossip_every={args.gossip_every} seeds={seeds}\n"
        )
        print("Test accuracy of the averaged model (consensus distance before averaging)\n")
        print("| p | steps | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for p in args.p:
            cells = [
                f"{_cell(accuracy[o, partition, shuffle, p, k])} "
                f"({consensus[o, partition, shuffle, p, k][0]:.3f})"
                for k in keys
            ]
            print(f"| {p} | {steps[p, partition, shuffle]} | " + " | ".join(cells) + " |")
        print("\nMean test accuracy of the individual replicas (before averaging)\n")
        print("| p | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for p in args.p:
            cells = [_cell(replicas[o, partition, shuffle, p, k]) for k in keys]
            print(f"| {p} | " + " | ".join(cells) + " |")
        others = [k for k in keys if k != "allreduce"]
        if len(args.seeds) > 1 and "allreduce" in keys and others:
            print("\nGap to all-reduce, points, paired by seed (mean ± std)\n")
            print("| p | " + " | ".join(VARIANTS[k][0] for k in others) + " |")
            print("|---|" + "---|" * len(others))
            for p in args.p:
                cells = [_cell(gap[o, partition, shuffle, p, k], 2) for k in others]
                print(f"| {p} | " + " | ".join(cells) + " |")


def _setting(text: str) -> tuple[str, float]:
    partition, _, fraction = text.partition(":")
    if partition not in PARTITIONS:
        raise argparse.ArgumentTypeError(f"partition must be one of {PARTITIONS}: {text!r}")
    try:
        shuffle = float(fraction) if fraction else 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"shuffle must be a number: {text!r}") from None
    if not 0.0 <= shuffle <= 1.0:
        raise argparse.ArgumentTypeError(f"shuffle must be in [0, 1]: {text!r}")
    return partition, shuffle


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=("digits", "teacher"), default="digits")
    ap.add_argument("--p", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="mini-batch per replica")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (Muon's for --optimizer muon); default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_LR.items()),
    )
    ap.add_argument("--momentum", type=float, default=0.9, help="SGD's")
    ap.add_argument("--hidden", type=int, default=64, help="MLP hidden width")
    ap.add_argument("--schedule", choices=SCHEDULES, default="dissemination")
    ap.add_argument("--partition", choices=PARTITIONS, default="iid")
    ap.add_argument("--shuffle", type=float, default=0.0, help="shard fraction sent per epoch")
    ap.add_argument(
        "--settings",
        type=_setting,
        nargs="+",
        default=None,
        help="data settings PARTITION[:SHUFFLE] (default: --partition:--shuffle)",
    )
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(LEGACY))
    ap.add_argument("--pga-every", type=int, default=16, help="H of the PGA variants")
    ap.add_argument("--gossip-every", type=int, default=1, help="K of parameter gossip")
    ap.add_argument("--teacher-samples", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: --seed")
    ap.add_argument("--out", type=Path, default=None, help="JSON file of every run (merged)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if min(args.p) < 1 or args.epochs < 1 or args.batch < 1:
        ap.error("--p, --epochs and --batch must be >= 1")
    if args.pga_every < 1 or args.gossip_every < 1:
        ap.error("--pga-every and --gossip-every must be >= 1")
    if args.settings is None:
        args.settings = [(args.partition, args.shuffle)]
    if args.seeds is None:
        args.seeds = [args.seed]
    return args


if __name__ == "__main__":
    main()
