"""The training job: one process per rank, launched by ``gossipgrad train`` or by torchrun.

    gossipgrad train --algo both                       # 4 local workers, gossip then all-reduce
    python -m gossipgrad.train --algo gossip           # one worker (a world of one)
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m gossipgrad.train --algo gossip --out runs/big --resume auto

Each worker reads RANK / WORLD_SIZE / LOCAL_RANK from the environment. Under torch elastic
(torchrun, or the launcher of ``gossipgrad train``) the process group is built over the agent's
store with a ``PrefixStore`` per restart attempt, so restarted workers (``--max-restarts``) meet
afresh; with ``--resume auto`` they continue from the last checkpoint.

``train(cfg, algo)`` is the loop itself, for a process group that is already initialised (tests
call it in-process). A run writes to ``<out>/<algo>/``: ``metrics.jsonl``, ``checkpoints/``, and
at the end ``model.pt`` (the exact average of the replicas, a ``state_dict``) and
``summary.json``; ``<out>/report.png`` and ``<out>/summary.json`` compare the algorithms run.

``--eval-every N`` evaluates the exact average of the replicas on the held-out split every N
epochs, in a scratch copy of the module (the replicas themselves are not changed), and records
``test_loss`` / ``test_acc`` in ``metrics.jsonl`` with ``time``, the training time so far: the
clock of every record stops while evaluating, so ``time`` never counts evaluations.
"""

from __future__ import annotations

import copy
import os
import random
import socket
import sys
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from gossipgrad import checkpoint, wrap
from gossipgrad.sampler import GossipShuffleSampler
from gossipgrad.train import report, run_state
from gossipgrad.train.config import TrainConfig, load_config
from gossipgrad.train.data import load_dataset
from gossipgrad.train.evaluation import evaluate
from gossipgrad.train.metrics import MetricsLog
from gossipgrad.train.models import build_model, default_model, task_loss
from gossipgrad.train.run_state import Progress, Window

MODEL_FILE = "model.pt"
SUMMARY_FILE = "summary.json"


def main(argv: list[str] | None = None) -> None:
    """``python -m gossipgrad.train [options]``: one worker (see the module docstring)."""
    cfg = load_config(sys.argv[1:] if argv is None else argv, prog="python -m gossipgrad.train")
    worker(cfg)


@record
def worker(cfg: TrainConfig, standalone: bool = True) -> dict[str, dict[str, Any]]:
    """One rank: join the process group and run each algorithm of ``cfg``; then, ``standalone``
    (not under ``gossipgrad train``, which does it itself), rank 0 writes the comparison report
    and prints the table. Returns ``{algo: summary}``."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))
    device = _device(cfg)
    init_distributed("nccl" if device.type == "cuda" else "gloo", timedelta(seconds=cfg.timeout_s))
    try:
        cfg = replace(cfg, out=_shared_out(cfg))
        results = {algo: train(cfg, algo) for algo in cfg.algos()}
        if dist.get_rank() == 0 and standalone:
            summary = report.write_report(Path(cfg.out))
            print(f"\n{summary['table']}\n\nreport: {Path(cfg.out) / report.REPORT_IMAGE}")
        return results
    finally:
        dist.destroy_process_group()


def init_distributed(backend: str, timeout: timedelta) -> None:
    """Initialise the default process group from the environment (no-op if already done)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # a plain `python -m gossipgrad.train`: a world of one
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by hand
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
        return
    # Under torch elastic: one key space per restart attempt, or restarted gloo workers would
    # find the previous attempt's keys and fail to connect.
    store = dist.PrefixStore(f"attempt_{attempt}", _elastic_store(rank, world, timeout))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def _elastic_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or rank != 0:
        return dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    # Rank 0 hosts the store. TCPStore alone listens on every interface; a socket bound to
    # MASTER_ADDR keeps it there (the loopback address for `gossipgrad train`).
    listener = socket.create_server((addr, port))
    return dist.TCPStore(
        addr, port, world, is_master=True, timeout=timeout, master_listen_fd=listener.detach()
    )


