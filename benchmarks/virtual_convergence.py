"""Accuracy against the number of replicas p: all-reduce and three gossip variants, simulated.

    python benchmarks/virtual_convergence.py
    python benchmarks/virtual_convergence.py --partition label-skew --shuffle 0.25
    python benchmarks/virtual_convergence.py --data teacher --schedule hypercube

Runs ``gossipgrad.sim.virtual.VirtualCluster`` (p replicas in one process, mixed by the engine's own
schedule and mixing code) for p in ``--p`` (default 4 8 16 32 64) and four algorithms:

- ``all-reduce``: gradients averaged over all replicas every step (what DDP computes);
- ``gossip params``: parameter gossip, synchronous (``GossipDataParallel(sync=True)``);
- ``gossip overlapped``: parameter gossip with staleness 1 (the engine's default);
- ``gossip gradients``: gradients averaged with the step's partner only (``mode="gradients"``).

Every run: the same initial MLP (``gossipgrad.train.models`` ``mlp``), SGD with momentum, the same
``--epochs`` and per-replica ``--batch`` (so a larger p takes fewer, larger global steps), data
split into one shard per replica (``--partition iid`` or ``label-skew``, optional gossip shuffle
of ``--shuffle`` of each shard per epoch). Data: scikit-learn's bundled digits
(``gossipgrad.train.data.load_dataset("digits")``, 1437 train / 360 test images) or
``teacher``: 10-class
labels from a random two-layer teacher network on Gaussian inputs (``--teacher-samples``).

Printed: a markdown table of the test accuracy of the averaged model (the exact mean of the
replicas, what a run exports) with the consensus distance ``RMS ||x_i - mean|| / ||mean||`` at the
end, and one of the mean test accuracy of the individual replicas. Single-threaded by default
(``--threads``); a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gossipgrad.schedule import SCHEDULES
from gossipgrad.sim.virtual import PARTITIONS, VirtualCluster, replica_batches
from gossipgrad.train.data import DatasetInfo, load_dataset
from gossipgrad.train.models import build_model

VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("all-reduce", {"algo": "allreduce"}),
    ("gossip params", {"algo": "gossip", "mode": "params", "sync": True}),
    ("gossip overlapped", {"algo": "gossip", "mode": "params", "sync": False}),
    ("gossip gradients", {"algo": "gossip", "mode": "gradients", "sync": True}),
)


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


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    data = (
        _digits(args.seed) if args.data == "digits" else _teacher(args.teacher_samples, args.seed)
    )
    torch.manual_seed(args.seed)
    model = build_model("mlp", data.info, hidden=args.hidden)

    def make_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)

    results: dict[tuple[int, str], Result] = {}
    for p in args.p:
        for name, options in VARIANTS:
            results[p, name] = _run(model, p, make_optimizer, options, data, args)
            r = results[p, name]
            print(
                f"p={p:3d} {name:18s} steps={r.steps:5d} averaged={r.averaged_accuracy:.3f} "
                f"replicas={r.replica_accuracy:.3f} consensus={r.consensus:.4f} "
                f"({r.seconds:.1f} s)",
                flush=True,
            )
    _print_tables(results, args)


def _run(
    model: nn.Module,
    p: int,
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    options: dict[str, Any],
    data: Data,
    args: argparse.Namespace,
) -> Result:
    start = time.perf_counter()
    cluster = VirtualCluster(
        model, p, make_optimizer, schedule=args.schedule, seed=args.seed, **options
    )
    batches = replica_batches(
        data.y_train,
        p,
        epochs=args.epochs,
        batch_size=args.batch,
        partition=args.partition,
        shuffle_fraction=args.shuffle,
        seed=args.seed,
        schedule=args.schedule,
    )
    for _, ids in batches:
        cluster.train_step([(data.x_train[i], data.y_train[i]) for i in ids], F.cross_entropy)
    consensus = cluster.consensus_distance()
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


def _print_tables(results: dict[tuple[int, str], Result], args: argparse.Namespace) -> None:
    names = [name for name, _ in VARIANTS]
    ps = sorted({p for p, _ in results})
    print(
        f"\ndata={args.data} partition={args.partition} shuffle={args.shuffle} "
        f"schedule={args.schedule} epochs={args.epochs} batch/replica={args.batch} "
        f"lr={args.lr} momentum={args.momentum} hidden={args.hidden} seed={args.seed}\n"
    )
    print("Test accuracy of the averaged model (consensus distance before averaging)\n")
    print("| p | steps | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for p in ps:
        cells = [
            f"{results[p, n].averaged_accuracy:.3f} ({results[p, n].consensus:.3f})" for n in names
        ]
        print(f"| {p} | {results[p, names[0]].steps} | " + " | ".join(cells) + " |")
    print("\nMean test accuracy of the individual replicas (before averaging)\n")
    print("| p | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for p in ps:
        cells = [f"{results[p, n].replica_accuracy:.3f}" for n in names]
        print(f"| {p} | " + " | ".join(cells) + " |")


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=("digits", "teacher"), default="digits")
    ap.add_argument("--p", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="mini-batch per replica")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--hidden", type=int, default=64, help="MLP hidden width")
    ap.add_argument("--schedule", choices=SCHEDULES, default="dissemination")
    ap.add_argument("--partition", choices=PARTITIONS, default="iid")
    ap.add_argument("--shuffle", type=float, default=0.0, help="shard fraction sent per epoch")
    ap.add_argument("--teacher-samples", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if min(args.p) < 1 or args.epochs < 1 or args.batch < 1:
        ap.error("--p, --epochs and --batch must be >= 1")
    return args


if __name__ == "__main__":
    main()
