"""A complete DDP-style training script with gossip in place of DDP, launched by torchrun:

    torchrun --standalone --nproc-per-node 4 examples/ddp_style.py
    torchrun --standalone --nproc-per-node 2 examples/ddp_style.py --max-steps 20 --out /tmp/ddp.pt

One process per GPU (NCCL, GPU ``LOCAL_RANK``) when CUDA is present, else CPU processes (gloo).
Each rank trains its own replica on its own shard (``GossipShuffleSampler``, which also moves a
quarter of each shard to the gossip partner every epoch); at the end the replicas are averaged
exactly (one all-reduce) and rank 0 scores and saves that one model. The data is a synthetic
10-class problem that every rank makes from the same seed (nothing is downloaded): put your
dataset in ``make_data``.
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gossipgrad

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=64, help="per rank")
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: none)")
parser.add_argument("--out", default="model.pt", help="where rank 0 saves the averaged model")
args = parser.parse_args()
if "LOCAL_RANK" not in os.environ:
    sys.exit(f"launch with torchrun, e.g.: torchrun --standalone --nproc-per-node 2 {sys.argv[0]}")

# --- one process per device ------------------------------------------------------------------
local_rank = int(os.environ["LOCAL_RANK"])
if torch.cuda.is_available():
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl")
else:
    device = torch.device("cpu")
    dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
log = print if rank == 0 else (lambda *a, **k: None)


# --- data: the same on every rank; the sampler gives each rank its shard ----------------------
def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, 32, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)
    return TensorDataset(x, y)


train_set, test_set = make_data(16384, seed=0), make_data(4096, seed=1)
sampler = gossipgrad.GossipShuffleSampler(train_set, shuffle_fraction=0.25, seed=0)
loader = DataLoader(
    train_set, batch_size=args.batch_size, sampler=sampler, pin_memory=device.type == "cuda"
)

# --- model: parameters broadcast from rank 0 when wrapped ------------------------------------
model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
model.append(nn.Linear(256, 10))
model = gossipgrad.GossipDataParallel(model.to(device))
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
log(f"{world} ranks on {device.type}, {len(loader)} steps per epoch, batch {args.batch_size}/rank")

# --- train: nothing in the loop differs from DDP ---------------------------------------------
step, t0 = 0, time.perf_counter()
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)  # finishes last epoch's sample exchange, starts this one's
    loss_sum = torch.zeros(2, device=device)  # sum of losses, batches
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += torch.stack([loss.detach(), torch.ones((), device=device)])
        step += 1
        if step == args.max_steps:
            break
    dist.all_reduce(loss_sum)  # collectives: every rank calls them, rank 0 prints
    distance = model.consensus_distance()
    mean_loss = (loss_sum[0] / loss_sum[1]).item()
    elapsed = time.perf_counter() - t0
    log(f"epoch {epoch}: loss {mean_loss:.4f}, consensus distance {distance:.2e}, {elapsed:.1f} s")
    if step == args.max_steps:
        break

# --- one model: the replicas' exact average, scored and saved by rank 0 ----------------------
sampler.flush()
model.average_replicas()
if rank == 0:
    model.eval()
    with torch.no_grad():
        x, y = test_set.tensors[0].to(device), test_set.tensors[1].to(device)
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    torch.save(model.module.state_dict(), args.out)
    log(f"test accuracy {accuracy:.2%} (averaged model), saved to {args.out}")
dist.destroy_process_group()
