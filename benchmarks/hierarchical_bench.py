"""Hierarchical gossip against flat gossip and all-reduce, 2 processes per host, on an emulated
cluster (benchmarks/netcluster.sh: network namespaces with rate-limited links; needs root).

Driver (one netcluster per host count, taken under /tmp/netcluster.lock; prints a markdown table):

    python benchmarks/hierarchical_bench.py --hosts 2 4 --rate 1gbit

One setting by hand (what the driver runs; rank 0 writes the JSON):

    flock /tmp/netcluster.lock benchmarks/netcluster.sh run 2 1gbit -- sh -c \\
        'GLOO_SOCKET_IFNAME=$NC_IFACE OMP_NUM_THREADS=1 exec torchrun --nnodes $NC_HOSTS \\
        --node-rank $NC_HOST --nproc-per-node 2 --master-addr $NC_MASTER --master-port 29600 \\
        benchmarks/hierarchical_bench.py --worker --out /tmp/hierarchical_2.json'

The two processes of a host reach each other over the namespace's loopback, which no rate limit
slows (a node's fast local links); everything between hosts crosses the host's rate-limited link.
On ``wide-mlp`` (~34M parameters, few FLOPs: communication-heavy) with random digits-shaped
batches of 16, each phase times ``--steps`` steps after ``--warmup``:

- ``compute``: forward, backward, SGD step with no communication (all processes at once);
- ``all-reduce``: DDP over all ranks; ``gossip``: ``GossipDataParallel`` over all ranks (each rank
  exchanges with one partner, which may be on its own host or not);
- ``hierarchical``: ``HierarchicalDataParallel`` (node layout from torchrun's environment);
  ``hierarchical-bf16``: the same with ``wire_dtype=torch.bfloat16`` between leaders.

Step time is the slowest rank's median. "MB out per host" is what each host's link actually sent
per timed step (its interface counter in /proc/net/dev, TCP overhead included), the largest over
hosts. All hosts share this machine's cores: with more processes than cores, compute and the CPU
side of communication compete, which the ``compute`` row and the load average show.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from gossipgrad import AllReduceDataParallel, GossipDataParallel
from gossipgrad.hierarchical import HierarchicalDataParallel
from gossipgrad.train.data import DatasetInfo
from gossipgrad.train.models import build_model

ROOT = Path(__file__).resolve().parent.parent
INFO = DatasetInfo(name="digits", task="classification", input_shape=(1, 8, 8), num_classes=10)
WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "compute": lambda m: m,
    "all-reduce": AllReduceDataParallel,
    "gossip": GossipDataParallel,
    "hierarchical": HierarchicalDataParallel,
    "hierarchical-bf16": lambda m: HierarchicalDataParallel(m, wire_dtype=torch.bfloat16),
}
LOCK = "/tmp/netcluster.lock"

# --- worker: one process of one host (launched by torchrun) -------------------------------------


def _tx_bytes(iface: str) -> int:
    """Bytes this network namespace has sent on ``iface``."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, counters = line.split(":", 1)
        if name.strip() == iface:
            return int(counters.split()[8])
    raise ValueError(f"no interface {iface!r} in /proc/net/dev")


def _phase(name: str, args: argparse.Namespace, iface: str) -> dict[str, float]:
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    torch.manual_seed(0)
    model = WRAPPERS[name](build_model(args.model, INFO))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, *INFO.input_shape, generator=g)
    y = torch.randint(0, INFO.num_classes, (args.batch,), generator=g)
    flush = getattr(model, "flush", lambda: None)
    close = getattr(model, "close", flush)  # the gossip wrappers also remove their hooks
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            flush()
            dist.barrier()
            sent = _tx_bytes(iface)
        start = time.perf_counter()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    close()  # completes the exchange that the last step sent
    sent = _tx_bytes(iface) - sent
    worst = torch.tensor([statistics.median(times[args.warmup :]), sent if local_rank == 0 else 0])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"step_s": float(worst[0]), "host_mb_per_step": float(worst[1]) / args.steps / 1e6}


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(minutes=3))  # a broken link fails fast
    iface = os.environ.get("GLOO_SOCKET_IFNAME", "eth0")
    result = {
        "hosts": dist.get_world_size() // int(os.environ["LOCAL_WORLD_SIZE"]),
        "procs_per_host": int(os.environ["LOCAL_WORLD_SIZE"]),
        "rate": args.rate,
        "model": args.model,
        "params": sum(p.numel() for p in build_model(args.model, INFO).parameters()),
        "load_average_1min_start": os.getloadavg()[0],
        "phases": {name: _phase(name, args, iface) for name in args.algos},
        "load_average_1min_end": os.getloadavg()[0],
    }
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# --- driver: one netcluster per host count -------------------------------------------------------


