"""One rank's training loop, as a small object, on a process group that is already initialised.

    loop = TrainingLoop(cfg, "gossip")   # setup: data, model, wrapper, optimizer, sampler, resume
    summary = loop.run()                 # every step and its periodic hooks, then finish()

After each ``step`` come the periodic hooks: a metrics ``record`` every ``--log-every`` steps
(and whenever the consensus distance is due), an ``evaluate`` of the replicas' exact average on
the held-out split every ``--eval-every`` epochs, and a checkpoint (``save``) every
``--checkpoint-every`` steps. The ``Stopwatch`` measures training time and pauses while
evaluating, so the ``time`` of every record never counts evaluations. ``finish`` averages the
replicas exactly, evaluates the average, and (rank 0) writes ``<out>/<algo>/``: ``model.pt`` (a
``state_dict``), ``summary.json`` and the end of ``metrics.jsonl``.

Between two steps of gossip an exchange is always in flight: the optimizer's step sends the
replica, and the next optimizer step mixes the partner's in. The consensus distance and the
periodic evaluation measure the replicas as they train and leave that exchange in flight, so a
run does not depend on how often it is measured. Only a checkpoint and ``finish`` complete it.

Every collective of the loop is behind ``gossipgrad.collectives.arrive`` with ``--timeout-s``:
a rank that does not come (stopped, hung or dead) is named by the others within the timeout
("rank 1 did not reach the metrics record of step 40 within 8 s"), never gloo's "Timed out
waiting for recv", which names no rank. The collectives made inside torch or other modules
(DDP's all-reduce, a checkpoint's, an evaluation's) are named after gloo's timeout by a roll
call in the job's store (``train``: ``collectives.name_the_absent``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sized
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from gossipgrad import DataParallel, NonFiniteError, checkpoint, wrap
from gossipgrad.collectives import (
    all_reduce_,
    arrive,
    barrier,
    broadcast_object,
    name_the_absent,
)
from gossipgrad.mixing import constant_buffers, replica_tensors
from gossipgrad.sampler import BalancedBatchSampler, GossipShuffleSampler
from gossipgrad.train import report, run_state
from gossipgrad.train.config import PRESETS, TrainConfig, flag
from gossipgrad.train.data import load_dataset
from gossipgrad.train.evaluation import evaluate
from gossipgrad.train.files import write_atomic
from gossipgrad.train.metrics import Meter, MetricsLog
from gossipgrad.train.models import build_model, default_model, task_loss
from gossipgrad.train.recipe import Recipe
from gossipgrad.train.run_state import Progress
from gossipgrad.train.sampling import JobSampler, make_sampler

MODEL_FILE = "model.pt"
SUMMARY_FILE = "summary.json"


def train(cfg: TrainConfig, algo: str) -> dict[str, Any]:
    """Train with ``algo`` on the initialised default process group and return the run's summary
    (the same on every rank). ``cfg.out`` must be set. A collective that gloo timed out without
    naming a rank (DDP's all-reduce, a checkpoint's, an evaluation's) raises ``PeerError``
    naming the ranks that never came (``collectives.name_the_absent``)."""
    loop = None
    try:
        loop = TrainingLoop(cfg, algo)
        return loop.run()
    except RuntimeError as error:
        where = "a collective of the setup" if loop is None else loop.where()
        absent = name_the_absent(error, timedelta(seconds=cfg.timeout_s), where)
        if absent is None:
            raise
        raise absent from error


class Stopwatch:
    """Training time in seconds: starts at ``offset`` (the time a checkpoint carried over) and
    stands still inside ``paused()``."""

    def __init__(self, offset: float = 0.0) -> None:
        self._origin = time.perf_counter() - offset

    def elapsed(self) -> float:
        return time.perf_counter() - self._origin

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        stopped = time.perf_counter()
        try:
            yield
        finally:
            self._origin += time.perf_counter() - stopped


class TrainingLoop:
    """Everything one rank trains with, and the steps and hooks of a run (module docstring)."""

    model: DataParallel
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sampler: JobSampler
    batches: BalancedBatchSampler | None  # --balance only
    progress: Progress
    resumed: run_state.Resumed | None
    recipe: Recipe
    saved_recipe: dict[str, Any] | None = None  # the checkpoint's, until the recipe is built
    finishing = False  # in finish(): the end of the run

    def __init__(self, cfg: TrainConfig, algo: str) -> None:
        """Setup (collective): the data, the model and its wrapper, the optimizer and sampler,
        then what ``--resume`` names."""
        self.cfg, self.algo = cfg, algo
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.timeout = timedelta(seconds=cfg.timeout_s)  # of every collective (module docstring)
        self.run_dir = Path(cfg.out) / algo
        self.checkpoints = self.run_dir / "checkpoints"
        self._prepare_folder()
        self.device = pick_device(cfg)
        self._build()
        self._restore()
        self._warn_one_node()
        self._announce()
        self.log = self._open_log() if self.rank == 0 else None

    def _build(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)  # same model initialisation on every rank
        self.train_set, self.test_set, self.info = load_dataset(cfg.dataset, seed=cfg.seed)
        self.model_name = default_model(self.info) if cfg.model == "auto" else cfg.model
        self.module = build_model(self.model_name, self.info).to(self.device)
        self.constants = constant_buffers(self.module)  # e.g. a causal mask of -inf
        self.scratch = self._scratch_module()  # before wrap() adds hooks to the module
        self.model = wrap(self.module, self.algo, cfg.gossip_options(), **self._layout())
        self.optimizer = make_optimizer(cfg, self.module)
        self.sampler = make_sampler(cfg, self.algo, self.train_set)
        self.batches = self._balanced_batches()
        if self.batches is not None:  # --balance: per-rank batch sizes, same steps everywhere
            self.loader = DataLoader(
                self.train_set,
                batch_sampler=self.batches,
                generator=torch.Generator(),  # leaves the global RNG alone (exact resume)
            )
        else:
            self.loader = DataLoader(
                self.train_set,
                batch_size=cfg.batch_size,
                sampler=self.sampler,
                drop_last=True,
                generator=torch.Generator(),  # leaves the global RNG alone (exact resume)
            )
        self.steps_per_epoch = self._steps_per_epoch()
        seed_everything(cfg.seed + 1 + self.rank)  # this rank's own stream (dropout, augmentation)
        self.identity = {"algo": self.algo, "dataset": cfg.dataset, "model": self.model_name}

    def _layout(self) -> dict[str, Any]:
        """``wrap``'s ``ranks_per_node`` for ``--algo hierarchical``: ``--ranks-per-node``, else
        torchrun's layout, else (a plain local launch) one node."""
        if self.algo != "hierarchical":
            return {}
        if self.cfg.ranks_per_node:
            return {"ranks_per_node": self.cfg.ranks_per_node}
        return {} if "GROUP_RANK" in os.environ else {"ranks_per_node": self.world}

    def _warn_one_node(self) -> None:
        nodes = getattr(self.model, "nodes", None)
        if self.algo == "hierarchical" and nodes is not None and len(nodes) == 1 and self.rank == 0:
            sys.stderr.write(
                "gossipgrad: warning: hierarchical: every rank is on one node, so this is "
                "all-reduce with no gossip (0 bytes between nodes); emulate nodes with "
                "--ranks-per-node K (K divides the number of ranks)\n"
            )

    def _restore(self) -> None:
        """Load what ``--resume`` names, start the stopwatch where it stopped, and work out the
        step to stop at."""
        self.progress = Progress(meter=Meter(self.device))
        if self.cfg.resume:
            self._arrive("loading the checkpoint to resume from")
        self.resumed = run_state.resume(self)
        apply_optimizer_settings(self.cfg, self.optimizer)  # the flags win over the checkpoint
        self.recipe = Recipe(self.cfg, self.optimizer, self.device, self.steps_per_epoch)
        if self.resumed is not None:
            self.recipe.load_state_dict(self.saved_recipe, self.progress.step)
        self.watch = Stopwatch(self.progress.elapsed_s)
        self.progress.meter.started = self.progress.elapsed_s
        self.total_steps = self._total_steps()
        self.last_saved = self.progress.step if self.resumed else -1

    # --- the run --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train until ``total_steps``, then ``finish``; returns the summary."""
        progress = self.progress
        while progress.step < self.total_steps:
            self.sampler.set_epoch(progress.epoch)
            for x, y in self.loader:
                self.step(x, y)
                self.after_step()
                if progress.step >= self.total_steps:
                    break
            else:
                progress.epoch += 1
        return self.finish()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One training step on this rank's batch ``(x, y)``; with ``--balance`` the loss is
        weighted by the batch's size and the step's busy time is reported to the shuffle."""
        began, waited = time.perf_counter(), self._wait_time_s()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.recipe.autocast():
            output = self.model(x)
            loss = task_loss(output, y, self.cfg.label_smoothing)
        weight = 1.0 if self.batches is None else self.batches.weight(len(y))
        self.recipe.backward_and_step(loss * weight if weight != 1.0 else loss, self.module)
        if self.batches is not None and isinstance(self.sampler, GossipShuffleSampler):
            busy = time.perf_counter() - began - (self._wait_time_s() - waited)
            self.sampler.report_speed(len(y), max(busy, 1e-9))
        self.progress.step += 1
        self.progress.samples += len(y)
        self.progress.bytes_sent += self.model.bytes_sent_last_step
        self.progress.meter.add(loss, output, y)
        if self.log is not None:
            self.log.advance()

    def after_step(self) -> None:
        """The periodic hooks that are due after this step."""
        step, cfg = self.progress.step, self.cfg
        if step % cfg.log_every == 0 or self._consensus_due():
            self.record()
        if self._eval_due():
            self.evaluate()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            self.save()

    # --- hooks ----------------------------------------------------------------------------------

    def record(self) -> None:
        """One metrics record: the loss and accuracy since the last one over all ranks, the
        consensus distance if due, samples per second (collective)."""
        progress = self.progress
        self._arrive(f"the metrics record of step {progress.step}")
        totals = progress.meter.reduce()
        now = self.watch.elapsed()
        entry: dict[str, Any] = {
            "step": progress.step,
            "epoch": progress.epoch,
            "time": now,
            "loss": totals.loss,
            "acc": totals.acc,
            "consensus": None,
            "lr": self.recipe.lr(),
            "samples_per_s": totals.samples / max(now - progress.meter.started, 1e-9),
        }
        if self._consensus_due():
            entry["consensus"], bad = self._consensus()
            if bad:
                entry["nonfinite_ranks"] = bad
        progress.meter = Meter(self.device, started=now)
        self._log(entry)

    def evaluate(self) -> None:
        """Held-out loss and accuracy of the replicas' exact average, evaluated in the scratch
        copy (or in the module itself when the replicas are identical); the replicas, and the
        exchange in flight, are left as they are, and the stopwatch stands still meanwhile
        (collective)."""
        started = self.watch.elapsed()
        with self.watch.paused():
            began = time.perf_counter()
            if self.scratch is not None:
                self.model.average_replicas(into=self.scratch)
            target = self.model.module if self.scratch is None else self.scratch
            test_loss, test_acc = evaluate(target, self.test_set, batch_size=self._eval_batch())
            entry = {
                "step": self.progress.step,
                "epoch": self.progress.epoch + 1,  # at the end of an epoch, before it moves on
                "time": started,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "eval_s": time.perf_counter() - began,
            }
        self._log(entry)

    def save(self) -> None:
        """A checkpoint of every replica and of the run's progress (collective)."""
        self.progress.elapsed_s = self.watch.elapsed()
        self._arrive(f"the checkpoint of step {self.progress.step}")
        run_state.save(self)
        self.last_saved = self.progress.step

    def finish(self) -> dict[str, Any]:
        """The last exchange, the last checkpoint, the exact average and its evaluation, the
        summary; rank 0 writes the model and the summary; the wrapper is closed. Returns the
        summary (every rank)."""
        self.finishing = True
        self.model.flush()  # the last exchange is training time too
        self.progress.elapsed_s = self.watch.elapsed()
        if self.cfg.checkpoint_every and self.last_saved != self.progress.step:
            self._arrive(f"the checkpoint of step {self.progress.step}")
            run_state.save(self)
        summary = self._summarise()
        self.sampler.flush()
        if self.log is not None:
            if self.cfg.eval_every:
                self.log.record(self._final_eval_record(summary))
            self.log.close()
            report.write_json(self.run_dir / SUMMARY_FILE, summary)
            weights = {k: v.cpu() for k, v in self.module.state_dict().items()}
            write_atomic(self.run_dir / MODEL_FILE, lambda f: torch.save(weights, f))
            if not self.cfg.quiet:
                print(
                    f"{self.algo}: test accuracy {summary['test_accuracy']:.2%} (averaged model) "
                    f"after {summary['train_time_s']:.1f} s -> {self.run_dir / MODEL_FILE}",
                    flush=True,
                )
        close = getattr(self.model, "close", None)  # the gossip wrappers: remove their hooks
        if close is not None:
            close()
        barrier(None, self.timeout, "the end of the run")
        return summary

    # --- pieces ---------------------------------------------------------------------------------

    def _summarise(self) -> dict[str, Any]:
        """Average the replicas exactly, evaluate the average, and summarise the run."""
        cfg, progress, world = self.cfg, self.progress, self.world
        self.model.flush()
        consensus, _ = self._consensus()
        began = time.perf_counter()
        excluded = self._average_finite()
        test_loss, test_acc = evaluate(self.module, self.test_set, batch_size=self._eval_batch())
        eval_s = time.perf_counter() - began
        totals = [float(progress.bytes_sent), float(progress.samples)]
        sent = torch.tensor(totals, dtype=torch.float64, device=self.device)
        all_reduce_(sent, None, self.timeout, "the end-of-run totals")
        train_records = [r for r in progress.history if r.get("loss") is not None]
        samples = sent[1].item()  # counted, not steps x --batch-size: it may have changed
        summary = {
            "algo": self.algo,
            "world_size": world,
            "steps": progress.step,
            "train_time_s": progress.elapsed_s,
            "samples_per_s": samples / max(progress.elapsed_s, 1e-9),
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "eval_s": eval_s,
            "train_loss": train_records[-1]["loss"] if train_records else None,
            "bytes_per_rank_per_step": sent[0].item() / world / max(progress.step, 1),
            "consensus_distance": consensus,
            "excluded_ranks": excluded,
            "consensus_warnings": sum("warning" in r for r in progress.history),
            "run_dir": str(self.run_dir),
            "config": cfg.to_dict(),
            "preset": {"name": cfg.preset, "values": PRESETS.get(cfg.preset, {})},
            "dataset": self.info.name,
            "model": self.model_name,
            "epochs": round(run_state.epochs_trained(self), 3),
            **self._resume_record(),
        }
        # rank 0's timings and history for everyone
        return broadcast_object(summary, None, self.timeout, "the end-of-run summary")

    # --- non-finite replicas ----------------------------------------------------------------------

    def nonfinite_ranks(self) -> list[int]:
        """The ranks whose replica holds NaN or inf (collective: one small all-reduce)."""
        flags = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        flags[self.rank] = 0.0 if self._replica_is_finite() else 1.0
        all_reduce_(flags, None, self.timeout, f"the non-finite check of step {self.progress.step}")
        return [rank for rank, bad in enumerate(flags.tolist()) if bad]

    def _replica_is_finite(self) -> bool:
        tensors = replica_tensors(self.module, self.constants)
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def _consensus(self) -> tuple[float, list[int]]:
        """The consensus distance of the replicas as they train (the exchange in flight is left
        there: module docstring), ``nan`` when a replica is not finite, and the ranks whose
        replica is not (collective)."""
        distance = self.model.consensus_distance()
        bad = self.nonfinite_ranks()
        return (math.nan if bad else distance), bad

    def _average_finite(self) -> list[int]:
        """Set every replica to the exact average of the finite replicas; returns the ranks left
        out (with a warning). Raises ``NonFiniteError`` when no replica is finite: there is no
        model to export (collective)."""
        bad = self.nonfinite_ranks()
        if not bad:
            self.model.average_replicas()
            return []
        if len(bad) == self.world:
            raise NonFiniteError(
                f"every replica holds NaN or inf at step {self.progress.step}: training diverged "
                "and there is no model to export (lower --lr, or check the data)"
            )
        tensors = replica_tensors(self.module, self.constants)
        flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
        if self.rank in bad:
            flat.zero_()
        all_reduce_(flat, None, self.timeout, "the average of the finite replicas")
        flat /= self.world - len(bad)
        with torch.no_grad():
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()
        if self.rank == 0:
            sys.stderr.write(
                f"gossipgrad: warning: {self.algo}: "
                f"{'ranks' if len(bad) > 1 else 'rank'} {', '.join(map(str, bad))} "
                f"{'hold' if len(bad) > 1 else 'holds'} NaN or inf at step {self.progress.step} "
                f"(diverged): the exported model is the exact average of the "
                f"{self.world - len(bad)} finite replicas\n"
            )
        return bad

    def _resume_record(self) -> dict[str, Any]:
        resumed = self.resumed
        if resumed is None:
            return {"resumed_from": None}
        return {
            "resumed_from": str(resumed.path),
            "resumed_world_size": resumed.world_size,
            "resumed_changes": resumed.changes,
            "resume_skipped": resumed.skipped,
        }

    def _final_eval_record(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The end-of-run evaluation (``_summarise``'s) as a record like ``evaluate``'s."""
        return {
            "step": self.progress.step,
            "epoch": summary["epochs"],
            "time": self.progress.elapsed_s,
            "test_loss": summary["test_loss"],
            "test_acc": summary["test_accuracy"],
            "eval_s": summary["eval_s"],
        }

    def _log(self, entry: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.record(entry)
            self.progress.history = self.log.history

    def where(self) -> str:
        """Where the run is, for an error message: "a collective after step 12"."""
        if self.finishing:
            return f"a collective of the end of the run (step {self.progress.step})"
        return f"a collective after step {self.progress.step}"

    def _arrive(self, what: str) -> None:
        """Meet every rank before a collective made elsewhere (the metrics' all-reduce, the
        checkpoint's): a rank that does not come is named within ``--timeout-s``."""
        arrive(None, self.timeout, what)

    def _consensus_due(self) -> bool:
        every = self.cfg.consensus_every
        return every > 0 and self.progress.step % every == 0

    def _eval_due(self) -> bool:
        """Every ``eval_every`` epochs, except at the last step: ``finish`` evaluates there."""
        period = self.cfg.eval_every * self.steps_per_epoch
        step = self.progress.step
        return period > 0 and step < self.total_steps and step % period == 0

    def _eval_batch(self) -> int:
        return max(256, self.cfg.batch_size)

    def _scratch_module(self) -> torch.nn.Module | None:
        """A copy of the module to evaluate the replicas' average in, with ``--eval-every``;
        None when there is nothing to evaluate periodically, or the replicas are identical
        (all-reduce)."""
        if not self.cfg.eval_every or self.algo == "allreduce":
            return None
        return copy.deepcopy(self.module)

    def _balanced_batches(self) -> BalancedBatchSampler | None:
        """``--balance``: the gossip shuffle's batch sampler (all-reduce keeps equal shards)."""
        if not self.cfg.balance or not isinstance(self.sampler, GossipShuffleSampler):
            return None
        return self.sampler.batch_sampler(self.cfg.batch_size)

    def _wait_time_s(self) -> float:
        """Seconds the wrapper has waited for peers so far (0 for those that do not say)."""
        return float(getattr(self.model, "wait_time_s", 0.0))

    def _steps_per_epoch(self) -> int:
        if self.batches is not None:
            return len(self.batches)
        steps = len(self.sampler) // self.cfg.batch_size
        if steps == 0:
            raise ValueError(
                f"--batch-size {self.cfg.batch_size} is larger than a rank's share of the "
                f"training set ({len(self.sampler)} samples at {self.world} ranks): lower "
                "--batch-size"
            )
        return steps

    def _total_steps(self) -> int:
        """The step to stop at: the end of ``--epochs`` counted from where the sampler stands
        (after a resume on another world size too), capped by ``--max-steps``."""
        step, epoch = self.progress.step, self.progress.epoch
        yielded = self.sampler.state_dict()["yielded"]
        if self.batches is not None:
            left_in_epoch = self.batches.batches_left(yielded)
        else:
            left_in_epoch = (len(self.sampler) - yielded) // self.cfg.batch_size
        total = step + left_in_epoch + (self.cfg.epochs - epoch - 1) * self.steps_per_epoch
        total = min(total, self.cfg.max_steps) if self.cfg.max_steps else total
        return max(total, step)

    def _prepare_folder(self) -> None:
        """Refuse to mix two runs' checkpoints; clear what an interrupted save left (the run
        holds the folder's lock, so no save is running there)."""
        run_state.check_fresh_start(self.cfg, self.checkpoints)
        if self.rank == 0:
            checkpoint.remove_partial(self.checkpoints)
        barrier(None, self.timeout, "the start of the run (the run folder checked)")

    def _announce(self) -> None:
        if self.rank != 0 or self.cfg.quiet:
            return
        params = sum(p.numel() for p in self.module.parameters())
        ranks = f"{self.world} rank{'' if self.world == 1 else 's'}"
        sizes = [len(cast(Sized, d)) for d in (self.train_set, self.test_set)]
        data = f"{self.info.name} ({sizes[0]} train / {sizes[1]} test)"
        steps = f"{self.total_steps} steps of {self.cfg.batch_size} per rank"
        print(
            f"{self.algo}: {ranks}, {data}, {self.model_name} ({params:,} parameters), "
            f"{steps} -> {self.run_dir}"
        )
        if self.resumed is not None:
            print(f"{self.algo}: {self._resume_line(self.resumed)}")

    def _resume_line(self, resumed: run_state.Resumed) -> str:
        line = f"resumed at step {self.progress.step} from {resumed.path}"
        if resumed.world_size != self.world:
            line += (
                f", written by {resumed.world_size} ranks: every rank starts from the exact "
                f"average of the {resumed.world_size} replicas (optimizer state averaged too, "
                "sampler re-sharded)"
            )
        changes = ", ".join(
            f"{flag(k)} {old} -> {new}" for k, (old, new) in resumed.changes.items()
        )
        return line + (f"; changed: {changes}" if changes else "")

    def _open_log(self) -> MetricsLog:
        return MetricsLog(
            self.run_dir,
            algo=self.algo,
            total_steps=self.total_steps,
            start_step=self.progress.step,
            history=self.progress.history,
            quiet=self.cfg.quiet,
            tensorboard=self.cfg.tensorboard,
            consensus_warn=self.cfg.consensus_warn,
        )


def pick_device(cfg: TrainConfig) -> torch.device:
    """``--device``: cuda (this rank's GPU by LOCAL_RANK), cpu, or auto (cuda if available)."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local % torch.cuda.device_count())


def optimizer_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The hyperparameters of ``--optimizer`` that the flags set (also re-applied on resume)."""
    if cfg.optimizer == "sgd":
        return {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    return {"lr": cfg.lr, "betas": (cfg.momentum, 0.999), "weight_decay": cfg.weight_decay}


def make_optimizer(cfg: TrainConfig, module: torch.nn.Module) -> torch.optim.Optimizer:
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    return kinds[cfg.optimizer](module.parameters(), **optimizer_settings(cfg))


def apply_optimizer_settings(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> None:
    """Set the flags' hyperparameters in every parameter group (``load_state_dict`` brings back
    the checkpoint's, and a resumed run may change them)."""
    for group in optimizer.param_groups:
        group.update(optimizer_settings(cfg))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
