"""gossipgrad against DDP, torch's post-local SGD and torchft's DiLoCo and streaming DiLoCo on a
character language model over an emulated slow network (benchmarks/netcluster.sh: network
namespaces + tbf rate limits; needs root, and ``pip install torchft==0.2.0`` for DiLoCo).

Driver (one netcluster per setting, taken under /tmp/netcluster.lock; prints markdown tables,
writes benchmarks/results/lm.json and a loss-against-time plot per setting beside it,
benchmarks/results/lm_4x100mbit.png; ``--merge`` keeps the other settings and seeds):

    python benchmarks/lm.py --hosts 4 --rates 100mbit --seeds 0 \\
        --contenders ddp localsgd-k8 diloco-h8 gossip-k8 gossip-k8-outer0.7m0.9
    python benchmarks/lm.py --show                       # the tables of the JSON, nothing run
    python benchmarks/lm.py --quick --out /tmp/lm.json   # smoke run: 2 hosts, tiny gpt

Every contender trains the same ``gpt`` (``--layers`` x ``--width``, 4 x 256: 3.3M parameters)
from the same initialisation (``torch.manual_seed(seed)``) on the first ``--corpus-bytes`` of
the embedded character corpus (``pytext``: the Python standard library's sources, bytes as
tokens; the last 10% held out), on the same shards and batch order (``--batch`` windows of
``--block`` tokens per host), with AdamW (``--lr``, ``--weight-decay``) under a linear warm-up
and a cosine decay, for ``--epochs`` epochs. Contenders (``--contenders``; names are parsed,
see benchmarks/_lm_contenders.py): ``ddp``, ``localsgd-kK``, ``diloco-hH``, ``sdiloco-hH``,
``gossip-kK``, ``gossip-kK-outerLRmM``.

**Rounds are interleaved** as in benchmarks/peers.py: each host trains contender A for one
epoch, then B, ..., then A's next epoch, so that a change of the machine's load hits every
contender alike; here every contender stays alive in memory between its rounds (the model is
small), torchft's Manager and Lighthouse included. ``--evals-per-epoch`` times per epoch, and
at step 0, the exported model is evaluated on the held-out split (bits per character, sharded
over the hosts): DDP's replica; the exact average of the replicas for the others. Before
evaluating, what is in flight is completed inside the timed segment (gossip's exchange,
streaming DiLoCo's overlapped all-reduce); a gossip flush mixes the exchange one step early.
Training time excludes evaluations. Columns: mean step (training time / steps), MB per host per
step counted on the link (the interface's transmit counter over the timed segments, TCP/IP
headers, ACKs and torchft's heartbeats included) next to the payload the algorithm should send,
validation bits per character after each epoch, time to DDP's final loss (first evaluation at
or below it), the loss at the best peer's finishing time. All hosts share this machine's cores:
the JSON records the load average at every round.

One setting by hand (what the driver runs; rank 0 rewrites --out after every round):

    flock /tmp/netcluster.lock benchmarks/netcluster.sh run 4 100mbit -- sh -c \\
        'RUST_LOG=warn GLOO_SOCKET_IFNAME=$NC_IFACE OMP_NUM_THREADS=1 exec torchrun \\
        --nnodes $NC_HOSTS --node-rank $NC_HOST --nproc-per-node 1 --master-addr $NC_MASTER \\
        --master-port 29600 benchmarks/lm.py --worker --rate 100mbit --contenders ddp diloco-h8 \\
        --out /tmp/lm_4x100mbit.json'
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _lm_contenders import Contender, Runner, Settings, expected_bytes, parse  # noqa: E402
from _lm_tables import plot, tables  # noqa: E402
from network_bench import rate_bytes  # noqa: E402
from peers import _rss_mb, _write, _write_settings, merge, run_on_netcluster  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_CONTENDERS = (
    "ddp",
    "localsgd-k8",
    "diloco-h8",
    "gossip-k8",
    "gossip-k8-outer0.7m0.9",
)
QUICK_CONTENDERS = (
    "ddp",
    "localsgd-k2",
    "diloco-h2",
    "sdiloco-h4",
    "gossip-k2",
    "gossip-k2-outer0.7m0.9",
)


# --- worker: one process per host (torchrun) ----------------------------------------------------


def _corpus(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Training and held-out windows of ``block + 1`` token ids (rows), and the dataset info."""
    from gossipgrad.train.data import load_dataset

    train, test, info = load_dataset("pytext", block_size=args.block, max_bytes=args.corpus_bytes)

    def windows(blocks: Any) -> Any:
        return (
            blocks.tokens[: len(blocks) * args.block + 1]
            .long()
            .unfold(0, args.block + 1, args.block)
        )

    return windows(train), windows(test), info


