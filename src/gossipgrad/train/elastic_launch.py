"""``gossipgrad train --elastic``: gossip training that goes on when workers die, and takes
restarted ones back in from a live peer (``gossipgrad.elastic``).

    gossipgrad train --elastic --nproc 4 --max-restarts 2 --dataset digits --epochs 10

torch elastic's agent restarts *all* its workers when one dies, so here each rank is its own
replica group (as torchft runs them): one agent per rank (``elastic_launch`` with a
``LaunchConfig`` of one process and that rank's own ``--max-restarts``), each in a process of its
own, and every agent and worker shares one ``TCPStore`` that this launcher hosts on the loopback
interface (it outlives the workers). When a worker dies, the others go on without it; its agent
restarts it, and the new process joins the running job (it receives the model, the optimizer's
state and the sampler's position from the lowest rank). A rank whose restarts are spent is
gone for good; the job succeeds if a rank finishes.

Each worker trains ``--max-steps`` steps (default: ``--epochs`` epochs of the dataset at the
start's ``--nproc``) with SGD (``--lr``, ``--momentum``, ``--weight-decay``) on a
``GossipShuffleSampler``, on the CPU with gloo; then the members average their replicas, score
the average on the held-out split, and the lowest rank writes ``<out>/gossip-elastic/``
(``model.pt``, ``summary.json``). Not supported with ``--elastic`` (yet): metrics records,
evaluations during training, learning rate schedules, mixed precision, other optimizers and the
all-reduce comparison.

**Checkpoints.** With ``--checkpoint-every N``, the members write
``<out>/gossip-elastic/checkpoints/step_*`` every N steps (``ElasticGossip.save_checkpoint``:
each member its replica, optimizer, engine state and sampler position, at the same step, in
``gossipgrad.checkpoint``'s format), through membership changes (the step counts on: a member
lost during a write leads to a change, and the survivors write it again). ``--resume`` (``auto``
or a path) starts the job from one: on the number of ranks that saved it, each rank from
exactly its saved state; on another number, every rank from the exact mean of the saved
replicas (``ElasticGossip.load_checkpoint``). A restarted worker that joins the running job
takes its replica from a live peer, never from a checkpoint.

On many machines, host the store with ``python -m gossipgrad.elastic store`` and run each rank
under its own torchrun (``--standalone``): see ``gossipgrad.elastic.__main__``.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sized
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from gossipgrad import checkpoint
from gossipgrad.elastic import ElasticGossip
from gossipgrad.sampler import GossipShuffleSampler
from gossipgrad.train import run_state
from gossipgrad.train.config import TrainConfig
from gossipgrad.train.data import load_dataset
from gossipgrad.train.evaluation import evaluate
from gossipgrad.train.launch import loopback_store
from gossipgrad.train.models import build_model, default_model, task_loss
from gossipgrad.train.worker import default_out

RUN = "gossip-elastic"  # the run's folder under --out


def elastic_command(cfg: TrainConfig) -> int:
    """Run ``cfg`` elastically on ``cfg.nproc`` local ranks (module docstring); print where the
    model went; return the exit status (0 if a rank finished, 2 for flags ``--elastic`` does
    not take)."""
    problem = check_elastic(cfg)
    if problem:
        sys.stderr.write(f"gossipgrad: error: {problem}\n")
        return 2
    out = Path(default_out(cfg))
    cfg = replace(cfg, out=str(out))
    try:
        run_state.check_resume(cfg, RUN, _model_name(cfg))
    except run_state.ResumeError as error:
        sys.stderr.write(f"gossipgrad: error: {error}\n")
        return 2
    torch.set_num_threads(1)  # forked agents and workers: no OpenMP threads alive at fork time
    with loopback_store(cfg.timeout_s) as (_, port):
        address = f"127.0.0.1:{port}"
        run_id = f"gossipgrad-elastic-{uuid.uuid4().hex[:8]}"
        logs = tempfile.mkdtemp(prefix="gossipgrad-elastic-logs-")
        context = mp.get_context("fork")
        agents = [
            context.Process(target=_agent, args=(cfg, str(out), rank, address, run_id, logs))
            for rank in range(cfg.nproc)
        ]
        for agent in agents:
            agent.start()
        for agent in agents:
            agent.join()
    summary = out / RUN / "summary.json"
    if not summary.exists():
        sys.stderr.write(
            f"gossipgrad: error: every elastic rank failed (logs in {logs}); raise "
            "--max-restarts, or see the first rank's log for the cause\n"
        )
        return 1
    shutil.rmtree(logs, ignore_errors=True)  # kept when every rank failed: the cause is there
    result = json.loads(summary.read_text())
    gone = sum(agent.exitcode != 0 for agent in agents)
    print(
        f"elastic run: {result['steps']} steps, {result['world_size']} ranks at the end, "
        f"{len(result['changes'])} membership changes, {gone} ranks gone for good; test "
        f"accuracy {result['accuracy']:.4f}; model in {out / RUN}"
    )
    return 0


def check_elastic(cfg: TrainConfig) -> str | None:
    """The first flag that ``--elastic`` does not take, as one line, or None."""
    refused = {
        "--algo": cfg.algo != "gossip" and f"{cfg.algo} (use --algo gossip)",
        "--device": cfg.device == "cuda" and "cuda (gloo on the CPU only)",
        "--schedule": cfg.schedule == "hypercube" and "hypercube (a power of two only)",
    }
    for name, value in refused.items():
        if value:
            return f"--elastic does not take {name} {value}"
    return None


def _agent(cfg: TrainConfig, out: str, rank: int, address: str, run_id: str, logs: str) -> None:
    """One rank's own torch elastic agent: it restarts this rank alone (``--max-restarts``)."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=1,
        rdzv_backend="c10d",
        rdzv_endpoint=address,
        rdzv_configs={"is_host": False},  # the launcher's store
        run_id=f"{run_id}-rank{rank}",
        max_restarts=cfg.max_restarts,
        start_method="fork",
        local_addr="127.0.0.1",
        monitor_interval=0.1,
        logs_specs=DefaultLogsSpecs(log_dir=os.path.join(logs, f"rank{rank}")),
    )
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10d's C++ traces of a lost peer
    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.multiprocessing.spawn"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the rank's log file has it all
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        elastic_launch(config, elastic_worker)(cfg, out, rank, address)
    except ChildFailedError:
        os._exit(1)
    os._exit(0)


