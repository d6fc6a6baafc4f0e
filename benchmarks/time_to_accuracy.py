"""Time to accuracy on an emulated cluster: all-reduce against gossip, same epoch budget, one
``gossipgrad.train`` process per host over rate-limited links (benchmarks/netcluster.sh: network
namespaces + tbf; needs root).

Driver (one netcluster per algorithm, taken under /tmp/netcluster.lock; prints a markdown table
and writes benchmarks/results/time_to_accuracy.json):

    python benchmarks/time_to_accuracy.py --hosts 8 --rate 1gbit --epochs 10

One algorithm by hand (what the driver runs; the run folder gets <algo>/metrics.jsonl):

    flock /tmp/netcluster.lock benchmarks/netcluster.sh run 8 1gbit -- sh -c \\
        'GLOO_SOCKET_IFNAME=$NC_IFACE OMP_NUM_THREADS=1 exec torchrun --nnodes $NC_HOSTS \\
        --node-rank $NC_HOST --nproc-per-node 1 --master-addr $NC_MASTER --master-port 29600 \\
        -m gossipgrad.train --algo gossip --dataset digits --model wide-mlp --epochs 10 \\
        --batch-size 16 --eval-every 1 --consensus-every 0 --quiet --out /tmp/tta/gossip'

Each run trains ``--model`` (default ``wide-mlp``, ~34M parameters and few FLOPs: the network
matters) on the embedded ``digits`` for ``--epochs`` epochs, and with ``--eval-every 1`` evaluates
the exact average of the replicas on the held-out split after every epoch, recorded with the
training time so far (evaluations excluded from that clock). The target is all-reduce's final
held-out accuracy; each algorithm's time to accuracy is the training time at its first
evaluation at or above it (so it is resolved to one epoch). The consensus distance is not
measured (``--consensus-every 0``): it would cost both algorithms an all-reduce of the model.
All hosts share this machine's cores, which the load average in the JSON records.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LOCK = "/tmp/netcluster.lock"
ALGOS = ("allreduce", "gossip")
_LABELS = {"allreduce": "all-reduce (DDP)", "gossip": "gossip overlapped"}
_SAME = 1e-9  # accuracies are multiples of 1 / test samples


def _clusters_up() -> bool:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return any(n.split()[0][2:].isdigit() for n in names.splitlines() if n.startswith("nc"))


def _wait_for_quiet_network(give_up_s: float) -> None:
    """Only one netcluster can be up at a time: wait until nobody else's is."""
    deadline = time.monotonic() + give_up_s
    while _clusters_up():
        if time.monotonic() > deadline:
            sys.exit(
                f"a netcluster has been up for {give_up_s:.0f} s; if it is a leftover, "
                "benchmarks/netcluster.sh down removes it"
            )
        time.sleep(5)


def _train_command(algo: str, args: argparse.Namespace, out: Path) -> list[str]:
    inner = [
        "torchrun", "--nnodes", "$NC_HOSTS", "--node-rank", "$NC_HOST", "--nproc-per-node", "1",
        "--master-addr", "$NC_MASTER", "--master-port", "29600", "-m", "gossipgrad.train",
        "--algo", algo, "--dataset", "digits", "--model", args.model,
        "--epochs", str(args.epochs), "--batch-size", str(args.batch), "--lr", str(args.lr),
        "--eval-every", "1", "--consensus-every", "0", "--quiet", "--out", str(out),
    ]  # fmt: skip
    script = "GLOO_SOCKET_IFNAME=$NC_IFACE OMP_NUM_THREADS=1 exec " + " ".join(
        a if a.startswith("$") else shlex.quote(a) for a in inner
    )
    netcluster = str(ROOT / "benchmarks" / "netcluster.sh")
    return [netcluster, "run", str(args.hosts), args.rate, "--", "sh", "-c", script]