def _val_bpc(model: Any, rows: Any, rank: int, world: int, batch: int = 64) -> float:
    """Bits per character of ``model`` on the held-out ``rows`` (each rank a share; collective)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    mine = rows[rank::world]
    total = torch.zeros(2, dtype=torch.float64)
    was = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(mine), batch):
            x, y = mine[i : i + batch, :-1], mine[i : i + batch, 1:]
            logits = model(x)
            total[0] += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            total[1] += y.numel()
    model.train(was)
    dist.all_reduce(total)
    return float(total[0] / total[1] / math.log(2))


def _eval_points(steps: int, count: int) -> list[int]:
    """The steps of an epoch after which to evaluate: ``count`` even ones, the last included."""
    return sorted({max(1, round(steps * (j + 1) / count)) for j in range(count)})


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import gossipgrad
    from gossipgrad.train.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.pg_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    iface = os.environ.get("GLOO_SOCKET_IFNAME", "eth0")
    train, val, info = _corpus(args)
    per_rank = len(train) // world
    steps_per_epoch = per_rank // args.batch
    if args.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)
    model_options = {"n_layer": args.layers, "n_head": args.heads, "d_model": args.width}

    def build(seed: int) -> Any:
        torch.manual_seed(seed)
        return build_model("gpt", info, **model_options)

    scratch = build(0)
    contenders = [parse(c) for c in args.contenders]
    total_steps = args.epochs * steps_per_epoch
    result: dict[str, Any] = {
        "hosts": world,
        "rate": args.rate,
        "link_bytes_per_s": rate_bytes(args.rate),
        "dataset": "pytext",
        "corpus_bytes": args.corpus_bytes,
        "model": "gpt",
        "model_options": model_options,
        "params": sum(p.numel() for p in scratch.parameters()),
        "model_bytes": 4 * sum(p.numel() for p in scratch.parameters()),
        "block": args.block,
        "batch_per_host": args.batch,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "lr_warmup": args.lr_warmup,
        "epochs": args.epochs,
        "steps_per_epoch": steps_per_epoch,
        "evals_per_epoch": args.evals_per_epoch,
        "val_tokens": val.shape[0] * args.block,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torchft": _version("torchft"),
        "gossipgrad_file": gossipgrad.__file__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "load_average_1min_start": os.getloadavg()[0],
        "runs": [],
    }
    _warm_up(build(0), train, args)
    for seed in args.seeds:
        settings = [
            Settings(args.lr, args.weight_decay, args.lr_warmup, total_steps, args.pg_timeout, i)
            for i in range(len(contenders))
        ]
        runners = {
            c.name: Runner(c, build(seed), s) for c, s in zip(contenders, settings, strict=True)
        }
        runs = {c.name: _new_run(c, seed, world) for c in contenders}
        result["runs"] += list(runs.values())
        initial = _val_bpc(build(seed), val, rank, world)
        for run in runs.values():
            run["evals"].append({"epoch": 0.0, "step": 0, "time": 0.0, "val_bpc": initial})
        for epoch in range(args.epochs):
            gen = torch.Generator().manual_seed(1000 * seed + epoch)
            shard = torch.randperm(len(train), generator=gen)[rank::world][:per_rank]
            batches = [shard[i * args.batch : (i + 1) * args.batch] for i in range(steps_per_epoch)]
            for c in contenders:
                if runs[c.name]["error"] is None:
                    _round(
                        runners[c.name],
                        runs[c.name],
                        epoch,
                        batches,
                        train,
                        val,
                        scratch,
                        iface,
                        args,
                    )
                    if rank == 0:
                        _finish_run(runs[c.name], c, runners[c.name].fragment_numels(), world)
                        result["load_average_1min_end"] = os.getloadavg()[0]
                        _write(result, Path(args.out))
        for runner in runners.values():
            runner.close()
    dist.barrier()
    dist.destroy_process_group()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _warm_up(module: Any, train: Any, args: argparse.Namespace) -> None:
    """Untimed AdamW steps on a replica that is then dropped: a process's first touches of
    fresh memory would otherwise land on the first contender's first round."""
    import torch

    from gossipgrad.train.models import task_loss

    opt = torch.optim.AdamW(module.parameters(), lr=args.lr)
    for i in range(args.warmup_steps):
        rows = train[i * args.batch : (i + 1) * args.batch]
        task_loss(module(rows[:, :-1]), rows[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _new_run(c: Contender, seed: int, world: int) -> dict[str, Any]:
    return {
        "contender": c.name,
        "label": c.label(),
        "seed": seed,
        "evals": [],
        "train_loss": [],  # rank 0's, per step
        "step_times_s": [[] for _ in range(world)],
        "tx_bytes": [0] * world,
        "train_time_s": 0.0,
        "steps": 0,
        "rounds": [],
        "error": None,
    }


def _round(
    runner: Runner,
    run: dict[str, Any],
    epoch: int,
    batches: list[Any],
    train: Any,
    val: Any,
    scratch: Any,
    iface: str,
    args: argparse.Namespace,
) -> None:
    """One epoch of one contender, in timed segments between evaluations (collective; ``run``
    is filled in on rank 0, and ``run["error"]`` on every rank if one failed)."""
    import torch.distributed as dist
    from hierarchical_bench import _tx_bytes

    rank, world = dist.get_rank(), dist.get_world_size()
    load, start, eval_s = os.getloadavg()[0], 0, 0.0
    for end in _eval_points(len(batches), args.evals_per_epoch):
        times, losses, error, seconds, tx, bpc = [], [], "", 0.0, 0, float("nan")
        try:
            dist.barrier()
            sent, began = _tx_bytes(iface), time.perf_counter()
            for idx in batches[start:end]:
                rows = train[idx]
                t = time.perf_counter()
                losses.append(runner.step(rows[:, :-1], rows[:, 1:]))
                times.append(time.perf_counter() - t)
            runner.finish()
            seconds = time.perf_counter() - began
            # a completed send may still sit in this host's rate-limited queue: a barrier,
            # whose messages queue behind it, lets it reach the counter
            dist.barrier()
            tx = _tx_bytes(iface) - sent
            t = time.perf_counter()
            bpc = _val_bpc(runner.export(scratch), val, rank, world)
            eval_s += time.perf_counter() - t
        except Exception as exc:  # noqa: BLE001 - recorded, and the contender stopped
            error = f"rank {rank}: {type(exc).__name__}: {exc}"
            print(
                f"[{run['contender']}] seed {run['seed']} epoch {epoch}: {error}", file=sys.stderr
            )
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (times, tx, seconds, error))
        errors = [g[3] for g in gathered if g[3]]
        if errors:
            run["error"] = f"epoch {epoch + 1}: " + "; ".join(errors)
            print(f"[{run['contender']}] stopped: {run['error']}", flush=True)
            return
        if rank == 0:
            for r, g in enumerate(gathered):
                run["step_times_s"][r] += [round(s, 6) for s in g[0]]
                run["tx_bytes"][r] += g[1]
            run["train_time_s"] += max(g[2] for g in gathered)
            run["steps"] += end - start
            run["train_loss"] += [round(x, 5) for x in losses]
            run["evals"].append(
                {
                    "epoch": round(epoch + end / len(batches), 4),
                    "step": run["steps"],
                    "time": run["train_time_s"],
                    "val_bpc": bpc,
                }
            )
        start = end
    run["rounds"].append(
        {"epoch": epoch + 1, "load_average_1min": load, "eval_s": eval_s, "rss_mb": _rss_mb()}
    )
    if rank == 0:
        e = run["evals"][-1]
        print(
            f"[{world}x{args.rate} seed {run['seed']}] epoch {epoch + 1} {run['contender']}: "
            f"{e['time']:.1f} s in all, val {e['val_bpc']:.3f} bits/char, load {load:.1f}",
            flush=True,
        )


def _finish_run(run: dict[str, Any], c: Contender, numels: list[int], world: int) -> None:
    """The run's summary figures from what its rounds recorded so far (rank 0)."""
    steps = run["steps"]
    if not steps:
        return
    run["step_median_s"] = max(statistics.median(t) for t in run["step_times_s"])
    run["step_mean_s"] = run["train_time_s"] / steps
    run["mb_per_rank_per_step"] = statistics.mean(run["tx_bytes"]) / steps / 1e6
    run["expected_mb_per_rank_per_step"] = expected_bytes(c, numels, world, steps) / 1e6
    run["final_val_bpc"] = run["evals"][-1]["val_bpc"]


# --- driver: one netcluster per setting ----------------------------------------------------------


def _run_setting(hosts: int, rate: str, args: argparse.Namespace) -> dict[str, Any] | None:
    out = Path(args.state_dir) / f"lm_{hosts}x{rate}.json"
    worker_args = [
        "--rate", rate, "--epochs", str(args.epochs), "--corpus-bytes", str(args.corpus_bytes),
        "--steps-per-epoch", str(args.steps_per_epoch), "--warmup-steps", str(args.warmup_steps),
        "--block", str(args.block), "--batch", str(args.batch), "--lr", str(args.lr),
        "--weight-decay", str(args.weight_decay), "--lr-warmup", str(args.lr_warmup),
        "--layers", str(args.layers), "--heads", str(args.heads), "--width", str(args.width),
        "--evals-per-epoch", str(args.evals_per_epoch), "--pg-timeout", str(args.pg_timeout),
        "--seeds", *map(str, args.seeds), "--contenders", *args.contenders,
    ]  # fmt: skip
    return run_on_netcluster(Path(__file__), worker_args, hosts, rate, out, args, "RUST_LOG=warn")


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
    for path in plot(final, out):
        print(f"wrote {path}")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hosts", type=int, nargs="+", default=[4], help="driver: host counts")
    p.add_argument("--rates", nargs="+", default=["100mbit"], help="driver: link rates (tc)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--contenders", nargs="+", default=list(DEFAULT_CONTENDERS))
    p.add_argument("--out", help="the results JSON (default benchmarks/results/lm.json)")
    p.add_argument("--merge", action="store_true", help="keep --out's other settings and seeds")
    p.add_argument("--show", action="store_true", help="print the tables of --out, run nothing")
    p.add_argument("--plot", action="store_true", help="with --show: write the plots again")
    quick = "smoke run: 2 hosts at 1gbit, 2 epochs of 8 steps, a 2 x 32 gpt on 20 KB"
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--corpus-bytes", type=int, default=400_000, help="bytes of the corpus")
    p.add_argument("--block", type=int, default=64, help="tokens per window")
    p.add_argument("--batch", type=int, default=16, help="windows per step per host")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW's peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--lr-warmup", type=int, default=16, help="steps of linear lr warm-up")
    p.add_argument("--layers", type=int, default=4, help="gpt blocks")
    p.add_argument("--heads", type=int, default=4, help="gpt attention heads")
    p.add_argument("--width", type=int, default=256, help="gpt d_model")
    p.add_argument("--steps-per-epoch", type=int, default=0, help="at most this many (0: all)")
    p.add_argument("--evals-per-epoch", type=int, default=4)
    warmup = "untimed AdamW steps before the first round (on a dropped replica)"
    p.add_argument("--warmup-steps", type=int, default=4, help=warmup)
    heap = "driver: workers keep freed memory (GLIBC_TUNABLES, peers.KEEP_HEAP)"
    p.add_argument("--keep-heap", action=argparse.BooleanOptionalAction, default=True, help=heap)
    p.add_argument("--timeout", type=float, default=3600, help="driver: seconds per setting")
    lock = "driver: give up (exit 3) when the netcluster stays taken this long (s)"
    p.add_argument("--lock-wait", type=float, default=3600, help=lock)
    p.add_argument("--pg-timeout", type=float, default=300, help="collective/peer timeout, s")
    state = "the workers' JSON before the driver merges it"
    p.add_argument("--state-dir", default="/var/tmp/gossipgrad_lm", help=state)
    p.add_argument("--worker", action="store_true", help="one host's process (under torchrun)")
    p.add_argument("--rate", default="100mbit", help="worker: the link rate, recorded")
    args = p.parse_args(argv)
    if args.quick:
        args.hosts, args.rates, args.seeds, args.epochs = [2], ["1gbit"], [0], 2
        args.corpus_bytes, args.block, args.batch, args.steps_per_epoch = 20_000, 32, 4, 8
        args.layers, args.heads, args.width, args.lr_warmup = 2, 2, 32, 2
        args.evals_per_epoch, args.warmup_steps = 2, 1
        if args.contenders == list(DEFAULT_CONTENDERS):
            args.contenders = list(QUICK_CONTENDERS)
        args.out = args.out or "/tmp/gossipgrad_lm_quick.json"
    args.out = args.out or str(RESULTS / "lm.json")
    for c in args.contenders:
        try:
            parse(c)
        except ValueError as exc:
            p.error(str(exc))
    for name in ("epochs", "batch", "block", "layers", "width", "evals_per_epoch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.show:
        settings = json.loads(Path(args.out).read_text())
        print(tables(settings))
        for path in plot(settings, Path(args.out)) if args.plot else []:
            print(f"wrote {path}")
    elif args.worker:
        worker(args)
    elif os.geteuid() != 0:
        p.error("the driver brings up network namespaces (netcluster.sh): run it as root")
    else:
        driver(args)


if __name__ == "__main__":
    main()
