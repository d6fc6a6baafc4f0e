"""gossipgrad against the peers a user already has in torch, on an emulated cluster
(benchmarks/netcluster.sh: network namespaces + tbf rate limits; needs root).

Driver (one netcluster per setting, taken under /tmp/netcluster.lock; prints markdown tables and
writes benchmarks/results/peers.json; ``--merge`` keeps the results of other settings and seeds):

    python benchmarks/peers.py --hosts 4 --rates 1gbit --seeds 0 --epochs 5
    python benchmarks/peers.py --hosts 8 --rates 1gbit --seeds 0 --epochs 5 --merge
    python benchmarks/peers.py --show                      # the tables of the JSON, nothing run
    python benchmarks/peers.py --quick --out /tmp/q.json   # smoke run: 2 hosts, tiny model

Every contender trains the same model (``wide-mlp``, 33.9M parameters, on the embedded digits),
from the same initialisation (``torch.manual_seed(seed)``), on the same shards and batch order
(``--batch`` per host), with SGD (``--lr``, ``--momentum``) for ``--epochs`` epochs. Contenders
(``--contenders``; names are parsed, so other K, H and ranks work too):

- ``ddp``: torch ``DistributedDataParallel``; ``ddp-fp16``: with ``fp16_compress_hook``;
  ``ddp-powersgd-rR``: with ``powerSGD_hook`` at rank R (``start_powerSGD_iter=2``, the least
  torch allows with error feedback; one bucket, which gloo needs);
- ``localsgd-kK``: torch post-local SGD, ``PostLocalSGDOptimizer`` + ``PeriodicModelAverager``
  (period K, no warm-up: from the first step, as gossip); ``local``: no communication at all (the
  replicas are averaged only to evaluate);
- ``diloco-hH[-outerLRmM]``: torchft's ``DiLoCo`` (benchmarks/_torchft_diloco.py; needs the
  ``bench`` extra): H inner SGD steps, then the pseudo-gradient is all-reduced and an outer SGD
  step with Nesterov momentum (lr 0.7, m 0.9, the paper's, unless ``-outerLRmM``) moves the
  global weights; its state between rounds is torchft's own checkpoint of the manager;
- ``gossip[-kK][-bf16|-fp16|-int8][-pgaH][-sync]``: ``gossipgrad.wrap(module, "gossip", ...)``
  with ``gossip_every=K``, ``wire_dtype``, ``average_every=H`` (Gossip-PGA), ``sync=True``.

**Rounds are interleaved**: each host's process trains contender A for one epoch, then B, then
C, then A's next epoch, ..., so that a change of the machine's load hits every contender alike.
Between its rounds a contender's state (parameters, optimizer, PowerSGD's error feedback and
warm start, the averager's and gossip's step counters) waits on disk (``--state-dir``) and its
wrapper is rebuilt without a broadcast (``init_sync=False``); the exchange in flight at the end
of an epoch is completed inside the timed epoch. After every epoch the exported model is
evaluated on the held-out split: DDP's replica; the exact average of the replicas for gossip
(``average_replicas(into=...)``), local SGD and ``local``. Training time excludes evaluations
and the switching between rounds. Before the first seed, each contender trains
``--warmup-steps`` steps untimed on a replica that is then dropped: a process's first touches of
fresh memory are slow (seconds on a VM), and without it they would all land on the first
contender's first round. The driver also runs the workers with glibc keeping what they free
(``--keep-heap``, the default: ``GLIBC_TUNABLES`` set to ``KEEP_HEAP``), as a user would preload
jemalloc or tcmalloc (PyTorch's CPU performance tuning guide): with glibc's defaults every
tensor over 32 MB is a fresh ``mmap``, and on this VM, where freed pages go back to the host at
once (free page reporting), every first touch of a page costs tens of microseconds under load.
That taxed every contender's steps (``zero_grad`` frees the gradients at every step), and the
first step of a round most. ``--no-keep-heap`` measures with glibc's defaults.

Columns: the median step of the slowest rank (each rank's median over all its steps, the
largest over ranks) and the mean step (training time / steps); MB per rank per step as counted
on each host's link (its interface's transmit counter over the timed epochs, TCP/IP headers and
ACKs included; ``hierarchical_bench._tx_bytes``), next to what the algorithm should send;
the exported model's final accuracy over the seeds (mean ± std); and the training time to DDP's
mean final accuracy (first evaluation at or above it, so resolved to one epoch;
``time_to_accuracy.time_to``). Switching rounds has a price that one uninterrupted run pays only
once: the first step of a rebuilt wrapper is slower (fresh memory; DDP's first iteration
all-reduces one bucket after backward); the last two columns take, from the second round on, the
first step's excess over the round's median off the clock (``continuous``; every step is in the
JSON). All hosts share this machine's cores; the JSON records the load average at every round.

One setting by hand (what the driver runs; rank 0 rewrites --out after every round):

    flock /tmp/netcluster.lock benchmarks/netcluster.sh run 4 1gbit -- sh -c \\
        'GLOO_SOCKET_IFNAME=$NC_IFACE OMP_NUM_THREADS=1 exec torchrun --nnodes $NC_HOSTS \\
        --node-rank $NC_HOST --nproc-per-node 1 --master-addr $NC_MASTER --master-port 29600 \\
        benchmarks/peers.py --worker --rate 1gbit --epochs 5 --contenders ddp gossip-k8-bf16 \\
        --out /tmp/peers_4x1gbit.json'
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from network_bench import rate_bytes  # noqa: E402
from time_to_accuracy import LOCK, _wait_for_quiet_network, time_to  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CONTENDERS = (
    "ddp",
    "ddp-powersgd-r1",
    "ddp-powersgd-r4",
    "ddp-fp16",
    "localsgd-k4",
    "localsgd-k8",
    "gossip",
    "gossip-k4",
    "gossip-k8",
    "gossip-bf16",
    "gossip-pga16",
    "gossip-k8-bf16",
    "local",
)
# glibc keeps what a worker frees (no mmap, no trim), so that rebuilding every contender at
# every round reuses the process's pages: on this VM a freed page goes back to the host at once
# (free page reporting) and the next first touch of it costs tens of microseconds under load.
KEEP_HEAP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
POWERSGD_START = 2  # the least start_powerSGD_iter torch accepts with error feedback
OUTER = re.compile(r"(.+?)-outer([0-9.]+)m([0-9.]+)")  # an outer step's lr and momentum
_GOSSIP = re.compile(r"gossip(?:-k(\d+))?(?:-(bf16|fp16|int8))?(?:-pga(\d+))?(-sync)?")


# --- contenders ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A contender, parsed from its name."""

    name: str
    family: str  # "ddp", "localsgd", "diloco" or "gossip"
    hook: str = ""  # ddp: "", "fp16" or "powersgd"
    rank: int = 0  # powersgd
    period: int = 0  # localsgd: K (0: no communication); diloco: H
    outer: tuple[float, float] = (0.7, 0.9)  # diloco: the outer step's lr and Nesterov momentum
    gossip: tuple[tuple[str, Any], ...] = ()  # gossip: GossipOptions overrides, as text

    @property
    def peer(self) -> bool:
        """A peer (the bar to beat): DDP, post-local SGD or DiLoCo; not gossipgrad and not the
        no-communication row."""
        return self.family in ("ddp", "diloco") or (self.family == "localsgd" and self.period > 0)

    def label(self) -> str:
        if self.family == "ddp":
            extra = {"": "", "fp16": " + fp16_compress_hook"}.get(self.hook)
            return "DDP" + (extra if extra is not None else f" + PowerSGD r{self.rank}")
        if self.family == "localsgd":
            return f"torch post-local SGD, K = {self.period}" if self.period else "no communication"
        if self.family == "diloco":
            lr, momentum = self.outer
            return f"DiLoCo (torchft), H = {self.period}, outer Nesterov lr {lr} m {momentum}"
        o = dict(self.gossip)
        parts = [f"every {o['gossip_every']} steps"] if "gossip_every" in o else []
        parts += [f"{o['wire_dtype']} on the wire"] if "wire_dtype" in o else []
        parts += [f"exact average every {o['average_every']}"] if "average_every" in o else []
        parts += ["sync"] if o.get("sync") else []
        return "gossipgrad" + (", " + ", ".join(parts) if parts else " (every step)")


