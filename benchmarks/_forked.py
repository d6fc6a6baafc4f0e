"""Run a function on forked gloo ranks and collect each rank's result (for the benchmarks).

    results = run_forked(fn, world, args, timeout=900)  # results[r] == fn(r, world, *args)

The ranks are forked (the parent's imports are inherited, so import what the ranks use before
calling), one thread each, with a process group over a FileStore in a temporary folder. A rank
that raises makes ``run_forked`` raise with its traceback; ranks still running after ``timeout``
seconds are killed. (The tests have their own copy in ``tests/_dist.py``: benchmarks and tests do
not import each other.)
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world: int, folder: str, args: tuple) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(folder, "store"), world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )
    dist.barrier()
    try:
        out: Any = ("ok", fn(rank, world, *args))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(os.path.join(folder, f"result_{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def run_forked(fn: Callable[..., Any], world: int, args: tuple, timeout: float) -> list[Any]:
    """``[fn(rank, world, *args) for rank in range(world)]``, each on its own forked rank."""
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world, folder, args),
            nprocs=world,
            join=False,
            start_method="fork",
        )
        deadline = time.monotonic() + timeout
        try:
            for p in ctx.processes:
                p.join(max(0.0, deadline - time.monotonic()))
            hung = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
            if hung:
                raise TimeoutError(f"ranks {hung} still running after {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        out = []
        for rank in range(world):
            path = os.path.join(folder, f"result_{rank}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} died without a result")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed: {value}")
            out.append(value)
        return out
