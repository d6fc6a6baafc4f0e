"""Emulated-network benchmark: DDP all-reduce against gossip, one process per host, over
rate-limited links (benchmarks/netcluster.sh: network namespaces + tbf, needs root).

Driver (loops over settings, writes benchmarks/results/network_bench.json, prints a table):

    python benchmarks/network_bench.py --hosts 2 4 8 --rates 1gbit 10gbit

A balanced setting (a batch whose compute-only step is about the exchange floor, model bytes /
link rate), in a summary of its own so the one above (the cost model's calibration) stays as is:

    python benchmarks/network_bench.py --hosts 4 --rates 1gbit --batch 64 \
        --phases compute exchange ddp gossip-overlap \
        --summary benchmarks/results/network_balanced.json

One setting by hand (what the driver runs; rank 0 writes the JSON):

    benchmarks/netcluster.sh run 4 1gbit -- sh -c 'GLOO_SOCKET_IFNAME=$NC_IFACE torchrun \
        --nnodes $NC_HOSTS --node-rank $NC_HOST --nproc-per-node 1 --master-addr $NC_MASTER \
        --master-port 29600 benchmarks/network_bench.py --worker --rate 1gbit \
        --out benchmarks/results/network_4x1gbit.json'

Per setting, on a communication-heavy MLP (``wide-mlp``, 29.4M parameters by default) and
synthetic data (``--batch`` samples per step per host, 16 by default), after ``--warmup`` steps
it times ``--steps`` steps of:

- ``compute``: forward, backward, SGD step, no communication (all hosts at once, as in training);
- ``exchange``: a bare isend/irecv of the model's bytes with this step's gossip partner, reported
  as the achieved rate over the link rate; ``allreduce``: a bare ``all_reduce`` of the same bytes;
  ``exchange-small`` / ``allreduce-small``: the same with 4 bytes, 20 times as many steps (the
  per-message latency, which the large ones cannot separate from bandwidth);
- ``ddp``: torch ``DistributedDataParallel`` (ring all-reduce overlapped with backward);
- ``gossip-sync`` / ``gossip-overlap``: ``GossipDataParallel(sync=True / False)``.

Step time is the slowest rank's median step (the mean is in the JSON too). Each training phase
first times compute alone on the same model (``compute_s``), and its efficiency is that compute
time over its step time, so that a change of load between phases does not skew it. All hosts
share this machine's cores: with more processes than cores, compute is CPU-bound and the
``compute`` column shows it. The JSON records the load average, since anything else running on
the machine slows compute and the CPU side of communication alike.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PHASES = (
    "compute",
    "exchange-small",
    "allreduce-small",
    "exchange",
    "allreduce",
    "ddp",
    "gossip-sync",
    "gossip-overlap",
)
BARE = ("exchange", "allreduce", "exchange-small", "allreduce-small")
SMALL_REPEAT = 20  # the small (latency) operations run this many times more steps
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def rate_bytes(rate: str) -> float:
    """Bytes per second of a tc rate such as ``1gbit`` or ``200mbit`` (``bps`` means bytes)."""
    match = re.fullmatch(r"([0-9.]+)(k|m|g)?(bit|bps)", rate)
    if not match:
        raise ValueError(f"rate must look like 1gbit, 200mbit or 100mbps, got {rate!r}")
    value = float(match[1]) * _UNITS[match[2] or ""]
    return value / 8 if match[3] == "bit" else value


# --- worker: one process per host ---------------------------------------------------------------


def _build(args: argparse.Namespace) -> nn.Module:
    from gossipgrad.train.data import DatasetInfo
    from gossipgrad.train.models import build_model

    torch.manual_seed(0)
    info = DatasetInfo("synthetic", "classification", (3, 32, 32), 10)
    return build_model("wide-mlp", info, width=args.width, depth=args.depth)


def _timed(
    step: Callable[[int], None],
    args: argparse.Namespace,
    finish: Callable[[], None],
    repeat: int = 1,
) -> dict[str, float | list[float]]:
    """Warm up, then time ``args.steps`` steps. ``step_s``: the largest over ranks of a rank's
    median step (robust to bursts of load from outside); ``mean_s``: the largest mean."""
    warmup, steps = args.warmup * repeat, args.steps * repeat
    for i in range(warmup):
        step(i)
    finish()
    dist.barrier()
    times = []
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    finish()
    mean = (time.perf_counter() - start) / steps
    worst = torch.tensor([mean, statistics.median(times)])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"step_s": float(worst[1]), "mean_s": float(worst[0]), "rank0_steps_s": times}


def _training(
    model: nn.Module, params: list[nn.Parameter], seed: int, batch: int
) -> Callable[[int], None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def step(_i: int) -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    return step


def _phase(name: str, args: argparse.Namespace) -> dict[str, float | list[float]]:
    from gossipgrad import GossipDataParallel
    from gossipgrad.schedule import plan

    rank, world = dist.get_rank(), dist.get_world_size()
    module = _build(args)
    nothing = lambda: None  # noqa: E731 - the phases with nothing left in flight
    if name in BARE:
        small = name.endswith("-small")
        numel = 1 if small else sum(p.numel() for p in module.parameters())
        send, recv = torch.randn(numel), torch.empty(numel)

        def bare(i: int) -> None:
            if name.startswith("allreduce"):
                dist.all_reduce(send)
                return
            ex = plan(rank, i, world)
            works = [dist.irecv(recv, ex.recv_from, tag=i), dist.isend(send, ex.send_to, tag=i)]
            for w in works:
                w.wait()

        repeat = SMALL_REPEAT if small else 1
        return {"bytes": numel * 4, **_timed(bare, args, nothing, repeat)}
    # Compute alone first, right before the wrapped steps: the machine's load drifts, so each
    # algorithm's efficiency is taken against the compute time measured next to it.
    params = list(module.parameters())
    compute = _timed(_training(module, params, rank, args.batch), args, nothing)
    if name == "compute":
        return compute
    if name == "ddp":
        model: nn.Module = DistributedDataParallel(module)
        finish = nothing
    else:
        model = GossipDataParallel(module, sync=name == "gossip-sync")
        finish = model.flush
    return {
        "compute_s": compute["step_s"],
        **_timed(_training(model, params, rank, args.batch), args, finish),
    }


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model_bytes = sum(p.numel() * p.element_size() for p in _build(args).parameters())
    link = rate_bytes(args.rate)
    result: dict = {
        "hosts": world,
        "rate": args.rate,
        "link_bytes_per_s": link,
        "model_bytes": model_bytes,
        "params": model_bytes // 4,
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "threads_per_host": args.threads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0],
        "phases": {},
    }
    for name in args.phases:
        result["phases"][name] = _phase(name, args)
        if rank == 0:
            print(f"[{world}x{args.rate}] {name}: {result['phases'][name]['step_s'] * 1e3:.1f} ms")
    exchange = result["phases"].get("exchange")
    if exchange:
        result["exchange_link_fraction"] = model_bytes / exchange["step_s"] / link
    allreduce = result["phases"].get("allreduce")
    if allreduce and world > 1:
        bus = 2 * (world - 1) / world * model_bytes
        result["allreduce_link_fraction"] = bus / allreduce["step_s"] / link
    result["load_average_1min_end"] = os.getloadavg()[0]
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# --- driver: one netcluster per setting ---------------------------------------------------------


def _run_setting(hosts: int, rate: str, args: argparse.Namespace) -> dict | None:
    batch = "" if args.batch == 16 else f"_b{args.batch}"
    final = RESULTS / f"network_{hosts}x{rate}{batch}.json"
    out = final.with_suffix(".partial")  # renamed once the setting succeeds
    out.unlink(missing_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // hosts)
    inner = [
        "torchrun", "--nnodes", "$NC_HOSTS", "--node-rank", "$NC_HOST", "--nproc-per-node", "1",
        "--master-addr", "$NC_MASTER", "--master-port", "29600",
        str(Path(__file__).resolve()), "--worker", "--rate", rate, "--out", str(out),
        "--threads", str(threads), "--warmup", str(args.warmup), "--steps", str(args.steps),
        "--width", str(args.width), "--depth", str(args.depth), "--batch", str(args.batch),
        "--phases", *args.phases,
    ]  # fmt: skip
    script = "GLOO_SOCKET_IFNAME=$NC_IFACE OMP_NUM_THREADS={} exec {}".format(
        threads, " ".join(a if a.startswith("$") else shlex.quote(a) for a in inner)
    )
    cmd = [str(ROOT / "benchmarks" / "netcluster.sh"), "run", str(hosts), rate, "--"]
    cmd += ["sh", "-c", script]
    _wait_for_network(args.timeout)
    print(f"$ {shlex.join(cmd)}", flush=True)
    done = subprocess.run(cmd, timeout=args.timeout, check=False)
    if done.returncode != 0 or not out.exists():
        print(f"setting {hosts} hosts at {rate} failed (exit {done.returncode})", file=sys.stderr)
        return None
    out.replace(final)
    return json.loads(final.read_text())


def _wait_for_network(timeout: float) -> None:
    """Only one netcluster can be up at a time (ours or the shared tool's): wait for others'."""
    deadline = time.monotonic() + timeout
    while True:
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
        if not re.search(r"^nc[0-9]+\b", ns.stdout, re.MULTILINE):
            return
        if time.monotonic() > deadline:
            raise SystemExit(
                f"a netcluster stayed up for {timeout:.0f} s; if it is a leftover, "
                "benchmarks/netcluster.sh down removes it"
            )
        print("another netcluster is up; waiting for it to finish", flush=True)
        time.sleep(10)


def table(results: list[dict]) -> str:
    """A markdown table: per algorithm, step ms / compute ms measured next to it (efficiency)."""
    head = (
        "| hosts | rate | batch | compute ms | DDP step / compute ms (eff) | gossip sync | "
        "gossip overlap | bare all-reduce ms (link %) | bare exchange ms (link %) | load |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in results:
        ph = r["phases"]
        compute = ph["compute"]["step_s"] if "compute" in ph else None

        def cell(name: str, ph: dict = ph, compute: float | None = compute) -> str:
            if name not in ph:
                return "-"
            t, c = ph[name]["step_s"], ph[name].get("compute_s", compute)
            return f"{t * 1e3:.0f} / {c * 1e3:.0f} ({c / t:.2f})" if c else f"{t * 1e3:.0f}"

        def bare(name: str, key: str, ph: dict = ph, r: dict = r) -> str:
            if name not in ph or key not in r:
                return "-"
            return f"{ph[name]['step_s'] * 1e3:.0f} ({100 * r[key]:.0f}%)"

        lines.append(
            f"| {r['hosts']} | {r['rate']} | {r.get('batch', 16)} | "
            + (f"{compute * 1e3:.0f}" if compute else "-")
            + f" | {cell('ddp')} | {cell('gossip-sync')} | {cell('gossip-overlap')} | "
            f"{bare('allreduce', 'allreduce_link_fraction')} | "
            f"{bare('exchange', 'exchange_link_fraction')} | "
            f"{r.get('load_average_1min', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def _setting(result: dict) -> tuple[int, str, int]:
    return result["hosts"], result["rate"], result.get("batch", 16)


def driver(args: argparse.Namespace) -> None:
    results = []
    for rate in args.rates:
        rate_bytes(rate)  # fail before bringing anything up
        for hosts in args.hosts:
            r = _run_setting(hosts, rate, args)
            if r is not None:
                results.append(r)
    summary = Path(args.summary)
    if summary.exists() and args.merge:
        kept = json.loads(summary.read_text())
        new = {_setting(r) for r in results}
        results = [r for r in kept if _setting(r) not in new] + results
    results.sort(key=lambda r: (rate_bytes(r["rate"]), r["hosts"], r.get("batch", 16)))
    summary.write_text(json.dumps(results, indent=1))
    print(f"\nwide-mlp {args.width}x{args.depth}, batch {args.batch}, {args.steps} timed steps; "
          f"{os.cpu_count()} CPU cores shared by all hosts\n")  # fmt: skip
    print(table(results))
    print(f"\nwrote {summary}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hosts", type=int, nargs="+", default=[2, 4], help="driver: host counts")
    p.add_argument("--rates", nargs="+", default=["1gbit"], help="driver: link rates (tc syntax)")
    p.add_argument("--merge", action="store_true", help="driver: keep other settings' results")
    p.add_argument(
        "--summary", default=str(RESULTS / "network_bench.json"), help="driver: the summary JSON"
    )
    p.add_argument("--timeout", type=float, default=900, help="driver: seconds per setting")
    p.add_argument("--worker", action="store_true", help="run one host's process (torchrun)")
    p.add_argument("--rate", default="1gbit", help="worker: the link rate, for the link fraction")
    p.add_argument("--out", default=str(RESULTS / "network.json"), help="worker: JSON path")
    p.add_argument("--threads", type=int, default=0, help="torch threads per host (0: cores/hosts)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--width", type=int, default=4096, help="wide-mlp hidden width")
    p.add_argument("--depth", type=int, default=2, help="wide-mlp hidden layers")
    p.add_argument("--batch", type=int, default=16, help="samples per step per host")
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    args = p.parse_args(argv)
    for name in ("warmup", "steps", "width", "depth", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    if args.worker:
        args.threads = args.threads or 1
        worker(args)
    else:
        if os.geteuid() != 0:
            p.error("the driver brings up network namespaces (netcluster.sh): run it as root")
        driver(args)


if __name__ == "__main__":
    main()
