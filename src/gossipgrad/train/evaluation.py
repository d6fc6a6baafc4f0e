"""Held-out evaluation: a model's loss and accuracy on a dataset shared out over the ranks. To
evaluate the replicas' exact average during training without changing the replicas, the loop
writes it into a scratch module first (``TrainingLoop._average_into``)."""

from __future__ import annotations

from collections.abc import Sized
from typing import cast

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from gossipgrad.train.metrics import Meter
from gossipgrad.train.models import task_loss


@torch.no_grad()
def evaluate(
    module: torch.nn.Module, dataset: Dataset, batch_size: int = 256
) -> tuple[float, float]:
    """Mean loss and accuracy of ``module`` on ``dataset``, each rank scoring a strided share
    (collective). Accuracy counts tokens for language models."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    meter = Meter(device)
    share = Subset(dataset, range(rank, len(cast(Sized, dataset)), world))
    # its own generator: a DataLoader draws its base seed from the global RNG otherwise, and an
    # evaluation mid-run must not change what training draws next
    for x, y in DataLoader(share, batch_size=batch_size, generator=torch.Generator()):
        x, y = x.to(device), y.to(device)
        output = module(x)
        meter.add(task_loss(output, y), output, y)
    totals = meter.reduce()
    module.train(was_training)
    return totals.loss or 0.0, totals.acc or 0.0