def default_out(cfg: TrainConfig) -> str:
    """The run folder: ``--out``; with ``--resume auto`` and no ``--out``, the newest folder in
    ``runs/``; else a new ``runs/<date-time>``."""
    if cfg.out:
        return cfg.out
    runs = Path("runs")
    if cfg.resume == "auto" and runs.is_dir():
        earlier = sorted(p for p in runs.iterdir() if p.is_dir())
        if earlier:
            return str(earlier[-1])
    return str(runs / datetime.now().strftime("%Y%m%d-%H%M%S"))


def _shared_out(cfg: TrainConfig) -> str:
    """``default_out(cfg)`` as rank 0 sees it, for every rank."""
    box = [default_out(cfg)]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


# --- the loop -----------------------------------------------------------------------------------


def train(cfg: TrainConfig, algo: str) -> dict[str, Any]:
    """Train with ``algo`` ("gossip" or "allreduce") on the initialised default process group and
    return the run's summary (the same on every rank). ``cfg.out`` must be set."""
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(cfg.out) / algo
    if not cfg.resume and checkpoint.list_checkpoints(run_dir / "checkpoints"):
        raise ValueError(
            f"{run_dir} already holds checkpoints of an earlier run: continue it with "
            "--resume auto, or choose another --out"
        )
    device = _device(cfg)
    _seed_everything(cfg.seed)  # same model initialisation on every rank
    train_set, test_set, info = load_dataset(cfg.dataset, seed=cfg.seed)
    model_name = default_model(info) if cfg.model == "auto" else cfg.model
    module = build_model(model_name, info).to(device)
    scratch = _scratch_module(cfg, algo, module)  # before wrap() adds hooks to the module
    model = wrap(module, algo, cfg.gossip_options())
    optimizer = _optimizer(cfg, module)
    sampler = _sampler(cfg, algo, train_set)
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator(),  # leaves the global RNG alone (exact resume)
    )
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is larger than a rank's share of the training set "
            f"({len(sampler)} samples at {world} ranks): lower --batch-size"
        )
    total_steps = cfg.epochs * steps_per_epoch
    total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    _seed_everything(cfg.seed + 1 + rank)  # this rank's own stream (dropout, augmentation)

    progress = Progress(window=run_state.new_window(device))
    identity = {"algo": algo, "dataset": cfg.dataset, "model": model_name}
    resumed = run_state.resume(
        cfg, run_dir / "checkpoints", identity, model, optimizer, sampler, progress
    )
    if rank == 0 and not cfg.quiet:
        params = sum(p.numel() for p in module.parameters())
        ranks = f"{world} rank{'' if world == 1 else 's'}"
        data = f"{info.name} ({len(train_set)} train / {len(test_set)} test)"
        steps = f"{total_steps} steps of {cfg.batch_size} per rank"
        where = f"{run_dir}" + (f" (resumed at step {progress.step})" if resumed else "")
        print(f"{algo}: {ranks}, {data}, {model_name} ({params:,} parameters), {steps} -> {where}")

    log = (
        MetricsLog(
            run_dir,
            algo=algo,
            total_steps=total_steps,
            start_step=progress.step,
            history=progress.history,
            quiet=cfg.quiet,
            tensorboard=cfg.tensorboard,
            consensus_warn=cfg.consensus_warn,
        )
        if rank == 0
        else None
    )
    began = time.perf_counter() - progress.elapsed_s
    last_saved = progress.step if resumed else -1
    while progress.step < total_steps:
        sampler.set_epoch(progress.epoch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            output = model(x)
            loss = task_loss(output, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.step += 1
            progress.bytes_sent += model.bytes_sent_last_step
            _accumulate(progress.window, loss, output, y)
            if log is not None:
                log.advance()
            if progress.step % cfg.log_every == 0 or _consensus_due(cfg, progress.step):
                entry = _measure(cfg, model, progress, began)
                progress.window = run_state.new_window(device)
                if log is not None:
                    log.record(entry)
                    progress.history = log.history
            if _eval_due(cfg, progress.step, steps_per_epoch, total_steps):
                entry = _evaluate_average(cfg, model, scratch, test_set, progress, began)
                began += entry["eval_s"]  # the training clock stops while evaluating
                progress.window.began += entry["eval_s"]
                if log is not None:
                    log.record(entry)
                    progress.history = log.history
            if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0:
                progress.elapsed_s = time.perf_counter() - began
                run_state.save(cfg, run_dir, identity, model, optimizer, sampler, progress)
                last_saved = progress.step
            if progress.step >= total_steps:
                break
        else:
            progress.epoch += 1

    model.flush()  # the last exchange is training time too
    progress.elapsed_s = time.perf_counter() - began
    if cfg.checkpoint_every and last_saved != progress.step:
        run_state.save(cfg, run_dir, identity, model, optimizer, sampler, progress)
    summary = _finish(cfg, algo, model, module, test_set, progress, world, run_dir)
    summary.update(
        dataset=info.name,
        model=model_name,
        epochs=round(progress.step / steps_per_epoch, 3),
        resumed_from=str(resumed) if resumed else None,
    )
    if isinstance(sampler, GossipShuffleSampler):
        sampler.flush()
    if log is not None:
        if cfg.eval_every:
            log.record(_final_eval_record(summary, progress))
        log.close()
        report.write_json(run_dir / SUMMARY_FILE, summary)
        torch.save({k: v.cpu() for k, v in module.state_dict().items()}, run_dir / MODEL_FILE)
        if not cfg.quiet:
            print(
                f"{algo}: test accuracy {summary['test_accuracy']:.2%} (averaged model) after "
                f"{summary['train_time_s']:.1f} s -> {run_dir / MODEL_FILE}",
                flush=True,
            )
    dist.barrier()
    return summary


def _finish(
    cfg: TrainConfig,
    algo: str,
    model: Any,
    module: torch.nn.Module,
    test_set: Dataset,
    progress: Progress,
    world: int,
    run_dir: Path,
) -> dict[str, Any]:
    """Average the replicas exactly, evaluate the average, and summarise the run."""
    model.flush()
    consensus = model.consensus_distance()
    start = time.perf_counter()
    model.average_replicas()
    test_loss, test_acc = evaluate(module, test_set, batch_size=max(256, cfg.batch_size))
    eval_s = time.perf_counter() - start
    device = next(module.parameters()).device
    sent = torch.tensor([float(progress.bytes_sent)], dtype=torch.float64, device=device)
    dist.all_reduce(sent)
    steps = max(progress.step, 1)
    train_records = [r for r in progress.history if r.get("loss") is not None]
    summary = {
        "algo": algo,
        "world_size": world,
        "steps": progress.step,
        "train_time_s": progress.elapsed_s,
        "samples_per_s": progress.step * cfg.batch_size * world / max(progress.elapsed_s, 1e-9),
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "eval_s": eval_s,
        "train_loss": train_records[-1]["loss"] if train_records else None,
        "bytes_per_rank_per_step": sent.item() / world / steps,
        "consensus_distance": consensus,
        "consensus_warnings": sum("warning" in r for r in progress.history),
        "run_dir": str(run_dir),
        "config": cfg.to_dict(),
    }
    box = [summary]
    dist.broadcast_object_list(box, src=0)  # rank 0's timings and history for everyone
    return box[0]


# --- held-out evaluation during training -------------------------------------------------------


def _scratch_module(cfg: TrainConfig, algo: str, module: torch.nn.Module) -> torch.nn.Module | None:
    """A copy of ``module`` to evaluate the replicas' average in, with ``--eval-every``; None
    when there is nothing to evaluate periodically, or the replicas are identical (all-reduce)."""
    if not cfg.eval_every or algo == "allreduce":
        return None
    return copy.deepcopy(module)


def _eval_due(cfg: TrainConfig, step: int, steps_per_epoch: int, total_steps: int) -> bool:
    """Every ``eval_every`` epochs, except at the last step: ``_finish`` evaluates there."""
    period = cfg.eval_every * steps_per_epoch
    return period > 0 and step < total_steps and step % period == 0


def _evaluate_average(
    cfg: TrainConfig,
    model: Any,
    scratch: torch.nn.Module | None,
    test_set: Dataset,
    progress: Progress,
    began: float,
) -> dict[str, Any]:
    """Held-out loss and accuracy of the replicas' exact average, evaluated in ``scratch`` (or in
    the module itself when the replicas are identical); the replicas are left as they are
    (collective). ``time`` is the training time so far; ``eval_s`` what this took."""
    model.flush()  # the exchange in flight is training time; the next forward would wait for it
    start = time.perf_counter()
    if scratch is not None:
        model.average_replicas(into=scratch)
    target = model.module if scratch is None else scratch
    test_loss, test_acc = evaluate(target, test_set, batch_size=max(256, cfg.batch_size))
    return {
        "step": progress.step,
        "epoch": progress.epoch + 1,  # called at the end of an epoch, before the count moves on
        "time": start - began,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "eval_s": time.perf_counter() - start,
    }


def _final_eval_record(summary: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """The end-of-run evaluation (``_finish``'s) as a record like ``_evaluate_average``'s."""
    return {
        "step": progress.step,
        "epoch": summary["epochs"],
        "time": progress.elapsed_s,
        "test_loss": summary["test_loss"],
        "test_acc": summary["test_accuracy"],
        "eval_s": summary["eval_s"],
    }


# --- steps, records ------------------------------------------------------------------------------


def _accumulate(
    window: Window, loss: torch.Tensor, output: torch.Tensor, target: torch.Tensor
) -> None:
    with torch.no_grad():
        window.loss += loss.detach().double() * target.numel()
        window.correct += (output.argmax(-1) == target).sum()
    window.targets += target.numel()
    window.samples += target.shape[0]


def _consensus_due(cfg: TrainConfig, step: int) -> bool:
    return cfg.consensus_every > 0 and step % cfg.consensus_every == 0


def _measure(cfg: TrainConfig, model: Any, progress: Progress, began: float) -> dict[str, Any]:
    """One record: the window's loss and accuracy over all ranks, the consensus distance if due,
    samples per second (collective)."""
    window = progress.window
    sums = torch.stack(
        [
            window.loss,
            window.correct,
            window.loss.new_tensor(window.targets),
            window.loss.new_tensor(window.samples),
        ]
    )
    dist.all_reduce(sums)
    loss, correct, targets, samples = sums.tolist()
    now = time.perf_counter()
    return {
        "step": progress.step,
        "epoch": progress.epoch,
        "time": now - began,
        "loss": loss / targets if targets else None,
        "acc": correct / targets if targets else None,
        "consensus": model.consensus_distance() if _consensus_due(cfg, progress.step) else None,
        "samples_per_s": samples / max(now - window.began, 1e-9),
    }


# --- pieces -------------------------------------------------------------------------------------


def _device(cfg: TrainConfig) -> torch.device:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local % torch.cuda.device_count())


def _optimizer(cfg: TrainConfig, module: torch.nn.Module) -> torch.optim.Optimizer:
    params = module.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def _sampler(cfg: TrainConfig, algo: str, dataset: Dataset) -> Any:
    """Gossip (flat or hierarchical) shuffles shards between partners; all-reduce uses
    DistributedSampler's global reshuffle (the usual DDP setup)."""
    if algo in ("gossip", "hierarchical"):
        return GossipShuffleSampler(
            dataset,
            seed=cfg.seed,
            drop_last=True,
            shuffle_fraction=cfg.shuffle_fraction,
            schedule=cfg.schedule,
            timeout=timedelta(seconds=cfg.timeout_s),
        )
    return ResumableDistributedSampler(dataset, seed=cfg.seed, drop_last=True)


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can stop mid-epoch and resume there (``state_dict``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.yielded = 0
        self._resume_at = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        order = list(super().__iter__())
        start, self._resume_at = self._resume_at, 0
        self.yielded = start
        for index in order[start:]:
            self.yielded += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.yielded = self._resume_at = int(state["yielded"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