def _run(algo: str, args: argparse.Namespace, folder: Path) -> dict[str, Any] | None:
    """Train ``algo`` on a fresh netcluster; its summary and evaluation records, or None."""
    out = folder / algo
    cmd = _train_command(algo, args, out)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the same lock as `flock /tmp/netcluster.lock ...`
        _wait_for_quiet_network(args.timeout)
        print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        load_start, start = os.getloadavg()[0], time.perf_counter()
        done = subprocess.run(cmd, timeout=args.timeout, check=False)
        wall = time.perf_counter() - start
    summary_path, metrics_path = out / algo / "summary.json", out / algo / "metrics.jsonl"
    if done.returncode != 0 or not summary_path.exists():
        print(f"{algo} failed (exit {done.returncode})", file=sys.stderr)
        return None
    summary = json.loads(summary_path.read_text())
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    keys = ("step", "epoch", "time", "test_acc", "test_loss", "eval_s")
    return {
        "algo": algo,
        "test_accuracy": summary["test_accuracy"],
        "train_time_s": summary["train_time_s"],
        "epochs": summary["epochs"],
        "steps": summary["steps"],
        "bytes_per_rank_per_step": summary["bytes_per_rank_per_step"],
        "run_wall_s": wall,  # start-up and evaluations included
        "load_average_1min_start": load_start,
        "load_average_1min_end": os.getloadavg()[0],
        "evals": [{k: r[k] for k in keys} for r in records if "test_acc" in r],
    }


def time_to(run: dict[str, Any], target: float) -> dict[str, Any] | None:
    """The first evaluation of ``run`` at or above ``target`` accuracy, or None."""
    return next((e for e in run["evals"] if e["test_acc"] >= target - _SAME), None)


def table(runs: list[dict[str, Any]], target: float) -> str:
    lines = [
        "| algorithm | final test accuracy | training time (s) | s / epoch | "
        f"time to {target:.2%} (s) | vs all-reduce |",
        "|---|---|---|---|---|---|",
    ]
    base = next((time_to(r, target) for r in runs if r["algo"] == "allreduce"), None)
    for r in runs:
        hit = time_to(r, target)
        reached = f"{hit['time']:.0f} (epoch {hit['epoch']:g})" if hit else "not reached"
        speedup = f"{base['time'] / hit['time']:.2f}x" if hit and base else "-"
        lines.append(
            f"| {_LABELS.get(r['algo'], r['algo'])} | {r['test_accuracy']:.2%} | "
            f"{r['train_time_s']:.0f} | {r['train_time_s'] / r['epochs']:.1f} | {reached} | "
            f"{speedup} |"
        )
    return "\n".join(lines)


def curves(runs: list[dict[str, Any]]) -> str:
    """Held-out accuracy after each epoch, per algorithm (one line each)."""
    return "\n".join(
        f"{r['algo']}: "
        + ", ".join(f"{e['epoch']:g}: {e['test_acc']:.3f} @ {e['time']:.0f} s" for e in r["evals"])
        for r in runs
    )


def driver(args: argparse.Namespace) -> None:
    runs = []
    with tempfile.TemporaryDirectory(prefix="tta_") as folder:
        for algo in args.algos:
            run = _run(algo, args, Path(folder))
            if run is not None:
                runs.append(run)
    if not any(r["algo"] == "allreduce" for r in runs):
        sys.exit("the all-reduce run did not finish: no target accuracy")
    target = next(r["test_accuracy"] for r in runs if r["algo"] == "allreduce")
    result = {
        "hosts": args.hosts,
        "procs_per_host": 1,
        "rate": args.rate,
        "dataset": "digits",
        "model": args.model,
        "batch_per_rank": args.batch,
        "lr": args.lr,
        "epochs": args.epochs,
        "cpus": os.cpu_count(),
        "target_accuracy": target,
        "runs": runs,
    }
    print(
        f"\n{args.hosts} hosts x 1 process at {args.rate}, digits, {args.model}, batch "
        f"{args.batch} per rank, {args.epochs} epochs, SGD lr {args.lr} momentum 0.9; "
        f"{os.cpu_count()} CPU cores shared by all hosts (load average "
        + ", ".join(f"{r['load_average_1min_end']:.1f}" for r in runs)
        + ")\n"
    )
    print(table(runs, target))
    print(f"\n{curves(runs)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.json}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hosts", type=int, default=8, help="emulated hosts, one process each")
    p.add_argument("--rate", default="1gbit", help="link rate, tc syntax (1gbit, 200mbit)")
    p.add_argument("--epochs", type=int, default=10, help="the epoch budget of both algorithms")
    p.add_argument("--batch", type=int, default=16, help="samples per step per rank")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--model", default="wide-mlp")
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--timeout", type=float, default=900, help="seconds per algorithm")
    p.add_argument("--json", type=Path, default=RESULTS / "time_to_accuracy.json")
    args = p.parse_args(argv)
    for name in ("hosts", "epochs", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if os.geteuid() != 0:
        p.error("the driver brings up network namespaces (netcluster.sh): run it as root")
    driver(args)


if __name__ == "__main__":
    main()
