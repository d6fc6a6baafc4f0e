"""The migrating-from-DDP guide's checkpoint snippets: export one model mid-run, and save every
replica to resume exactly.

    torchrun --standalone --nproc-per-node 2 examples/snippets/checkpoints.py

Runs on CPU (gloo) in a few seconds, writes only under a temporary folder (removed at the end),
and asserts what the guide says: exporting the average leaves the replicas as they were, and a
run saved at step 6 and resumed in fresh objects ends bit for bit where an uninterrupted run
ends.
"""

import copy
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gossipgrad
import gossipgrad.checkpoint

dist.init_process_group("gloo")
rank = dist.get_rank()
shared = [tempfile.mkdtemp() if rank == 0 else None]
dist.broadcast_object_list(shared)  # one folder that every rank sees
folder = Path(shared[0])
train_set = TensorDataset(torch.randn(256, 16), torch.randint(0, 4, (256,)))


def build() -> tuple[gossipgrad.GossipDataParallel, torch.optim.Optimizer, DataLoader]:
    torch.manual_seed(0)
    model = gossipgrad.GossipDataParallel(nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sampler = gossipgrad.GossipShuffleSampler(train_set, seed=0)
    return model, optimizer, DataLoader(train_set, batch_size=16, sampler=sampler)


def train(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, steps: int
) -> None:
    batches = iter(loader)  # an epoch is 8 steps per rank: enough here
    for _ in range(steps):
        x, y = next(batches)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


# The reference: 8 steps without interruption.
model, optimizer, loader = build()
loader.sampler.set_epoch(0)
train(model, optimizer, loader, 8)
reference = copy.deepcopy(model.module.state_dict())
model.close()
loader.sampler.flush()

# 6 steps, a checkpoint, then 2 steps in fresh objects loaded from it.
model, optimizer, loader = build()
sampler = loader.sampler
sampler.set_epoch(0)
train(model, optimizer, loader, 6)
step = 6

# --8<-- [start:export]
export = copy.deepcopy(model.module)  # a scratch module of the same architecture
model.average_replicas(into=export)  # collective: every rank calls it; replicas unchanged
if rank == 0:
    torch.save(export.state_dict(), folder / f"model-{step}.pt")
# --8<-- [end:export]

# --8<-- [start:save]
state = {
    "model": model.module.state_dict(),  # this rank's own replica
    "optimizer": optimizer.state_dict(),  # this rank's own momentum
    "gossip": model.gossip_state(),  # the step, the schedule, the exchange in flight
    "sampler": sampler.state_dict(),  # this rank's shard and position
}
path = gossipgrad.checkpoint.save(folder / "checkpoints", step, state)  # collective
# --8<-- [end:save]
model.close()
sampler.flush()

model, optimizer, loader = build()
sampler = loader.sampler
# --8<-- [start:load]
state = gossipgrad.checkpoint.load(path)  # collective: each rank gets its own state back
model.module.load_state_dict(state["model"])
optimizer.load_state_dict(state["optimizer"])
model.load_gossip_state(state["gossip"])
sampler.load_state_dict(state["sampler"])
# --8<-- [end:load]
train(model, optimizer, loader, 2)  # the sampler continues after the samples already seen
for name, tensor in model.module.state_dict().items():
    assert torch.equal(tensor, reference[name]), f"{name} differs after resuming"
model.close()
sampler.flush()

saved = torch.load(folder / "model-6.pt", weights_only=True) if rank == 0 else None
dist.barrier()
if rank == 0:
    assert sorted(saved) == ["bias", "weight"]
    shutil.rmtree(folder)
    print("resumed at step 6: every replica equals the uninterrupted run's, bit for bit")
dist.destroy_process_group()
