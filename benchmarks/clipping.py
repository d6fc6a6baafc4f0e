"""Gradient clipping under gossip against DDP: the local gradient's norm or the estimate's.

    python benchmarks/clipping.py                                # 4 ranks, seeds 0 1 2, 10 epochs
    python benchmarks/clipping.py --json benchmarks/results/clipping.json
    python benchmarks/clipping.py --procs 2 --epochs 1 --seeds 0   # a quick check

Under DDP, ``torch.nn.utils.clip_grad_norm_(model.parameters(), c)`` clips the gradient averaged
over the ranks. Under ``GossipDataParallel``, ``.grad`` after backward is the rank's own gradient,
so the same call clips each rank's noisier small-batch gradient, against a larger norm, more often
and harder. ``GossipDataParallel.clip_grad_norm_(c)`` clips against a communication-free estimate
of the norm of the rank-averaged gradient instead (``gossipgrad._clipping``). This measures how
close each gets to DDP's accuracy.

Each run starts ``--procs`` forked gloo ranks (one thread each, a FileStore in a temporary folder;
``benchmarks/_forked.py``) and trains ``--model`` on scikit-learn's handwritten digits (split as
``gossipgrad train`` splits it, from the seed), each rank on its own shard of the training set
(torch's ``DistributedSampler``: strided, reshuffled each epoch from the seed, ``drop_last``), with
``--batch`` samples per rank and step and SGD (``--lr``, ``--momentum``). The defaults keep the
model in the regime where DDP's averaged norm exceeds ``--max-norm`` on a good part of the steps
(printed). Contenders, run interleaved per seed (seed 0: every contender, then seed 1, ...), each
in a fresh world:

- ``ddp``: ``gossipgrad.wrap(module, "allreduce")`` (torch DDP) and torch's ``clip_grad_norm_`` on
  ``model.parameters()``: the reference, clipping the average over ranks.
- ``ddp-noclip``: the same without clipping.
- ``gossip-local-clip``: ``GossipDataParallel`` and torch's ``clip_grad_norm_`` on
  ``model.parameters()``, what a DDP user's loop does: it clips each rank's local gradient.
- ``gossip-estimate-clip``: ``GossipDataParallel`` and ``model.clip_grad_norm_(max_norm)``.
- ``gossip-noclip``: ``GossipDataParallel`` without clipping.

Gossip runs call ``model.average_replicas()`` at the end and evaluate the averaged model (then
``model.close()``); DDP evaluates its replica. Printed, as a markdown table: the test accuracy
(mean ± std over seeds); the fraction of steps clipped (mean over ranks, steps and seeds; for the
``noclip`` contenders, in parentheses, the fraction whose norm exceeded ``--max-norm``: the
average's for DDP, the local gradient's for gossip); the mean norm clipped against (or measured);
the training loop's wall time (slowest rank, mean over seeds; the gossip runs include the final
``average_replicas``) and the whole run's (forks, process group, wrapping and evaluation
included: wrapping in torch DDP takes seconds over gloo). ``--json PATH`` saves every seed's
results.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: forked ranks must not inherit OpenMP

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, DistributedSampler  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _forked import run_forked  # noqa: E402

import gossipgrad  # noqa: E402
from gossipgrad.train.data import DatasetInfo, load_dataset  # noqa: E402
from gossipgrad.train.evaluation import evaluate  # noqa: E402
from gossipgrad.train.models import build_model, task_loss  # noqa: E402

CONTENDERS: dict[str, tuple[str, str]] = {  # label -> (wrapper, clipping)
    "ddp": ("allreduce", "torch"),
    "ddp-noclip": ("allreduce", "none"),
    "gossip-local-clip": ("gossip", "torch"),
    "gossip-estimate-clip": ("gossip", "estimate"),
    "gossip-noclip": ("gossip", "none"),
}


@dataclass
class RankResult:
    """One rank's run: the norms clipped against (or measured, without clipping) per step."""

    norms: list[float]
    accuracy: float
    loss: float
    train_s: float


@dataclass
class Run:
    """One contender, one seed: accuracy and loss are the evaluated model's (the same on every
    rank); clipped and norm are means over ranks and steps; train_s is the slowest rank's."""

    contender: str
    seed: int
    accuracy: float
    loss: float
    clipped: float
    norm: float
    steps: int
    train_s: float
    wall_s: float


def _wrap(module: nn.Module, wrapper: str, seed: int) -> nn.Module:
    if wrapper == "gossip":
        return gossipgrad.GossipDataParallel(module, seed=seed)
    return gossipgrad.wrap(module, "allreduce")


def _clip(model: nn.Module, clipping: str, max_norm: float) -> float:
    """Clip as the contender does; return the norm clipped against (without clipping: the norm
    torch's ``clip_grad_norm_`` would clip against, measured with an infinite threshold)."""
    if clipping == "estimate":
        assert isinstance(model, gossipgrad.GossipDataParallel)
        return float(model.clip_grad_norm_(max_norm))
    threshold = max_norm if clipping == "torch" else math.inf
    return float(nn.utils.clip_grad_norm_(model.parameters(), threshold))


