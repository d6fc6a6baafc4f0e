"""A complete DDP-style torchrun script, with gossip in place of DDP.

    torchrun --standalone --nproc-per-node 4 examples/ddp_style.py
    torchrun --standalone --nproc-per-node 4 examples/ddp_style.py --sampler distributed
    torchrun --standalone --nproc-per-node 2 examples/ddp_style.py --max-steps 20

One process per GPU (NCCL) when CUDA is present, else CPU processes (gloo). The data is a
synthetic 10-class problem made from a fixed seed: put yours in make_data. Rank 0 saves the
replicas' exact average to --out (under runs/, which git ignores).
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gossipgrad

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: none)")
parser.add_argument("--sampler", choices=("gossip", "distributed"), default="gossip")
parser.add_argument("--out", default="runs/ddp_style/model.pt")
args = parser.parse_args()
if "LOCAL_RANK" not in os.environ:
    sys.exit(f"launch with torchrun, e.g.: torchrun --standalone --nproc-per-node 2 {sys.argv[0]}")


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, 32, generator=g)
    return TensorDataset(x, (x @ teacher + 0.5 * torch.randn(n, 10, generator=g)).argmax(1))


cuda = torch.cuda.is_available()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
dist.init_process_group("nccl" if cuda else "gloo")
rank = dist.get_rank()

train_set, test_set = make_data(16384, seed=0), make_data(4096, seed=1)
if args.sampler == "gossip":  # each rank keeps a shard and passes a quarter to its partner
    sampler = gossipgrad.GossipShuffleSampler(train_set, shuffle_fraction=0.25)
else:  # torch's: a global reshuffle every epoch
    sampler = DistributedSampler(train_set)
loader = DataLoader(train_set, batch_size=64, sampler=sampler)

model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
model = gossipgrad.GossipDataParallel(model)  # was DistributedDataParallel(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

step = 0
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    for x, y in loader:
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()  # .grad is this rank's own gradient (DDP's: the average over ranks)
        optimizer.step()  # the update, then the partner's replica is mixed in
        step += 1
        if step == args.max_steps:
            break
    distance = model.consensus_distance()  # a collective: every rank calls it
    if rank == 0:
        print(f"epoch {epoch}: last loss {loss.item():.4f}, consensus distance {distance:.2e}")
    if step == args.max_steps:
        break

if isinstance(sampler, gossipgrad.GossipShuffleSampler):
    sampler.flush()  # completes the last exchange of samples
model.average_replicas()  # one all-reduce: every replica is now the exact average
if rank == 0:
    with torch.no_grad():  # the plain module: rank 0 alone, no wrapper involved
        x, y = test_set.tensors
        accuracy = (model.module(x.to(device)).argmax(1) == y.to(device)).float().mean().item()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.module.state_dict(), args.out)
    print(f"test accuracy {accuracy:.2%} (the averaged model), saved to {args.out}")
dist.destroy_process_group()
