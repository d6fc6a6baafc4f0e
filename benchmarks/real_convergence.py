"""The virtual cluster against real processes: the same runs on 4 forked gloo ranks.

    python benchmarks/real_convergence.py --optimizers sgd adamw muon \\
        --out benchmarks/results/virtual_convergence_real.json

For each ``--optimizers`` and ``--variants`` (``benchmarks/virtual_convergence.py``'s keys; default
all-reduce, gossip, gossip + PGA, gossip + tracking), one run of ``--world`` real processes
(forked, gloo over a FileStore, one thread each) with ``gossipgrad.wrap(model, algo, **options)``
(all-reduce is torch DDP) and the same run in ``VirtualCluster``: the same teacher task, initial
model, optimizer, per-rank batches (``replica_batches``, what ``GossipShuffleSampler`` visits) and
schedule. Printed: the averaged model's test accuracy for both, the mean accuracy of the
individual replicas, the consensus distance, and the largest parameter difference between a real
rank and its virtual replica at the end (float round-off in the all-reduce and in the optimizers
compounds over thousands of steps, so the runs agree in accuracy rather than to the bit).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: forked ranks must not inherit OpenMP

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import virtual_convergence as vc  # noqa: E402
from _forked import run_forked  # noqa: E402

import gossipgrad  # noqa: E402
from gossipgrad.sim.virtual import replica_batches  # noqa: E402
from gossipgrad.train.models import build_model  # noqa: E402

REAL_VARIANTS = ("allreduce", "overlapped", "pga", "tracking", "tracking-pga")


def _rank(rank: int, world: int, args: argparse.Namespace, optimizer: str, key: str) -> dict:
    data = vc._teacher(args.teacher_samples, args.seed)
    torch.manual_seed(args.seed)
    module = build_model("mlp", data.info, hidden=args.hidden)
    options = vc.variant_options(key, args.pga_every, args.gossip_every)
    algo = options.pop("algo")
    model = gossipgrad.wrap(module, algo, schedule=args.schedule, seed=args.seed, **options)
    opt = vc.optimizer_factory(optimizer)(model.parameters())
    batches = replica_batches(
        data.y_train,
        world,
        epochs=args.epochs,
        batch_size=args.batch,
        partition=args.partition,
        shuffle_fraction=args.shuffle,
        seed=args.seed,
        schedule=args.schedule,
    )
    start = time.perf_counter()
    steps = 0
    for _, ids in batches:
        i = ids[rank]
        F.cross_entropy(model(data.x_train[i]), data.y_train[i]).backward()
        opt.step()
        opt.zero_grad()
        steps += 1
    consensus = model.consensus_distance()
    replica = vc._accuracy(model.module, data)
    flat = torch.cat([t.detach().reshape(-1) for t in model.module.parameters()])
    model.average_replicas()
    return {
        "averaged_accuracy": vc._accuracy(model.module, data),
        "replica_accuracy": replica,
        "consensus": consensus,
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "flat": flat,
    }


def run_real(args: argparse.Namespace, optimizer: str, key: str) -> list[dict]:
    """One run on ``args.world`` forked gloo ranks: each rank's result."""
    return run_forked(_rank, args.world, (args, optimizer, key), args.timeout)


def run_virtual(args: argparse.Namespace, optimizer: str, key: str) -> tuple[vc.Result, list]:
    """The same run in the virtual cluster: its result and each replica's parameters."""
    data = vc._teacher(args.teacher_samples, args.seed)
    torch.manual_seed(args.seed)
    module = build_model("mlp", data.info, hidden=args.hidden)
    flats: list[torch.Tensor] = []
    ns = argparse.Namespace(**{**vars(args), "lr": None, "momentum": 0.9})
    make_optimizer = vc.optimizer_factory(optimizer)
    result = vc._run(
        module, args.world, make_optimizer, key, data, ns, args.seed, args.partition, args.shuffle,
        flats,
    )  # fmt: skip
    return result, flats