def _netcluster() -> str:
    script = ROOT / "benchmarks" / "netcluster.sh"
    return str(script if script.exists() else "/work/shared/tools/netcluster")


def _clusters_up() -> bool:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return any(n.split()[0][2:].isdigit() for n in names.splitlines() if n.startswith("nc"))


def _wait_for_quiet_network(quiet_s: float, give_up_s: float) -> None:
    """Wait until no netcluster has been up for ``quiet_s`` seconds: another benchmark may be
    between two of its settings."""
    deadline, quiet_since = time.monotonic() + give_up_s, time.monotonic()
    while time.monotonic() - quiet_since < quiet_s:
        if time.monotonic() > deadline:
            sys.exit(f"a netcluster has been up for {give_up_s:.0f} s: try again later")
        if _clusters_up():
            quiet_since = time.monotonic()
        time.sleep(1)


def _run_setting(hosts: int, args: argparse.Namespace, out: Path) -> dict | None:
    inner = [
        "torchrun", "--nnodes", "$NC_HOSTS", "--node-rank", "$NC_HOST", "--nproc-per-node", "2",
        "--master-addr", "$NC_MASTER", "--master-port", "29600", str(Path(__file__).resolve()),
        "--worker", "--out", str(out), "--rate", args.rate, "--model", args.model,
        "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
        "--algos", *args.algos,
    ]  # fmt: skip
    script = "GLOO_SOCKET_IFNAME=$NC_IFACE OMP_NUM_THREADS=1 exec " + " ".join(
        a if a.startswith("$") else shlex.quote(a) for a in inner
    )
    cmd = [_netcluster(), "run", str(hosts), args.rate, "--", "sh", "-c", script]
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the same lock as `flock /tmp/netcluster.lock ...`
        _wait_for_quiet_network(args.quiet_s, args.timeout)
        print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, timeout=args.timeout, check=False)
    if done.returncode != 0 or not out.exists():
        print(f"{hosts} hosts failed (exit {done.returncode})", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def table(results: list[dict]) -> str:
    lines = [
        "| hosts x procs | algorithm | step (ms) | vs all-reduce | MB out per host per step |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        base = r["phases"].get("all-reduce", {}).get("step_s")
        for name, ph in r["phases"].items():
            speedup = f"{base / ph['step_s']:.2f}x" if base and name != "compute" else "-"
            lines.append(
                f"| {r['hosts']} x {r['procs_per_host']} | {name} | {ph['step_s'] * 1e3:.0f} "
                f"| {speedup} | {ph['host_mb_per_step']:.0f} |"
            )
    return "\n".join(lines)


def driver(args: argparse.Namespace) -> None:
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for hosts in args.hosts:
            result = _run_setting(hosts, args, Path(folder) / f"hierarchical_{hosts}.json")
            if result is not None:
                results.append(result)
    if not results:
        sys.exit("no setting finished")
    r = results[0]
    print(
        f"\n{r['model']} ({r['params'] / 1e6:.1f}M parameters), batch {args.batch} per process, "
        f"links at {args.rate}, median of {args.steps} steps after {args.warmup} warm-up; "
        f"{os.cpu_count()} CPU cores shared by all processes (load average "
        + ", ".join(f"{x['load_average_1min_end']:.1f}" for x in results)
        + ")\n"
    )
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hosts", type=int, nargs="+", default=[2, 4], help="driver: host counts")
    p.add_argument("--rate", default="1gbit", help="link rate, tc syntax (1gbit, 200mbit)")
    p.add_argument("--timeout", type=float, default=600, help="driver: seconds per setting")
    p.add_argument("--quiet-s", type=float, default=15, help="driver: wait for no netcluster")
    p.add_argument("--json", help="driver: also write the results here")
    p.add_argument("--worker", action="store_true", help="run one process (under torchrun)")
    p.add_argument("--out", default="hierarchical.json", help="worker: rank 0's JSON")
    p.add_argument("--model", default="wide-mlp")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--algos", nargs="+", default=list(WRAPPERS), choices=list(WRAPPERS))
    args = p.parse_args(argv)
    for name in ("batch", "warmup", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.worker:
        worker(args)
    elif os.geteuid() != 0:
        p.error("the driver brings up network namespaces (netcluster.sh): run it as root")
    else:
        driver(args)


if __name__ == "__main__":
    main()
