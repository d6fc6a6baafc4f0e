"""The migrating-from-DDP guide's snippets: a DDP loop with gossip, either sampler, clipping,
uneven inputs, and the end of a run.

    torchrun --standalone --nproc-per-node 2 examples/snippets/migrating_from_ddp.py

Runs on CPU (gloo) in a few seconds, writes only under a temporary folder, and asserts what the
guide says: `.grad` holds each rank's own gradient, and after `average_replicas()` every rank
holds the same model, also when the ranks ran different numbers of steps inside `model.join()`.
"""

import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gossipgrad

EPOCHS = 2


def same_on_every_rank(tensors: list[torch.Tensor]) -> bool:
    flat = torch.cat([t.detach().flatten() for t in tensors])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(everyone[0], theirs) for theirs in everyone)


def train(use_gossip_sampler: bool, out: Path) -> None:
    torch.manual_seed(0)
    train_set = TensorDataset(torch.randn(512, 16), torch.randint(0, 4, (512,)))
    # --8<-- [start:wrap]
    module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = gossipgrad.GossipDataParallel(module)  # was: DistributedDataParallel(module)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # --8<-- [end:wrap]
    # --8<-- [start:sampler]
    if use_gossip_sampler:  # shards stay put; a quarter moves to the partner each epoch
        sampler = gossipgrad.GossipShuffleSampler(train_set, shuffle_fraction=0.25)
    else:  # torch's own: a global reshuffle each epoch
        sampler = DistributedSampler(train_set)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler)
    # --8<-- [end:sampler]
    # --8<-- [start:loop]
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()  # .grad: this rank's own gradient, not the average
            model.clip_grad_norm_(1.0)  # clips as DDP's clip_grad_norm_ does (see below)
            optimizer.step()  # the partner's replica is mixed in here
            optimizer.zero_grad()
    # --8<-- [end:loop]
    # --8<-- [start:end]
    if isinstance(sampler, gossipgrad.GossipShuffleSampler):
        sampler.flush()  # its last exchange; DistributedSampler has nothing in flight
    model.average_replicas()  # collective: every rank now holds the exact mean
    if dist.get_rank() == 0:  # one model, the same on every rank
        torch.save(model.module.state_dict(), out / "model.pt")
    model.close()  # completes the last exchange, removes every hook
    # --8<-- [end:end]
    assert same_on_every_rank(list(module.state_dict().values()))


def local_gradients() -> None:
    torch.manual_seed(0)
    module = nn.Linear(16, 4)
    with gossipgrad.GossipDataParallel(module) as model:
        x = torch.randn(8, 16) + dist.get_rank()  # each rank its own batch
        model(x).square().mean().backward()
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert not same_on_every_rank(grads), ".grad is each rank's own gradient"
        module.zero_grad()


def uneven_inputs() -> None:
    torch.manual_seed(0)
    module = nn.Linear(16, 4)
    batches = [torch.randn(8, 16) for _ in range(4 + 3 * dist.get_rank())]  # 4 and 7 steps
    # --8<-- [start:join]
    with gossipgrad.GossipDataParallel(module) as model:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        with model.join():  # a rank out of data keeps answering its partners
            for x in batches:  # a different number of batches on each rank
                model(x).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
        model.average_replicas()  # then every rank holds the same model
    # --8<-- [end:join]
    assert same_on_every_rank(list(module.state_dict().values()))


dist.init_process_group("gloo")
with tempfile.TemporaryDirectory() as folder:  # each rank its own; only rank 0 writes
    train(use_gossip_sampler=True, out=Path(folder))
    train(use_gossip_sampler=False, out=Path(folder))
    if dist.get_rank() == 0:
        saved = torch.load(Path(folder) / "model.pt", weights_only=True)
        assert sorted(saved) == ["0.bias", "0.weight", "2.bias", "2.weight"]
local_gradients()
uneven_inputs()
if dist.get_rank() == 0:
    print("both samplers, local gradients, uneven inputs: every rank ends with the same model")
dist.destroy_process_group()