def parse(name: str) -> Spec:
    if name == "ddp":
        return Spec(name, "ddp")
    if name == "ddp-fp16":
        return Spec(name, "ddp", hook="fp16")
    if m := re.fullmatch(r"ddp-powersgd-r(\d+)", name):
        return Spec(name, "ddp", hook="powersgd", rank=int(m[1]))
    if name == "local":
        return Spec(name, "localsgd")
    if m := re.fullmatch(r"localsgd-k(\d+)", name):
        return Spec(name, "localsgd", period=int(m[1]))
    if m := re.fullmatch(r"diloco-h([1-9]\d*)", OUTER.sub(r"\1", name)):
        outer = OUTER.fullmatch(name)
        lr_momentum = (float(outer[2]), float(outer[3])) if outer else (0.7, 0.9)
        return Spec(name, "diloco", period=int(m[1]), outer=lr_momentum)
    if m := _GOSSIP.fullmatch(name):
        o: dict[str, Any] = {}
        if m[1]:
            o["gossip_every"] = int(m[1])
        if m[2]:
            o["wire_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "int8": "int8"}[m[2]]
        if m[3]:
            o["average_every"] = int(m[3])
        if m[4]:
            o["sync"] = True
        return Spec(name, "gossip", gossip=tuple(sorted(o.items())))
    raise ValueError(
        f"unknown contender {name!r}: ddp, ddp-fp16, ddp-powersgd-rR, localsgd-kK, local, "
        "diloco-hH[-outerLRmM], gossip[-kK][-bf16|-fp16|-int8][-pgaH][-sync]"
    )


def expected_bytes(spec: Spec, shapes: list[list[int]], world: int, steps: int) -> float:
    """What ``spec`` should put on a rank's link per step on average over ``steps`` steps
    (payload only: gloo's ring all-reduce sends 2(p-1)/p of a buffer per rank)."""
    if world < 2 or steps < 1:
        return 0.0
    ring = 2 * (world - 1) / world
    numels = [math.prod(s) for s in shapes]
    model = 4 * sum(numels)
    if spec.family == "ddp":
        if spec.hook == "fp16":
            return ring * model / 2
        if spec.hook == "powersgd":
            packed = 0
            for shape, numel in zip(shapes, numels, strict=True):
                n = shape[0] if len(shape) >= 2 else numel
                m = numel // n
                small = len(shape) >= 2 and (n + m) * spec.rank * 2 < n * m
                packed += (n + m) * spec.rank if small else numel  # P and Q, or uncompressed
            vanilla = min(POWERSGD_START, steps)
            return ring * (vanilla * model + (steps - vanilla) * 4 * packed) / steps
        return ring * model
    if spec.family == "localsgd":
        return ring * model * math.ceil(steps / spec.period) / steps if spec.period else 0.0
    if spec.family == "diloco":  # after every H-th step, from the H-th
        return ring * model * (steps // spec.period) / steps
    o = dict(spec.gossip)
    from gossipgrad._quantize import encoded_size

    wire = {None: model, "int8": encoded_size(sum(numels))}.get(o.get("wire_dtype"), model // 2)
    # the exchange of step s (a multiple of K) leaves at the end of step s - 1: exchange 0 is
    # never sent, and the last step's end sends the exchange of step `steps` (the epoch's
    # flush completes it)
    sent = wire * (steps // o.get("gossip_every", 1))
    if o.get("average_every"):
        sent += ring * model * (steps // o["average_every"])
    return sent / steps


# --- worker: one process per host (torchrun) ----------------------------------------------------


class Runner:
    """One contender's wrapper, optimizer and export, rebuilt for every round."""

    def __init__(
        self, spec: Spec, module: Any, args: argparse.Namespace, extra: Any, index: int = 0
    ) -> None:
        import torch

        self.spec, self.module, self.model = spec, module, module
        self.opt: Any = torch.optim.SGD(module.parameters(), lr=args.lr, momentum=args.momentum)
        self.finish = lambda: None
        self.powersgd: Any = None
        timeout = timedelta(seconds=args.pg_timeout)
        if spec.family == "ddp":
            self._ddp(args, extra)
        elif spec.family == "localsgd" and spec.period:
            from torch.distributed.algorithms.model_averaging.averagers import (
                PeriodicModelAverager,
            )
            from torch.distributed.optim import PostLocalSGDOptimizer

            averager = PeriodicModelAverager(period=spec.period, warmup_steps=0)
            self.opt = PostLocalSGDOptimizer(self.opt, averager)
        elif spec.family == "diloco":  # index: the contender's own lighthouse port
            from _torchft_diloco import TorchftDiLoCo

            self.diloco = TorchftDiLoCo(
                [module],
                self.opt,
                sync_every=spec.period,
                outer=spec.outer,
                index=index,
                name=spec.name,
                timeout=timeout,
            )
            self.finish = self.diloco.finish
            if extra is not None:
                self.diloco.load_state_dict(extra)
        elif spec.family == "gossip":
            import gossipgrad
            from gossipgrad.options import WIRE_DTYPES

            o = dict(spec.gossip)
            if "wire_dtype" in o:
                o["wire_dtype"] = WIRE_DTYPES[o["wire_dtype"]]
            self.model = gossipgrad.wrap(module, "gossip", init_sync=False, timeout=timeout, **o)
            self.finish = self.model.flush
            if extra is not None:
                self.model.load_gossip_state(extra)

    def _ddp(self, args: argparse.Namespace, extra: Any) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
        from torch.nn.parallel import DistributedDataParallel

        spec, module = self.spec, self.module
        keywords: dict[str, Any] = {"init_sync": False}
        if spec.hook == "powersgd":  # one bucket: PowerSGD on gloo aborts with several
            nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
            keywords["bucket_cap_mb"] = math.ceil(nbytes / 2**20) + 1
        self.model = DistributedDataParallel(module, **keywords)
        if spec.hook == "fp16":
            self.model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif spec.hook == "powersgd":
            self.powersgd = psgd.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=spec.rank,
                start_powerSGD_iter=POWERSGD_START,
            )
            for slot, value in (extra or {}).items():
                setattr(self.powersgd, slot, value)
            self.model.register_comm_hook(self.powersgd, psgd.powerSGD_hook)

    def step(self, x: Any, y: Any) -> None:
        """One training step (the timed unit, and the warm-up's)."""
        import torch.nn.functional as F

        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()
        self.opt.zero_grad()

    def close(self) -> None:
        """Let this round's objects be freed: ``GossipDataParallel.close`` removes every hook it
        put on torch's optimizers and on the parameters, and frees its buffers (collective; the
        exchange in flight was completed by ``finish``); torchft's servers stop."""
        if self.spec.family == "gossip":
            self.model.close()
        elif self.spec.family == "diloco":
            self.diloco.close()

    def extra(self) -> Any:
        """What the next round needs besides parameters and optimizer state."""
        if self.powersgd is not None:
            slots = [s for s in self.powersgd.__slots__ if s != "process_group"]
            return {s: getattr(self.powersgd, s) for s in slots}
        if self.spec.family == "gossip":
            return self.model.gossip_state()
        if self.spec.family == "diloco":
            return self.diloco.state_dict()
        return None

    def exported(self, scratch: Any) -> Any:
        """The model this contender exports (collective)."""
        import torch
        import torch.distributed as dist

        if self.spec.family == "ddp":
            return self.module  # every replica is the same
        if self.spec.family == "gossip":
            self.model.average_replicas(into=scratch)
            return scratch
        params = list(self.module.parameters())
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        with torch.no_grad():
            offset = 0
            for p in scratch.parameters():
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return scratch


def _accuracy(model: Any, x: Any, y: Any) -> float:
    import torch

    was = model.training
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).sum().item()
    model.train(was)
    return correct / len(y)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch._dynamo  # noqa: F401 - the first optimizer imports it (seconds of CPU)
    import torch.distributed as dist
    from hierarchical_bench import _tx_bytes

    import gossipgrad
    from gossipgrad.train.data import load_dataset
    from gossipgrad.train.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.pg_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    iface = os.environ.get("GLOO_SOCKET_IFNAME", "eth0")
    train, test, info = load_dataset("digits", seed=0)  # one split for every seed
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    per_rank = len(y_train) // world
    steps_per_epoch = per_rank // args.batch
    if args.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)
    model_options = {"width": args.width, "depth": args.depth}

    def build(seed: int) -> Any:
        torch.manual_seed(seed)
        return build_model("wide-mlp", info, **model_options)

    scratch = build(0)
    shapes = [list(p.shape) for p in scratch.parameters()]
    specs = [parse(c) for c in args.contenders]
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "hosts": world,
        "rate": args.rate,
        "link_bytes_per_s": rate_bytes(args.rate),
        "dataset": "digits",
        "model": "wide-mlp",
        "model_options": model_options,
        "params": sum(math.prod(s) for s in shapes),
        "model_bytes": 4 * sum(math.prod(s) for s in shapes),
        "batch_per_host": args.batch,
        "lr": args.lr,
        "momentum": args.momentum,
        "epochs": args.epochs,
        "steps_per_epoch": steps_per_epoch,
        "warmup_steps": args.warmup_steps,
        "test_samples": len(y_test),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "gossipgrad_file": gossipgrad.__file__,
        "powersgd_start_iter": POWERSGD_START,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "load_average_1min_start": os.getloadavg()[0],
        "runs": [],
    }
    warm = [slice(i * args.batch, (i + 1) * args.batch) for i in range(args.warmup_steps)]
    for index, spec in enumerate(specs):  # untimed: no contender pays the first touches
        runner = Runner(spec, build(0), args, None, index)
        for rows in warm:
            runner.step(x_train[rows], y_train[rows])
        runner.finish()
        runner.close()
        del runner
        gc.collect()
    for seed in args.seeds:
        runs: dict[str, dict[str, Any]] = {}
        for spec in specs:
            runs[spec.name] = {
                "contender": spec.name,
                "label": spec.label(),
                "seed": seed,
                "evals": [],
                "step_times_s": [[] for _ in range(world)],
                "tx_bytes": [0] * world,
                "train_time_s": 0.0,
                "steps": 0,
                "rounds": [],
                "error": None,
            }
            result["runs"].append(runs[spec.name])
        for epoch in range(args.epochs):
            gen = torch.Generator().manual_seed(1000 * seed + epoch)
            shard = torch.randperm(len(y_train), generator=gen)[rank::world][:per_rank]
            batches = [shard[i * args.batch : (i + 1) * args.batch] for i in range(steps_per_epoch)]
            for index, spec in enumerate(specs):
                run = runs[spec.name]
                if run["error"] is not None:
                    continue
                path = state_dir / f"{spec.name}_s{seed}_r{rank}.pt"
                load_avg = os.getloadavg()[0]
                switch = time.perf_counter()
                times: list[float] = []
                error = ""
                train_s = eval_s = 0.0
                tx = 0
                stalls = [0, 0]
                acc = float("nan")
                try:
                    module = build(seed)
                    saved = _load_uncached(path) if epoch else None
                    if saved is not None:
                        module.load_state_dict(saved["model"])
                    extra = saved and saved["extra"]
                    runner = Runner(spec, module, args, extra, index)
                    if saved is not None:
                        runner.opt.load_state_dict(saved["optim"])
                    del saved
                    switch = time.perf_counter() - switch
                    dist.barrier()
                    stalls = _stalls()
                    sent, start = _tx_bytes(iface), time.perf_counter()
                    for idx in batches:
                        x, y = x_train[idx], y_train[idx]
                        t = time.perf_counter()
                        runner.step(x, y)
                        times.append(time.perf_counter() - t)
                    runner.finish()
                    train_s = time.perf_counter() - start
                    stalls = [b - a for a, b in zip(stalls, _stalls(), strict=True)]
                    # A completed send may still sit in this host's rate-limited queue: a
                    # barrier, whose messages queue behind it, lets it reach the counter.
                    dist.barrier()
                    tx = _tx_bytes(iface) - sent
                    t = time.perf_counter()
                    exported = runner.exported(scratch)
                    if rank == 0:
                        acc = _accuracy(exported, x_test, y_test)
                    eval_s = time.perf_counter() - t
                    t = time.perf_counter()
                    _save_uncached(
                        {
                            "model": module.state_dict(),
                            "optim": runner.opt.state_dict(),
                            "extra": runner.extra(),
                        },
                        path,
                    )
                    runner.close()
                    del runner, module, exported
                    gc.collect()
                    switch += time.perf_counter() - t
                except Exception as exc:  # noqa: BLE001 - recorded, and the contender stopped
                    error = f"rank {rank}: {type(exc).__name__}: {exc}"
                    print(f"[{spec.name}] seed {seed} epoch {epoch}: {error}", file=sys.stderr)
                    gc.collect()
                gathered: list[Any] = [None] * world
                rss = _rss_mb()
                dist.all_gather_object(gathered, (times, tx, train_s, switch, error, rss))
                if rank != 0:
                    run["error"] = next((g[4] for g in gathered if g[4]), None)
                    continue
                errors = [g[4] for g in gathered if g[4]]
                if errors:
                    run["error"] = f"epoch {epoch}: " + "; ".join(errors)
                    print(f"[{spec.name}] stopped: {run['error']}", flush=True)
                else:
                    for r, g in enumerate(gathered):
                        run["step_times_s"][r] += [round(s, 6) for s in g[0]]
                        run["tx_bytes"][r] += g[1]
                    slowest = max(g[2] for g in gathered)
                    run["train_time_s"] += slowest
                    run["steps"] += len(batches)
                    run["evals"].append(
                        {
                            "epoch": epoch + 1,
                            "step": run["steps"],
                            "time": run["train_time_s"],
                            "test_acc": acc,
                        }
                    )
                    print(
                        f"[{world}x{args.rate} seed {seed}] epoch {epoch + 1} {spec.name}: "
                        f"{slowest:.1f} s, {statistics.median(times) * 1e3:.0f} ms/step (rank 0), "
                        f"acc {acc:.4f}, load {load_avg:.1f}",
                        flush=True,
                    )
                run["rounds"].append(
                    {
                        "epoch": epoch + 1,
                        "rss_mb": max(g[5] for g in gathered),
                        "load_average_1min": load_avg,
                        "switch_s": max(g[3] for g in gathered),
                        "eval_s": eval_s,
                        # the machine's, over the timed epoch (rank 0's host: all share it)
                        "direct_reclaim_stalls": stalls[0],
                        "compaction_stalls": stalls[1],
                    }
                )
                _finish_run(run, spec, shapes, world)
                result["load_average_1min_end"] = os.getloadavg()[0]
                _write(result, Path(args.out))
        for spec in specs:
            (state_dir / f"{spec.name}_s{seed}_r{rank}.pt").unlink(missing_ok=True)
    dist.barrier()
    dist.destroy_process_group()


def _save_uncached(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` that leaves no page cache behind: the contenders' states (GBs at full
    size) would otherwise fill this machine's memory, and every fresh page a worker then touches
    would pay for reclaiming it (direct reclaim, inside the timed steps)."""
    import torch

    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _load_uncached(path: Path) -> Any:
    """``torch.load`` of a state ``_save_uncached`` wrote (ours: pickled), out of the cache."""
    import torch

    with open(path, "rb") as f:
        state = torch.load(f, weights_only=False)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return state


def _stalls() -> list[int]:
    """This machine's allocation stalls so far (Linux ``/proc/vmstat``): direct reclaims and
    compactions. A fresh page that waits for either costs milliseconds, not microseconds."""
    counts = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    reclaim = sum(int(v) for k, v in counts.items() if k.startswith("allocstall_"))
    return [reclaim, int(counts.get("compact_stall", 0))]


def _rss_mb() -> float:
    """This process's resident memory, MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _finish_run(run: dict[str, Any], spec: Spec, shapes: list[list[int]], world: int) -> None:
    """The run's summary figures from what its rounds recorded so far (rank 0)."""
    steps = run["steps"]
    if not steps:
        return
    run["step_median_s"] = max(statistics.median(t) for t in run["step_times_s"])
    run["step_mean_s"] = run["train_time_s"] / steps
    run["mb_per_rank_per_step"] = statistics.mean(run["tx_bytes"]) / steps / 1e6
    run["mb_per_rank_per_step_max"] = max(run["tx_bytes"]) / steps / 1e6
    run["expected_mb_per_rank_per_step"] = expected_bytes(spec, shapes, world, steps) / 1e6
    run["final_test_acc"] = run["evals"][-1]["test_acc"]


def _write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)


# --- driver: one netcluster per setting ----------------------------------------------------------


def _git() -> dict[str, Any]:
    def git(*a: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return done.stdout.strip()

    dirty = bool(git("status", "--porcelain", "src"))
    return {"commit": git("rev-parse", "HEAD"), "src_dirty": dirty}


def _lock(wait_s: float) -> Any:
    """The netcluster lock (as `flock /tmp/netcluster.lock`), or exit 3 after ``wait_s``."""
    lock = open(LOCK, "w")  # noqa: SIM115 - held for the whole setting
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                print(f"{LOCK} stayed taken for {wait_s:.0f} s", file=sys.stderr)
                sys.exit(3)
            time.sleep(2)


def _run_setting(hosts: int, rate: str, args: argparse.Namespace) -> dict[str, Any] | None:
    out = Path(args.state_dir) / f"peers_{hosts}x{rate}.json"
    worker = [
        "--rate", rate, "--epochs", str(args.epochs),
        "--steps-per-epoch", str(args.steps_per_epoch), "--warmup-steps", str(args.warmup_steps),
        "--batch", str(args.batch),
        "--lr", str(args.lr), "--momentum", str(args.momentum), "--width", str(args.width),
        "--depth", str(args.depth), "--pg-timeout", str(args.pg_timeout),
        "--state-dir", str(Path(args.state_dir) / f"{hosts}x{rate}"),
        "--seeds", *map(str, args.seeds), "--contenders", *args.contenders,
    ]  # fmt: skip
    result = run_on_netcluster(Path(__file__), worker, hosts, rate, out, args, "RUST_LOG=warn")
    shutil.rmtree(Path(args.state_dir) / f"{hosts}x{rate}", ignore_errors=True)
    return result


def run_on_netcluster(
    script: Path,
    worker: list[str],
    hosts: int,
    rate: str,
    out: Path,
    args: argparse.Namespace,
    env: str = "",
) -> dict[str, Any] | None:
    """``script --worker --out OUT WORKER...`` under torchrun on every host of a fresh
    netcluster of ``hosts`` at ``rate`` (taken under the lock; ``args``: ``keep_heap``,
    ``lock_wait``, ``timeout``); rank 0's ``out`` with the run's facts, or None if no round
    finished. ``env``: more ``NAME=value`` words for the workers."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    inner = [
        "torchrun", "--nnodes", "$NC_HOSTS", "--node-rank", "$NC_HOST", "--nproc-per-node", "1",
        "--master-addr", "$NC_MASTER", "--master-port", "29600", str(script.resolve()),
        "--worker", "--out", str(out), *worker,
    ]  # fmt: skip
    keep = f"GLIBC_TUNABLES={KEEP_HEAP} " if args.keep_heap else ""
    script_text = f"{keep}{env + ' ' if env else ''}GLOO_SOCKET_IFNAME=$NC_IFACE OMP_NUM_THREADS=1 "
    script_text += "exec " + " ".join(a if a.startswith("$") else shlex.quote(a) for a in inner)
    netcluster = str(ROOT / "benchmarks" / "netcluster.sh")
    cmd = [netcluster, "run", str(hosts), rate, "--", "sh", "-c", script_text]
    with _lock(args.lock_wait):
        _wait_for_quiet_network(args.lock_wait)
        print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, timeout=args.timeout, check=False)
            code: int | str = done.returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {args.timeout:.0f} s"
        wall = time.perf_counter() - start
    if not out.exists():
        print(f"{hosts} hosts at {rate} failed before any round (exit {code})", file=sys.stderr)
        return None
    result = json.loads(out.read_text())
    result.update(_git(), wall_s=wall, exit=code, command=shlex.join(sys.argv))
    if code != 0:
        print(f"{hosts} hosts at {rate}: exit {code}; keeping the rounds done", file=sys.stderr)
    return result


def _setting_key(setting: dict[str, Any]) -> tuple:
    """What makes two invocations the same setting; the allocator comes last
    (``_other_allocator``)."""
    return (
        setting["hosts"],
        setting["rate"],
        setting["epochs"],
        json.dumps(setting["model_options"]),
        setting["batch_per_host"],
        setting.get("glibc_tunables", ""),
    )


def _key(run: dict[str, Any], setting: dict[str, Any]) -> tuple:
    return (*_setting_key(setting), run["contender"], run["seed"])


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Settings of ``old`` and ``new``; a (setting, contender, seed) run in ``new`` replaces
    the same one in ``old``; a setting left with no run is dropped."""
    fresh = {_key(r, s) for s in new for r in s["runs"]}
    kept = []
    for s in old:
        runs = [r for r in s["runs"] if _key(r, s) not in fresh]
        if runs:
            kept.append({**s, "runs": runs})
    return kept + new


def _group(settings: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Runs of the same setting from every merged invocation, by contender."""
    groups: dict[tuple, dict[str, Any]] = {}
    for s in settings:
        key = (rate_bytes(s["rate"]), *_setting_key(s))
        g = groups.setdefault(key, {"setting": s, "loads": [], "by": {}, "sources": []})
        g["loads"] += [x["load_average_1min"] for r in s["runs"] for x in r.get("rounds", [])]
        g["sources"].append(s.get("commit", "?")[:10] + ("+dirty" if s.get("src_dirty") else ""))
        for r in s["runs"]:
            if r.get("steps"):
                g["by"].setdefault(r["contender"], []).append(r)
    return dict(sorted(groups.items()))


def stopped_runs(settings: list[dict[str, Any]], setting: dict[str, Any]) -> list[str]:
    """Table lines for the runs of ``setting``'s (hosts, rate) that stopped with an error."""
    return [
        f"\nstopped: {r['contender']} (seed {r['seed']}): {r['error']}"
        for other in settings
        if (other["hosts"], other["rate"]) == (setting["hosts"], setting["rate"])
        for r in other["runs"]
        if r.get("error")
    ]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def _secs(t: float) -> str:
    return f"{t:.0f}" if t >= 10 else f"{t:.2f}"


def continuous(run: dict[str, Any], steps_per_epoch: int) -> dict[str, Any]:
    """``run`` with the evaluations' training times as a run without round switches would
    have them: a rebuilt wrapper's first step pays for fresh memory (and DDP's first iteration
    for its single, non-overlapped bucket) at every round, where one uninterrupted run pays
    once. From the second round on, the excess of the round's first step over the median of
    its other steps, the least over ranks (what every rank paid), is taken off."""
    times, n = run["step_times_s"], steps_per_epoch
    excess, evals, removed = [], [], 0.0
    for e, ev in enumerate(run["evals"]):
        per_rank = [t[e * n] - statistics.median(t[e * n + 1 : (e + 1) * n] or t[e * n : e * n + 1])
                    for t in times]  # fmt: skip
        excess.append(max(0.0, min(per_rank)) if e else 0.0)
        removed += excess[-1]
        evals.append({**ev, "time": ev["time"] - removed})
    return {**run, "evals": evals, "switch_excess_s": excess}


def _hits(
    by: dict[str, list[dict[str, Any]]], target: float | None
) -> dict[str, tuple[float, int]]:
    """Per contender: the mean time to ``target`` over the seeds that reach it, and how many
    seeds do not."""
    hits = {}
    for name, rs in by.items():
        reached = [h["time"] for r in rs if target is not None and (h := time_to(r, target))]
        if reached:
            hits[name] = (statistics.mean(reached), len(rs) - len(reached))
    return hits


def _hit(hits: dict[str, tuple[float, int]], name: str, seeds: int) -> str:
    if name not in hits:
        return "not reached"
    t, missed = hits[name]
    return _secs(t) + (f" ({seeds - missed}/{seeds})" if missed else "")


def _row(rs: list[dict[str, Any]], base: float | None, cells: list[str]) -> str:
    """One contender's table row over its seeds ``rs``; ``base``: DDP's mean step."""
    mean = lambda key: statistics.mean(r[key] for r in rs)  # noqa: E731
    acc, std = _mean_std([r["final_test_acc"] for r in rs])
    acc_text = f"{acc:.2%}" + (f" ± {std:.2%}" if len(rs) > 1 else "") + f" ({len(rs)})"
    vs = f"{base / mean('step_mean_s'):.2f}x" if base else "-"
    return (
        f"| {rs[0]['label']} | {mean('step_median_s') * 1e3:.0f} | "
        f"{mean('step_mean_s') * 1e3:.0f} | {vs} | {mean('mb_per_rank_per_step'):.2f} "
        f"({mean('expected_mb_per_rank_per_step'):.2f}) | {acc_text} | " + " | ".join(cells) + " |"
    )


def tables(settings: list[dict[str, Any]]) -> str:
    """A markdown table per setting, and the targets checked on it."""
    out = []
    groups = _group(settings)
    for key, g in groups.items():
        s, by = g["setting"], g["by"]
        ddp = by.get("ddp", [])
        other = None if ddp else _other_allocator(groups, key)
        accs = [r["final_test_acc"] for r in (ddp or (other["by"]["ddp"] if other else []))]
        target = statistics.mean(accs) if accs else None
        ddp_std = _mean_std(accs)[1] if accs else float("nan")
        base = statistics.mean(r["step_mean_s"] for r in ddp) if ddp else None
        seeds = sorted({r["seed"] for rs in by.values() for r in rs})
        loads = g["loads"] or [float("nan")]
        heap = "keeping freed memory" if s.get("glibc_tunables") else "defaults"
        out.append(
            f"\n{s['hosts']} hosts at {s['rate']}, wide-mlp {s['model_options']} "
            f"({s['params'] / 1e6:.1f}M parameters, {s['model_bytes'] / 1e6:.1f} MB), digits, "
            f"batch {s['batch_per_host']} per host, SGD lr {s['lr']} momentum {s['momentum']}, "
            f"{s['epochs']} epochs of {s['steps_per_epoch']} steps, seeds {seeds}; "
            f"{s['cpus']} CPU cores shared by all hosts, load average "
            f"{min(loads):.1f}-{max(loads):.1f} (mean {statistics.mean(loads):.1f}) over the "
            f"rounds; glibc malloc {heap}; code {', '.join(sorted(set(g['sources'])))}\n"
        )
        if other is not None:
            out.append(_borrowed(by, other["by"]))
        goal = f"{target:.2%}" if target is not None else "DDP's accuracy"
        out += [
            "| contender | step ms (median, slowest rank) | mean step ms | vs DDP | "
            f"MB/rank/step on the link (expected) | final acc (seeds) | time to {goal} (s) | "
            "vs DDP | without round switches (s) | vs DDP |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        smooth = {n: [continuous(r, s["steps_per_epoch"]) for r in rs] for n, rs in by.items()}
        hits, hits_c = _hits(by, target), _hits(smooth, target)
        for name, rs in by.items():
            cells = []
            for h in (hits, hits_c):
                speed = f"{h['ddp'][0] / h[name][0]:.2f}x" if "ddp" in h and name in h else "-"
                cells += [_hit(h, name, len(rs)), speed]
            out.append(_row(rs, base, cells))
        out += stopped_runs(settings, s)
        out.append(_targets(by, hits, target, ddp_std))
        again = _targets(by, hits_c, target, ddp_std).splitlines()[2:]
        out += ["without round switches (the times of the last two columns):", *again]
        if target is not None and len(accs) > 1:  # the "within one std" of DDP's mean
            low = target - ddp_std
            out.append(f"within one std of DDP's mean (time to {low:.2%}, round switches in):")
            out += _targets(by, _hits(by, low), low, ddp_std).splitlines()[2:]
    return "\n".join(out)


def _other_allocator(groups: dict[tuple, dict[str, Any]], key: tuple) -> dict[str, Any] | None:
    """The group of the same setting under another allocator (``_group``'s key ends with it)
    that has DDP runs, if any."""
    same = [g for k, g in groups.items() if k[:-1] == key[:-1] and k != key]
    return next((g for g in same if "ddp" in g["by"]), None)


def _borrowed(by: dict[str, list[dict[str, Any]]], other: dict[str, list[dict[str, Any]]]) -> str:
    """The note on a target accuracy taken from DDP's runs under another allocator, with the
    check that the allocator changes times and not results."""
    pairs = [
        (r["final_test_acc"], o["final_test_acc"])
        for name, rs in by.items()
        for r in rs
        for o in other.get(name, [])
        if o["seed"] == r["seed"]
    ]
    same = sum(a == b for a, b in pairs)
    return (
        "DDP was not run with this allocator: the target is its accuracy under the other. "
        f"Runs of the same contender and seed under both: {same} of {len(pairs)} end with the "
        "same accuracy.\n"
    )


def _targets(
    by: dict[str, list[dict[str, Any]]],
    hits: dict[str, tuple[float, int]],
    target: float | None,
    ddp_std: float,
) -> str:
    """Target (a): the best gossipgrad setting reaches DDP's accuracy in at most 0.8x the best
    peer's time; (b): a gossipgrad setting that reaches it sends at most local SGD K = 8's bytes
    per step. Only settings that reach the target on every seed count."""
    if target is None:
        return "\ntargets: no DDP run, no target accuracy"
    full = {n: t for n, (t, missed) in hits.items() if missed == 0}
    peers = {n: t for n, t in full.items() if parse(n).peer}
    ours = {n: t for n, t in full.items() if parse(n).family == "gossip"}
    mb = {n: statistics.mean(r["mb_per_rank_per_step"] for r in rs) for n, rs in by.items()}
    acc = {n: statistics.mean(r["final_test_acc"] for r in rs) for n, rs in by.items()}
    lines = [f"\ntarget accuracy {target:.2%} (DDP's mean final accuracy; std {ddp_std:.2%})"]
    if peers and ours:
        peer, mine = min(peers, key=peers.get), min(ours, key=ours.get)
        ratio = ours[mine] / peers[peer]
        lines.append(
            f"(a) fastest gossipgrad setting to it: {mine}, {_secs(ours[mine])} s (final "
            f"{acc[mine]:.2%}); fastest peer: {peer}, {_secs(peers[peer])} s; ratio "
            f"{ratio:.3f} (target <= 0.80: {'met' if ratio <= 0.8 else 'not met'})"
        )
    else:
        who = "no gossipgrad setting" if not ours else "no peer"
        lines.append(f"(a) not decided: {who} reached the target on every seed")
    if ours and "localsgd-k8" in mb:
        least = min(ours, key=mb.get)
        met = mb[least] <= mb["localsgd-k8"]
        lines.append(
            f"(b) fewest bytes among gossipgrad settings that reach it: {least}, "
            f"{mb[least]:.2f} MB/rank/step, against local SGD K = 8's {mb['localsgd-k8']:.2f} "
            f"(final {acc['localsgd-k8']:.2%}; {'met' if met else 'not met'})"
        )
    return "\n".join(lines)


def driver(args: argparse.Namespace) -> None:
    out = Path(args.out)
    settings = []
    for rate in args.rates:
        for hosts in args.hosts:
            result = _run_setting(hosts, rate, args)
            if result is not None:
                settings.append(result)
                old = json.loads(out.read_text()) if args.merge and out.exists() else []
                _write_settings(merge(old, settings) if args.merge else settings, out)
    if not settings:
        sys.exit("no setting finished a round")
    final = json.loads(out.read_text())
    print(tables(final))
    print(f"\nwrote {out}")


def _write_settings(settings: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=1) + "\n")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hosts", type=int, nargs="+", default=[4, 8], help="driver: host counts")
    p.add_argument("--rates", nargs="+", default=["1gbit"], help="driver: link rates (tc syntax)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--contenders", nargs="+", default=list(DEFAULT_CONTENDERS))
    p.add_argument("--out", help="the results JSON (default benchmarks/results/peers.json)")
    p.add_argument("--merge", action="store_true", help="keep --out's other settings and seeds")
    p.add_argument("--show", action="store_true", help="print the tables of --out, run nothing")
    quick = "smoke run: 2 hosts, 1 seed, 2 epochs of 6 steps, a 256-wide model"
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--batch", type=int, default=16, help="samples per step per host")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--width", type=int, default=4096, help="wide-mlp hidden width")
    p.add_argument("--depth", type=int, default=3, help="wide-mlp hidden layers")
    p.add_argument("--steps-per-epoch", type=int, default=0, help="at most this many (0: all)")
    warmup = "untimed steps of each contender before the first seed (on a dropped replica)"
    p.add_argument("--warmup-steps", type=int, default=8, help=warmup)
    heap = "driver: workers keep freed memory (GLIBC_TUNABLES, KEEP_HEAP), for every contender"
    p.add_argument("--keep-heap", action=argparse.BooleanOptionalAction, default=True, help=heap)
    p.add_argument("--timeout", type=float, default=4 * 3600, help="driver: seconds per setting")
    lock = "driver: give up (exit 3) when the netcluster stays taken this long (s)"
    p.add_argument("--lock-wait", type=float, default=3600, help=lock)
    p.add_argument("--pg-timeout", type=float, default=300, help="collective/peer timeout, s")
    state = "contenders' state between rounds (several GB at full size)"
    p.add_argument("--state-dir", default="/var/tmp/gossipgrad_peers", help=state)
    p.add_argument("--worker", action="store_true", help="one host's process (under torchrun)")
    p.add_argument("--rate", default="1gbit", help="worker: the link rate, recorded")
    args = p.parse_args(argv)
    if args.quick:
        args.hosts, args.rates, args.seeds = [2], ["1gbit"], [0]
        args.epochs, args.steps_per_epoch, args.width, args.depth = 2, 6, 256, 2
        args.out = args.out or "/tmp/gossipgrad_peers_quick.json"
    args.out = args.out or str(RESULTS / "peers.json")
    for c in args.contenders:
        try:
            parse(c)
        except ValueError as exc:
            p.error(str(exc))
    for name in ("epochs", "batch", "width", "depth"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for r in [*args.rates, args.rate]:
        try:
            rate_bytes(r)
        except ValueError as exc:
            p.error(str(exc))
    if args.show:
        print(tables(json.loads(Path(args.out).read_text())))
    elif args.worker:
        worker(args)
    elif os.geteuid() != 0:
        p.error("the driver brings up network namespaces (netcluster.sh): run it as root")
    else:
        driver(args)


if __name__ == "__main__":
    main()
