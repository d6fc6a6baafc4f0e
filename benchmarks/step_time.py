"""Step time of all-reduce (DDP) vs gossip synchronous vs gossip overlapped, on this machine.

    python benchmarks/step_time.py                       # p = 2, 4, 8; cnn and wide-mlp
    python benchmarks/step_time.py --procs 8 --models wide-mlp --steps 20
    python benchmarks/step_time.py --procs 8 --models wide-mlp --wire-dtype bfloat16 --streams 2

Each setting starts p gloo processes on this machine (loopback), trains the model on random
digits-shaped batches, and reports the median step time after warm-up, the bytes each rank sends
per step, the CPU time all ranks spend per step (user + system, gloo's threads and the kernel's
loopback copies included), and the replicas' consensus distance at the end. Prints a markdown table.

Two reference rows bound what any engine could do here. "compute only" trains the bare module with
no communication at all. "compute + bare exchange" adds, after each step, a blocking exchange of
the model's bytes with the step's gossip partner and nothing else (no snapshot, no mixing, no
overlap): with more processes than cores the CPU is the bottleneck, overlap cannot hide what the
CPU has to do anyway, and this row is close to the least a one-partner exchange can cost.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gossipgrad
from gossipgrad.schedule import plan
from gossipgrad.train.data import DatasetInfo
from gossipgrad.train.models import build_model

ALGOS = {  # label -> (algo, sync); "compute" trains the bare module with no communication
    "compute only": ("compute", False),
    "compute + bare exchange": ("floor", False),
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
    if algo in ("compute", "floor"):
        model = module
    else:
        model = gossipgrad.wrap(module, algo, sync=sync, wire_dtype=wire, streams=args.streams)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, *INFO.input_shape, generator=g)
    y = torch.randint(0, INFO.num_classes, (args.batch,), generator=g)
    exchange = _bare_exchange(module, rank, world) if algo == "floor" else None
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
            cpu_start = time.process_time()
        start = time.perf_counter()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if exchange is not None:
            exchange(step)
        times.append(time.perf_counter() - start)
    busy = time.process_time() - cpu_start  # this process, all threads, user + system
    cpu = torch.tensor([busy / args.steps], dtype=torch.float64)
    dist.all_reduce(cpu)
    distance = float("nan")
    if algo not in ("compute", "floor"):
        model.flush()
        distance = model.consensus_distance()
    if rank == 0:
        steady = times[args.warmup :]
        params = sum(p.numel() for p in module.parameters())
        with open(os.path.join(folder, "result.txt"), "w") as f:
            sent = getattr(model, "bytes_sent_last_step", 0)
            sent = params * 4 if algo == "floor" else sent
            f.write(f"{statistics.median(steady)} {sent} {distance} {params} {cpu.item()}")
    dist.destroy_process_group()


def _bare_exchange(module: nn.Module, rank: int, world: int) -> Callable[[int], None]:
    """A blocking send/receive of the model's bytes (25 MiB messages, as the engine's buckets)
    with the step's gossip partner."""
    numel = sum(p.numel() for p in module.parameters())
    chunk = 25 * 2**20 // 4
    sends = [torch.randn(min(chunk, numel - i)) for i in range(0, numel, chunk)]
    recvs = [torch.empty_like(t) for t in sends]

    def exchange(step: int) -> None:
        ex = plan(rank, step, world)
        works = []
        for tag, (s, r) in enumerate(zip(sends, recvs, strict=True)):
            works.append(dist.irecv(r, ex.recv_from, tag=tag))
            works.append(dist.isend(s, ex.send_to, tag=tag))
        for work in works:
            work.wait()

    return exchange


def _measure(
    args: argparse.Namespace, label: str, world: int
) -> tuple[float, int, float, int, float]:
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(
            _worker, args=(world, folder, args, label), nprocs=world, start_method="fork"
        )
        with open(os.path.join(folder, "result.txt")) as f:
            step, sent, distance, params, cpu = f.read().split()
    return float(step), int(sent), float(distance), int(params), float(cpu)


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
        "| model | params | p | algorithm | step (ms) | vs all-reduce | CPU ms/step, all ranks "
        "| MB sent/rank/step | consensus distance |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        for world in args.procs:
            args.model = model
            rows = {label: _measure(args, label, world) for label in ALGOS}
            base = rows["all-reduce"][0]
            for label, (step, sent, distance, params, cpu) in rows.items():
                ratio = "–" if label == "compute only" else f"{base / step:.2f}x"
                spread = "–" if math.isnan(distance) else f"{distance:.2e}"  # no replicas
                print(
                    f"| {model} | {params / 1e6:.1f}M | {world} | {label} | {step * 1e3:.1f} "
                    f"| {ratio} | {cpu * 1e3:.0f} | {sent / 1e6:.1f} | {spread} |",
                    flush=True,
                )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