def elastic_worker(
    cfg: TrainConfig,
    out: str,
    rank: int,
    address: str,
    on_step: Callable[[ElasticGossip], None] | None = None,
) -> dict[str, Any]:
    """One elastic rank (a fresh process or a restarted one): train, average, score, and (the
    lowest rank at the end) write ``<out>/gossip-elastic/``. ``on_step`` is called before each
    step (the benchmark's kills and clocks)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    timeout = timedelta(seconds=cfg.timeout_s)
    host, port = address.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
    train, test_set, info = load_dataset(cfg.dataset, seed=cfg.seed)
    train_set = cast(Sized, train)
    torch.manual_seed(cfg.seed)
    model_name = default_model(info) if cfg.model == "auto" else cfg.model
    module = build_model(model_name, info)
    options = cfg.gossip_options()
    elastic = ElasticGossip(module, store, world_size=cfg.nproc, rank=rank, options=options)
    optimizer = torch.optim.SGD(
        module.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    sampler = GossipShuffleSampler(
        train_set, seed=cfg.seed, shuffle_fraction=cfg.shuffle_fraction, timeout=timeout
    )
    saved = _Saved()  # travels to joiners with the replica: every member agrees when to save
    elastic.start(optimizer, sampler=sampler, state={"saved": saved})
    folder = Path(out) / RUN / "checkpoints"
    resume = _resume_path(cfg, folder) if cfg.resume and not elastic.changes else None
    if resume is not None:
        elastic.load_checkpoint(resume)
        saved.step = elastic.step
    identity = {"algo": RUN, "dataset": cfg.dataset, "model": model_name}
    record = {"run": {**identity, "config": cfg.to_dict()}}
    loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, sampler=sampler)
    batches = elastic.batches(loader)
    steps = cfg.max_steps or cfg.epochs * math.ceil(len(train_set) / (cfg.nproc * cfg.batch_size))
    began = time.perf_counter()
    while elastic.step < steps:
        every = cfg.checkpoint_every
        due = every and elastic.step % every == 0 and elastic.step > saved.step
        if due and elastic.save_checkpoint(folder, keep=cfg.keep_checkpoints, extra=record):
            saved.step = elastic.step
        if on_step is not None:
            on_step(elastic)
        x, y = next(batches)
        task_loss(module(x), y, cfg.label_smoothing).backward()
        optimizer.step()
        optimizer.zero_grad()
    trained_s = time.perf_counter() - began
    elastic.model.average_replicas()
    loss, accuracy = evaluate(module, test_set)
    summary = {
        "steps": elastic.step,
        "world_size": elastic.world_size,
        "accuracy": accuracy,
        "loss": loss,
        "train_time_s": trained_s,
        "changes": [change.__dict__ for change in elastic.changes],
        "resumed_from": str(resume) if resume is not None else None,
    }
    if elastic.rank == 0:
        folder = Path(out) / RUN
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), folder / "model.pt")
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    elastic.close()
    return summary


class _Saved:
    """The step of the last checkpoint, so that a step taken again after a membership change
    (or a joiner) does not write it twice: a ``state`` object of ``ElasticGossip.start``."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def _model_name(cfg: TrainConfig) -> str:
    if cfg.model != "auto":
        return cfg.model
    return default_model(load_dataset(cfg.dataset, seed=cfg.seed)[2])


def _resume_path(cfg: TrainConfig, folder: Path) -> Path | None:
    """The checkpoint ``--resume`` names: the newest intact one of ``folder`` (``auto``), of a
    checkpoints or run folder, or a ``step_*`` folder itself; None if there is none yet."""
    given = Path(cfg.resume)
    if cfg.resume == "auto":
        found = checkpoint.list_checkpoints(folder)
    elif (given / checkpoint.MANIFEST).exists():
        found = [given]
    else:
        found = next(
            (c for p in (given / RUN / "checkpoints", given / "checkpoints", given)
             if (c := checkpoint.list_checkpoints(p))),
            [],
        )  # fmt: skip
    intact = [path for path in found if checkpoint.validate(path, any_world=True) is None]
    return intact[-1] if intact else None
