"""Soak test: 8 gossip workers training flat out for minutes; memory, leaks and clean exit.

    python benchmarks/soak.py                        # 8 processes, 10 minutes, digits mlp
    python benchmarks/soak.py --procs 4 --minutes 2 --model cnn --sample-s 2

Starts ``--procs`` worker processes on this machine (``python benchmarks/soak.py --worker``, one
per rank, like torchrun: RANK / WORLD_SIZE in the environment, a TCPStore hosted by this process on
127.0.0.1, gloo on loopback). Each trains digits with ``GossipDataParallel`` and
``GossipShuffleSampler`` at full speed, measures the consensus distance every ``--consensus-every``
steps and writes an atomic checkpoint every ``--checkpoint-every`` steps, until rank 0 sees the
time is up; then the replicas are averaged and evaluated. Meanwhile this process samples each
worker's resident memory (``VmRSS``), open file descriptors and threads from ``/proc``.

After the workers exit it checks that no worker pid is left and that no TCP socket the workers
had (or the rendezvous store's port) is still in LISTEN or ESTABLISHED (``/proc/net/tcp*``), then
prints one row per rank: steps, RSS at start / peak / end, the RSS growth slope (least squares,
MB per minute, after the first fifth of the run, and over its second half alone: a leak keeps
its slope, a warm-up flattens out), and file descriptors and threads at start / end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

_TCP_STATES = {"01": "ESTABLISHED", "0A": "LISTEN"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default="mlp", help="mlp or cnn (gossipgrad.train.models)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--consensus-every", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=1000, help="0: none")
    parser.add_argument("--json", help="also write the samples and results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
    else:
        _soak(args)


# --- the workers ----------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from gossipgrad import GossipDataParallel, GossipShuffleSampler, checkpoint
    from gossipgrad.train.data import load_dataset
    from gossipgrad.train.evaluation import evaluate
    from gossipgrad.train.models import build_model, task_loss

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=120)
    port = int(os.environ["MASTER_PORT"])
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    torch.manual_seed(0)
    train_set, test_set, info = load_dataset("digits", seed=0)
    model = GossipDataParallel(build_model(args.model, info), timeout=timeout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = GossipShuffleSampler(train_set, seed=0, drop_last=True, timeout=timeout)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    deadline = torch.tensor([time.time() + args.minutes * 60], dtype=torch.float64)
    dist.broadcast(deadline, src=0)  # rank 0's clock decides when to stop, for everyone
    (Path(args.folder) / f"started_{rank}").touch()
    stop = torch.zeros(1)
    step, epoch, consensus = 0, 0, []
    while not stop.item():
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = task_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % args.consensus_every == 0:
                consensus.append(model.consensus_distance())
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                model.flush()
                state = {"model": model.module.state_dict(), "optim": optimizer.state_dict()}
                checkpoint.save(Path(args.folder) / "checkpoints", step, state, keep=2)
            if step % 20 == 0:
                stop.fill_(float(time.time() > deadline.item()))
                dist.broadcast(stop, src=0)
                if stop.item():
                    break
        epoch += 1
    sampler.flush()
    model.average_replicas()
    _, accuracy = evaluate(model.module, test_set)
    result = {"steps": step, "epochs": epoch, "consensus": consensus, "accuracy": accuracy}
    (Path(args.folder) / f"result_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# --- the watcher ----------------------------------------------------------------------------------


def _soak(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    load_before = os.getloadavg()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    timeout = timedelta(seconds=120)
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        args.procs,
        is_master=True,
        timeout=timeout,
        wait_for_workers=False,
        master_listen_fd=listener.detach(),
    )
    folder = tempfile.mkdtemp(prefix="gossipgrad-soak-")
    env = os.environ | {
        "WORLD_SIZE": str(args.procs),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    command = [sys.executable, __file__, "--worker", "--folder", folder]
    command += ["--model", args.model, "--batch-size", str(args.batch_size)]
    command += ["--minutes", str(args.minutes), "--consensus-every", str(args.consensus_every)]
    command += ["--checkpoint-every", str(args.checkpoint_every)]
    began = time.monotonic()
    workers = [
        subprocess.Popen(command, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(args.procs)
    ]
    pids = [w.pid for w in workers]
    print(f"soak: {args.procs} workers (pids {pids}), {args.minutes:g} min, digits {args.model}")
    samples: list[list[tuple[float, float, int, int]]] = [[] for _ in workers]  # t, MB, fds, thr
    inodes: set[str] = set()
    ports: set[int] = {port}
    failed = False
    loads = []
    window = [float("inf"), float("inf")]  # all workers training .. the first one done
    while any(w.poll() is None for w in workers):
        now = time.monotonic() - began
        window = _training_window(Path(folder), args.procs, now, window)
        for rank, pid in enumerate(pids):
            status = _proc_status(pid)
            if status is not None:
                fds = _socket_inodes(pid)
                inodes |= fds[1]
                samples[rank].append((now, status["VmRSS"] / 1024, fds[0], status["Threads"]))
        ports |= _ports_of(inodes)
        loads.append(os.getloadavg()[0])
        if any(w.returncode not in (None, 0) for w in workers):
            failed = True
            break
        time.sleep(args.sample_s)
    if failed:  # one worker died: the others would fail within the timeout; do not wait
        for w in workers:
            if w.poll() is None:
                w.kill()
    codes = [w.wait() for w in workers]
    wall = time.monotonic() - began
    del store
    time.sleep(0.5)
    leftover_pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    leftover_sockets = _open_sockets(inodes, ports)

    results = [_read_json(Path(folder) / f"result_{r}.json") for r in range(args.procs)]
    print(_table(samples, results, window))
    if args.json:
        record = {"samples": samples, "window": window, "results": results, "codes": codes}
        Path(args.json).write_text(json.dumps(record))
    steps = [r["steps"] for r in results if r]
    accuracy = f"{results[0]['accuracy']:.2%}" if results[0] else "- (no result from rank 0)"
    print(
        f"\nexit codes {codes}; wall {wall / 60:.1f} min; "
        f"{sum(steps) / max(wall, 1e-9):.0f} steps/s over all ranks; "
        f"test accuracy of the averaged model {accuracy}"
    )
    if results[0] and results[0]["consensus"]:
        cons = results[0]["consensus"]
        print(f"consensus distance: first {cons[0]:.3g}, max {max(cons):.3g}, last {cons[-1]:.3g}")
    print(
        f"load average: before {load_before[0]:.1f}, during mean {np.mean(loads):.1f} "
        f"(max {max(loads):.1f}) on {os.cpu_count()} cores"
    )
    print(f"worker pids left: {leftover_pids or 'none'}")
    watched = f"{len(inodes)} worker sockets, {len(ports)} listening ports watched"
    print(f"sockets left in LISTEN/ESTABLISHED ({watched}): {leftover_sockets or 'none'}")
    ok = not failed and codes == [0] * args.procs and not leftover_pids and not leftover_sockets
    print("soak: OK" if ok else f"soak: FAILED (worker outputs kept in {folder})")
    if ok:
        shutil.rmtree(folder, ignore_errors=True)
    sys.exit(0 if ok else 1)


def _training_window(folder: Path, procs: int, now: float, window: list[float]) -> list[float]:
    """``[when every worker had started training, when the first one finished]``, as seen."""
    started, done = window
    if started == float("inf") and len(list(folder.glob("started_*"))) == procs:
        started = now
    if done == float("inf") and any(folder.glob("result_*.json")):
        done = now
    return [started, done]


def _table(
    samples: list[list[tuple[float, float, int, int]]],
    results: list[dict[str, Any] | None],
    window: list[float],
) -> str:
    """Statistics of the samples taken while every worker was training: start (the first such
    sample), peak, end, and the slope after the first fifth of that time (warm-up)."""
    began, ended = window
    rows = [
        "| rank | steps | RSS start MB | RSS peak MB | RSS end MB | slope MB/min "
        "| 2nd half MB/min | fds start/end | threads start/end |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rank, series in enumerate(samples):
        if not series:
            rows.append(f"| {rank} |" + " - |" * 8)
            continue
        t, mb, fds, threads = (np.array(column) for column in zip(*series, strict=True))
        inside = (t >= began) & (t < ended)
        if not inside.any():
            inside = t >= 0  # too short a run to tell: every sample
        t, mb, fds, threads = t[inside], mb[inside], fds[inside], threads[inside]
        slope = _slope(t, mb, t[0] + 0.2 * (t[-1] - t[0]))
        second_half = _slope(t, mb, t[0] + 0.5 * (t[-1] - t[0]))
        steps = results[rank]["steps"] if results[rank] else "-"
        rows.append(
            f"| {rank} | {steps} | {mb[0]:.1f} | {mb.max():.1f} | {mb[-1]:.1f} | {slope:+.3f} | "
            f"{second_half:+.3f} | {fds[0]}/{fds[-1]} | {threads[0]}/{threads[-1]} |"
        )
    return "\n".join(rows)


def _slope(t: np.ndarray, mb: np.ndarray, since: float) -> float:
    """Least-squares growth of ``mb`` in MB per minute over the samples from ``since`` on."""
    late = t >= since
    return float(np.polyfit(t[late] / 60, mb[late], 1)[0]) if late.sum() >= 3 else float("nan")


# --- /proc ---------------------------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, int] | None:
    """``VmRSS`` (kB) and ``Threads`` of a live process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "Threads"):
            values[key] = int(rest.split()[0])
    return values if len(values) == 2 else None  # a zombie has no VmRSS


def _socket_inodes(pid: int) -> tuple[int, set[str]]:
    """How many file descriptors ``pid`` has open, and the inodes of its sockets."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return 0, set()
    return len(links), {link[8:-1] for link in links if link.startswith("socket:[")}


def _tcp_table() -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) of every TCP socket of this machine."""
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                local, remote = cols[1].rsplit(":", 1)[1], cols[2].rsplit(":", 1)[1]
                rows.append((int(local, 16), int(remote, 16), cols[3], cols[9]))
    return rows


def _ports_of(inodes: set[str]) -> set[int]:
    """Ports on which the sockets with these inodes listen."""
    return {local for local, _, state, inode in _tcp_table() if inode in inodes and state == "0A"}


def _open_sockets(inodes: set[str], ports: set[int]) -> list[str]:
    """Sockets still LISTEN or ESTABLISHED that the workers held, or on their listening ports."""
    left = []
    for local, remote, state, inode in _tcp_table():
        if state in _TCP_STATES and (inode in inodes or local in ports):
            left.append(f"{_TCP_STATES[state]} {local}->{remote} inode {inode}")
    return left


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


if __name__ == "__main__":
    main()
