"""The stragglers guide's snippets: bounded staleness, and work balancing with a slow rank.

    torchrun --standalone --nproc-per-node 2 examples/snippets/stragglers.py

Runs on CPU (gloo) in a few seconds, writes nothing, and asserts what the guide says: with
``balance=True`` the last rank, made slow on purpose (it sleeps 4 ms per sample), ends with a
smaller shard than the first, every rank takes the same number of steps, and every sample is
still visited exactly once per epoch.
"""

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gossipgrad

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
train_set = TensorDataset(torch.randn(512, 16), torch.randint(0, 4, (512,)))
slow = rank == world - 1


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if slow:
        time.sleep(0.004 * len(y))  # a rank on a slower machine
    return F.cross_entropy(logits, y)


# --8<-- [start:staleness]
model = gossipgrad.GossipDataParallel(nn.Linear(16, 4), max_staleness=2)
# --8<-- [end:staleness]
model.close()

model = gossipgrad.GossipDataParallel(nn.Linear(16, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
samples = steps = 0
# --8<-- [start:balance]
sampler = gossipgrad.GossipShuffleSampler(train_set, balance=True)
batches = sampler.batch_sampler(batch_size=16)  # the same number of batches on every rank
loader = DataLoader(train_set, batch_sampler=batches)
for epoch in range(4):
    batches.set_epoch(epoch)  # shards resized from last epoch's speeds
    for x, y in loader:
        began, waited = time.perf_counter(), model.wait_time_s
        loss = loss_fn(model(x), y) * batches.weight(len(y))  # weigh what this rank did
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        busy = time.perf_counter() - began - (model.wait_time_s - waited)
        sampler.report_speed(len(y), busy)  # samples per second of compute, measured
        # --8<-- [end:balance]
        samples += len(y)
        steps += 1
    shard = sampler.shard.tolist()
    assert samples == len(shard), "this rank visited its shard exactly once"
    everyone = [None] * world
    dist.all_gather_object(everyone, (shard, steps))
    assert sorted(i for s, _ in everyone for i in s) == list(range(len(train_set)))
    assert len({n for _, n in everyone}) == 1, "every rank took the same number of steps"
    sizes = [len(s) for s, _ in everyone]
    samples = steps = 0
sampler.flush()
model.close()
assert sizes[0] > sizes[-1], f"the slow rank's shard should have shrunk: {sizes}"
if rank == 0:
    print(f"shard sizes after 4 epochs, slow rank last: {sizes}")
dist.barrier()  # no rank tears its connections down while another still uses them
dist.destroy_process_group()
