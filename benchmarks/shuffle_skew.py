"""Label-skewed shards: what the gossip shuffle (GossipGraD feature 4) buys, and what it costs.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/shuffle_skew.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/shuffle_skew.py \
        --algo allreduce

scikit-learn's bundled digits (no download; 1437 train / 360 test images, stratified split),
an MLP 64-32-10, SGD (lr 0.05, momentum 0.9), batch 16 per rank, ``--epochs`` epochs, trained with
``gossipgrad.wrap(model, algo)``: ``gossip`` is ``GossipDataParallel`` (parameter gossip,
overlapped), ``allreduce`` is torch DDP. Each rank starts with a label-skewed shard
(``label_skew_shards``: ids sorted by label, cut in p runs, so a rank sees ~10/p classes). Rows:

- ``no shuffle``: ``GossipShuffleSampler(shuffle_fraction=0)``: each rank keeps its shard;
- ``gossip f``: ``GossipShuffleSampler(shuffle_fraction=f)``: ids travel to the gossip partner;
- ``gossip f, samples travel``: ``GossipShuffleDataset``: the rows themselves travel (same ids
  visited as ``gossip f`` with the same seed, so the same accuracy is expected);
- ``global reshuffle``: ``DistributedSampler(shuffle=True)``: a fresh uniform split each epoch,
  which needs every rank to read the whole dataset.

Columns: test accuracy of the exact average of the replicas at the end, mean test accuracy of the
individual replicas before that average, consensus distance, and the time the training loop spent
in ``set_epoch`` (where it waits for the shuffle traffic posted one epoch earlier), against the
epoch time. Mean and spread over ``--seeds``; times are the slowest rank's, per epoch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from gossipgrad.allreduce import wrap
from gossipgrad.sampler import GossipShuffleDataset, GossipShuffleSampler, label_skew_shards


@dataclass
class Run:
    accuracy: float  # the averaged model
    replica_accuracy: float  # mean over ranks, before averaging
    consensus: float
    set_epoch_ms: float  # per epoch, slowest rank
    wait_ms: float  # per epoch, slowest rank: waiting for shuffle traffic
    epoch_ms: float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algo", choices=("gossip", "allreduce"), default="gossip")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rows = [("no shuffle", "ids", 0.0)]
    rows += [(f"gossip {f:g}", "ids", f) for f in args.fractions]
    rows += [(f"gossip {args.fractions[0]:g}, samples travel", "samples", args.fractions[0])]
    rows += [("global reshuffle (DistributedSampler)", "global", 0.0)]
    _train(args.algo, "ids", 0.5, 0, 1)  # warm-up: connections, allocator, caches
    results = {
        name: [_train(args.algo, how, fraction, seed, args.epochs) for seed in args.seeds]
        for name, how, fraction in rows
    }
    if dist.get_rank() == 0:
        _print_table(args, results)
    dist.destroy_process_group()


def _digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )
    mean, std = x_train.mean(), x_train.std()

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor((x - mean) / std, dtype=torch.float32), torch.tensor(y))

    return tensors(x_train, y_train), tensors(x_test, y_test)


def _train(algo: str, how: str, fraction: float, seed: int, epochs: int) -> Run:
    world = dist.get_world_size()
    train, test = _digits(seed)
    shards = label_skew_shards(train.tensors[1].numpy(), world)
    loader, shuffle = _data(how, train, shards, fraction, seed)
    torch.manual_seed(seed)
    model = wrap(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), algo=algo)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    set_epoch_s = 0.0
    began = time.perf_counter()
    for epoch in range(epochs):
        t = time.perf_counter()
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        set_epoch_s += time.perf_counter() - t
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    epoch_s = (time.perf_counter() - began) / epochs
    wait_s = shuffle.wait_time_s if shuffle is not None else 0.0
    if shuffle is not None:
        shuffle.flush()
    replica = _accuracy(model.module, test)
    consensus = model.consensus_distance()
    model.average_replicas()
    slowest = torch.tensor([set_epoch_s / epochs, wait_s / epochs, epoch_s], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    replicas = torch.tensor([replica], dtype=torch.float64)
    dist.all_reduce(replicas)
    return Run(
        accuracy=_accuracy(model.module, test),
        replica_accuracy=float(replicas) / world,
        consensus=consensus,
        set_epoch_ms=1e3 * float(slowest[0]),
        wait_ms=1e3 * float(slowest[1]),
        epoch_ms=1e3 * float(slowest[2]),
    )


def _data(
    how: str, train: TensorDataset, shards: list[np.ndarray], fraction: float, seed: int
) -> tuple[DataLoader, GossipShuffleSampler | GossipShuffleDataset | None]:
    """The loader, and the gossip shuffle behind it (``None`` for ``DistributedSampler``)."""
    if how == "global":
        sampler = DistributedSampler(train, shuffle=True, seed=seed)
        return DataLoader(train, batch_size=16, sampler=sampler), None
    if how == "ids":
        ids = GossipShuffleSampler(
            train, seed=seed, shuffle_fraction=fraction, initial_shards=shards
        )
        return DataLoader(train, batch_size=16, sampler=ids), ids
    mine = torch.from_numpy(shards[dist.get_rank()])
    x, y = train.tensors[0][mine], train.tensors[1][mine]
    data = GossipShuffleDataset(x, y, ids=mine, seed=seed, shuffle_fraction=fraction)
    return DataLoader(data, batch_size=16, sampler=data.sampler), data


@torch.no_grad()
def _accuracy(module: nn.Module, test: TensorDataset) -> float:
    x, y = test.tensors
    return float((module(x).argmax(dim=1) == y).float().mean())


def _print_table(args: argparse.Namespace, results: dict[str, list[Run]]) -> None:
    world = dist.get_world_size()
    print(
        f"\ndigits, label-skewed shards, p = {world}, algo = {args.algo}, {args.epochs} epochs, "
        f"seeds {args.seeds} (mean ± std; times: slowest rank, per epoch)\n"
    )
    print(
        "| sampler | test acc (averaged model) | test acc (replicas) | consensus distance "
        "| set_epoch ms | waiting for shuffle ms | epoch ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        print(
            f"| {name} | {_spread([r.accuracy for r in runs], '.3f')} "
            f"| {_spread([r.replica_accuracy for r in runs], '.3f')} "
            f"| {_spread([r.consensus for r in runs], '.3f')} "
            f"| {_spread([r.set_epoch_ms for r in runs], '.2f')} "
            f"| {_spread([r.wait_ms for r in runs], '.2f')} "
            f"| {_spread([r.epoch_ms for r in runs], '.0f')} |"
        )


def _spread(values: list[float], spec: str) -> str:
    if len(values) == 1:
        return format(values[0], spec)
    return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values):{spec}}"


if __name__ == "__main__":
    main()