def main() -> None:
    args = _parse()
    torch.set_num_threads(1)
    stored: list[dict] = []
    if args.out and args.out.exists():
        stored = json.loads(args.out.read_text())["runs"]
    rows = []
    for optimizer in args.optimizers:
        for key in args.variants:
            ident = {
                "optimizer": optimizer,
                "lr": vc.DEFAULT_LR[optimizer],
                "variant": key,
                "world": args.world,
                "partition": args.partition,
                "shuffle": args.shuffle,
                "teacher_samples": args.teacher_samples,
                "epochs": args.epochs,
                "batch": args.batch,
                "hidden": args.hidden,
                "schedule": args.schedule,
                "pga_every": args.pga_every,
                "gossip_every": args.gossip_every,
                "seed": args.seed,
            }
            row = next((r for r in stored if all(r.get(k) == v for k, v in ident.items())), None)
            if row is None:
                real = run_real(args, optimizer, key)
                virtual, flats = run_virtual(args, optimizer, key)
                diff = max(
                    (r["flat"] - v).abs().max().item() for r, v in zip(real, flats, strict=True)
                )
                scale = max(v.abs().max().item() for v in flats)
                row = {
                    **ident,
                    "real_averaged_accuracy": real[0]["averaged_accuracy"],
                    "real_replica_accuracy": sum(r["replica_accuracy"] for r in real) / len(real),
                    "real_consensus": real[0]["consensus"],
                    "real_seconds": max(r["seconds"] for r in real),
                    "virtual_averaged_accuracy": virtual.averaged_accuracy,
                    "virtual_replica_accuracy": virtual.replica_accuracy,
                    "virtual_consensus": virtual.consensus,
                    "virtual_seconds": virtual.seconds,
                    "steps": real[0]["steps"],
                    "max_parameter_difference": diff,
                    "max_parameter": scale,
                }
                stored = [r for r in stored if not all(r.get(k) == v for k, v in ident.items())]
                stored.append(row)
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    doc = {"benchmark": "benchmarks/real_convergence.py", "runs": stored}
                    args.out.write_text(json.dumps(doc, indent=1) + "\n")
            rows.append(row)
            print(
                f"{optimizer:5s} {vc.VARIANTS[key][0]:24s} real {row['real_averaged_accuracy']:.3f}"
                f" virtual {row['virtual_averaged_accuracy']:.3f} "
                f"(max |x_real - x_virtual| {row['max_parameter_difference']:.2e}, "
                f"real {row['real_seconds']:.0f} s)",
                flush=True,
            )
    print(f"\n{table(rows)}")


def table(rows: list[dict]) -> str:
    """The markdown table of ``rows`` (runs of one setting, as ``--out`` stores them)."""
    r0 = rows[0]
    lines = [
        f"{r0['world']} ranks, teacher {r0['teacher_samples']} samples, {r0['partition']} "
        f"shuffle={r0['shuffle']}, epochs={r0['epochs']}, batch/rank={r0['batch']}, "
        f"PGA H={r0['pga_every']}, seed={r0['seed']}: test accuracy of the averaged model, "
        "real (virtual); mean replica accuracy real (virtual); max |x_real - x_virtual|\n",
        "| optimizer | variant | averaged | replicas | consensus | max param diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {vc.VARIANTS[r['variant']][0]} | "
            f"{r['real_averaged_accuracy']:.3f} ({r['virtual_averaged_accuracy']:.3f}) | "
            f"{r['real_replica_accuracy']:.3f} ({r['virtual_replica_accuracy']:.3f}) | "
            f"{r['real_consensus']:.4f} ({r['virtual_consensus']:.4f}) | "
            f"{r['max_parameter_difference']:.1e} |"
        )
    return "\n".join(lines)


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--optimizers", nargs="+", choices=vc.OPTIMIZERS, default=["sgd"])
    ap.add_argument("--variants", nargs="+", choices=REAL_VARIANTS, default=list(REAL_VARIANTS[:4]))
    ap.add_argument("--partition", choices=("iid", "label-skew"), default="label-skew")
    ap.add_argument("--shuffle", type=float, default=0.0)
    ap.add_argument("--teacher-samples", type=int, default=60000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--schedule", default="dissemination")
    ap.add_argument("--pga-every", type=int, default=16)
    ap.add_argument("--gossip-every", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per real run")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args()


if __name__ == "__main__":
    main()