def _train(
    model: nn.Module, clipping: str, loader: DataLoader, args: argparse.Namespace
) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    sampler = loader.sampler
    assert isinstance(sampler, DistributedSampler)
    norms = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            task_loss(model(x), y).backward()
            norms.append(_clip(model, clipping, args.max_norm))
            optimizer.step()
            optimizer.zero_grad()
    return norms


def _rank(
    rank: int,
    world: int,
    args: argparse.Namespace,
    contender: str,
    seed: int,
    data: tuple[Dataset, Dataset, DatasetInfo],
) -> RankResult:
    train, test, info = data
    wrapper, clipping = CONTENDERS[contender]
    torch.manual_seed(seed)
    module = build_model(args.model, info)
    model = _wrap(module, wrapper, seed)
    sampler = DistributedSampler(train, world, rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(train, batch_size=args.batch, sampler=sampler)
    dist.barrier()
    start = time.perf_counter()
    norms = _train(model, clipping, loader, args)
    if isinstance(model, gossipgrad.GossipDataParallel):
        model.average_replicas()
    train_s = time.perf_counter() - start
    loss, accuracy = evaluate(module, test)
    if isinstance(model, gossipgrad.GossipDataParallel):
        model.close()
    return RankResult(norms, accuracy, loss, train_s)


def _run(
    args: argparse.Namespace,
    contender: str,
    seed: int,
    data: tuple[Dataset, Dataset, DatasetInfo],
) -> Run:
    start = time.perf_counter()
    ranks = run_forked(_rank, args.procs, (args, contender, seed, data), timeout=args.timeout)
    wall_s = time.perf_counter() - start
    norms = [n for r in ranks for n in r.norms]
    return Run(
        contender=contender,
        seed=seed,
        accuracy=ranks[0].accuracy,
        loss=ranks[0].loss,
        clipped=sum(n > args.max_norm for n in norms) / len(norms),
        norm=statistics.fmean(norms),
        steps=len(ranks[0].norms),
        train_s=max(r.train_s for r in ranks),
        wall_s=wall_s,
    )


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _row(contender: str, runs: list[Run]) -> str:
    mine = [r for r in runs if r.contender == contender]
    mean, std = _spread([r.accuracy for r in mine])
    clipped = statistics.fmean(r.clipped for r in mine)
    clipped_text = f"{clipped:.2f}" if CONTENDERS[contender][1] != "none" else f"({clipped:.2f})"
    return (
        f"| {contender} | {mean:.3f} ± {std:.3f} | {clipped_text} "
        f"| {statistics.fmean(r.norm for r in mine):.3f} "
        f"| {statistics.fmean(r.train_s for r in mine):.1f} "
        f"| {statistics.fmean(r.wall_s for r in mine):.1f} |"
    )


def _record(args: argparse.Namespace, command: str, runs: list[Run]) -> dict[str, Any]:
    """What ``--json`` saves and ``table`` reads."""
    return {
        "command": command,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "args": vars(args),
        "runs": [asdict(r) for r in runs],
    }


def table(record: dict[str, Any]) -> str:
    """The markdown table of a record (``_record``, or a ``--json`` file read back)."""
    args = argparse.Namespace(**record["args"])
    runs = [Run(**r) for r in record["runs"]]
    return "\n".join(
        [
            f"# {record['command']}",
            f"# torch {record['torch']}, {record['cpu_count']} CPU cores, {args.procs} ranks, "
            f"model {args.model}, batch {args.batch} per rank, {runs[0].steps} steps per rank, "
            f"SGD lr {args.lr} momentum {args.momentum}, max norm {args.max_norm}, "
            f"seeds {args.seeds}\n",
            "| contender | test accuracy | steps clipped | mean norm clipped against "
            "| train s | wall s |",
            "|---|---|---|---|---|---|",
            *(_row(contender, runs) for contender in args.contenders),
            "\n(in parentheses: not clipped; the fraction of steps whose norm exceeded the "
            "threshold, and the norm measured)",
        ]
    )


def _save(path: str, record: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--procs", type=int, default=4, help="ranks per run")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-norm", type=float, default=1.0, help="the clipping threshold")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=16, help="samples per rank and step")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    names = list(CONTENDERS)
    parser.add_argument("--contenders", nargs="+", choices=names, default=names)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--json", metavar="PATH", help="save every seed's results here")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    command = shlex.join(["python", *sys.argv])
    runs = []
    for seed in args.seeds:
        data = load_dataset("digits", seed=seed)  # loaded here, inherited by the forked ranks
        for contender in args.contenders:
            run = _run(args, contender, seed, data)
            runs.append(run)
            print(
                f"seed {seed} {contender}: accuracy {run.accuracy:.3f}, clipped {run.clipped:.2f}"
                f", norm {run.norm:.3f}, {run.wall_s:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    record = _record(args, command, runs)
    print(table(record), flush=True)
    if args.json:
        _save(args.json, record)


if __name__ == "__main__":
    main()
