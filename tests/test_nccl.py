"""The NCCL path: device tensors, no tags (matched by call order). Skipped without two GPUs."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gossipgrad import GossipDataParallel

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
    reason="needs NCCL and two CUDA devices (NCCL cannot run two ranks on one GPU)",
)


def _worker(rank: int, world: int, folder: str, sync: bool) -> None:
    torch.cuda.set_device(rank)
    store = dist.FileStore(os.path.join(folder, "store"), world)
    dist.init_process_group(
        "nccl", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    torch.manual_seed(rank)
    module = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
    model = GossipDataParallel(module.cuda(), sync=sync, bucket_cap_mb=0.001)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator(device="cuda").manual_seed(rank)
    for _ in range(20):
        x = torch.randn(32, 16, device="cuda", generator=g)
        nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()).backward()
        opt.step()
        opt.zero_grad()
    assert model.consensus_distance() < 0.5
    model.average_replicas()
    assert model.consensus_distance() < 1e-6
    flat = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    assert all(torch.equal(everyone[0], e) for e in everyone)
    dist.destroy_process_group()


@pytest.mark.parametrize("sync", [True, False])
def test_nccl_gossip_trains_and_averages(sync: bool) -> None:
    world = min(torch.cuda.device_count(), 4)
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(world, folder, sync), nprocs=world, start_method="spawn")


def test_cpu_module_on_nccl_is_refused() -> None:
    """Covered on CPU machines by the device check in parallel._check_device; here for real."""
    with tempfile.TemporaryDirectory() as folder:
        store = dist.FileStore(os.path.join(folder, "store"), 1)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1)
        try:
            with pytest.raises(ValueError, match="not on a CUDA device"):
                GossipDataParallel(nn.Linear(2, 2))
        finally:
            dist.destroy_process_group()
