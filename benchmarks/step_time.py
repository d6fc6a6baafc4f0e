"""Step time of all-reduce (DDP) vs gossip synchronous vs gossip overlapped, on this machine.

    python benchmarks/step_time.py                       # p = 2, 4, 8; cnn and wide-mlp
    python benchmarks/step_time.py --procs 8 --models wide-mlp --steps 20
    python benchmarks/step_time.py --procs 8 --models wide-mlp --wire-dtype bfloat16 --streams 2

Each setting starts p gloo processes on this machine (loopback), trains the model on random
digits-shaped batches, and reports the median step time after warm-up, the bytes each rank sends
per step, and the replicas' consensus distance at the end. "compute only" trains the bare module
with no communication at all: with more processes than cores it shows how much of a step is the
CPU itself. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gossipgrad
from gossipgrad.data import DatasetInfo
from gossipgrad.models import build_model

ALGOS = {  # label -> (algo, sync); "compute" trains the bare module with no communication
    "compute only": ("compute", False),
    "all-reduce": ("allreduce", False),
    "gossip sync": ("gossip", True),
    "gossip overlapped": ("gossip", False),
}
INFO = DatasetInfo(name="digits", task="classification", input_shape=(1, 8, 8), num_classes=10)


def _worker(rank: int, world: int, folder: str, args: argparse.Namespace, label: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(folder, "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(minutes=5)
    )
    algo, sync = ALGOS[label]
    torch.manual_seed(0)
    module = build_model(args.model, INFO)
    wire = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.wire_dtype]
    if algo == "compute":
        model = module
    else:
        model = gossipgrad.wrap(module, algo, sync=sync, wire_dtype=wire, streams=args.streams)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, *INFO.input_shape, generator=g)
    y = torch.randint(0, INFO.num_classes, (args.batch,), generator=g)
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
        start = time.perf_counter()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    distance = float("nan")
    if algo != "compute":
        model.flush()
        distance = model.consensus_distance()
    if rank == 0:
        steady = times[args.warmup :]
        params = sum(p.numel() for p in module.parameters())
        with open(os.path.join(folder, "result.txt"), "w") as f:
            sent = getattr(model, "bytes_sent_last_step", 0)
            f.write(f"{statistics.median(steady)} {sent} {distance} {params}")
    dist.destroy_process_group()


def _measure(args: argparse.Namespace, label: str, world: int) -> tuple[float, int, float, int]:
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(
            _worker, args=(world, folder, args, label), nprocs=world, start_method="fork"
        )
        with open(os.path.join(folder, "result.txt")) as f:
            step, sent, distance, params = f.read().split()
    return float(step), int(sent), float(distance), int(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--models", nargs="+", default=["cnn", "wide-mlp"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--wire-dtype", choices=["none", "bfloat16", "float16"], default="none")
    parser.add_argument("--streams", type=int, default=1, help="connections per gossip partner")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(
        f"# step time, {os.cpu_count()} CPU cores, torch {torch.__version__}, batch {args.batch}"
        f" per rank, median of {args.steps} steps after {args.warmup} warm-up, gossip wire dtype"
        f" {args.wire_dtype}, {args.streams} stream(s)\n"
    )
    print(
        "| model | params | p | algorithm | step (ms) | vs all-reduce | MB sent/rank/step "
        "| consensus distance |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        for world in args.procs:
            args.model = model
            rows = {label: _measure(args, label, world) for label in ALGOS}
            base = rows["all-reduce"][0]
            for label, (step, sent, distance, params) in rows.items():
                ratio = "–" if label == "compute only" else f"{base / step:.2f}x"
                print(
                    f"| {model} | {params / 1e6:.1f}M | {world} | {label} | {step * 1e3:.1f} "
                    f"| {ratio} | {sent / 1e6:.1f} | {distance:.2e} |",
                    flush=True,
                )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
