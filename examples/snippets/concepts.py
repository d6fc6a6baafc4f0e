"""The concepts guide's snippets: what one gossip step does, the schedules, the shuffle.

    torchrun --standalone --nproc-per-node 2 examples/snippets/concepts.py

Runs on CPU (gloo) in a few seconds, writes nothing, and asserts what the guide says: mixing
keeps the replicas' mean, a schedule spreads every update to every rank within ceil(log2 p)
steps, and the shuffle keeps the shards disjoint while samples move between ranks.
"""

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gossipgrad

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(rank)  # a different replica on every rank, on purpose

# --8<-- [start:mixing]
module = nn.Linear(8, 2)  # a different replica on every rank
model = gossipgrad.GossipDataParallel(module, init_sync=False)  # keep them different
optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # steps that change nothing locally

mean_before = nn.Linear(8, 2)
model.average_replicas(into=mean_before)  # the replicas' exact mean, replicas untouched
distance_before = model.consensus_distance()
for _ in range(3):
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()  # the partner's replica is mixed in here, the new one sent
    optimizer.zero_grad()
mean_after = nn.Linear(8, 2)
model.average_replicas(into=mean_after)
distance_after = model.consensus_distance()
# --8<-- [end:mixing]
model.close()
for a, b in zip(mean_before.parameters(), mean_after.parameters(), strict=True):
    torch.testing.assert_close(a, b)  # mixing moved the replicas, not their mean
assert distance_after < distance_before / 2, (distance_before, distance_after)
if rank == 0:
    print(f"consensus distance {distance_before:.3f} -> {distance_after:.2e}, mean unchanged")

# --8<-- [start:schedule]
p = 12
length = math.ceil(math.log2(p))  # 4 steps per round at p = 12
heard = [{r} for r in range(p)]  # whose updates have reached each rank
value = [float(r) for r in range(p)]  # a scalar "replica" per rank
for step in range(length):
    plan = [gossipgrad.plan(r, step, p) for r in range(p)]  # pure: no communication
    heard = [heard[r] | heard[plan[r].recv_from] for r in range(p)]
    value = [value[r] + plan[r].weight * (value[plan[r].recv_from] - value[r]) for r in range(p)]
assert all(len(h) == p for h in heard)  # every update reached every rank in one round
assert math.isclose(sum(value) / p, (p - 1) / 2)  # and the mean never moved
# --8<-- [end:schedule]
if rank == 0:
    sends = [gossipgrad.partners(r, 0, p)[0] for r in range(p)]
    print(f"at p = 12, step 0, rank r sends to {sends}[r]")

# --8<-- [start:shuffle]
data = TensorDataset(torch.randn(256, 8), torch.randint(0, 2, (256,)))
sampler = gossipgrad.GossipShuffleSampler(data, shuffle_fraction=0.25)
loader = DataLoader(data, batch_size=16, sampler=sampler)
model = gossipgrad.GossipDataParallel(nn.Linear(8, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for epoch in range(3):
    sampler.set_epoch(epoch)  # completes last epoch's exchange, posts this one's
    for x, y in loader:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
sampler.flush()  # before destroy_process_group
# --8<-- [end:shuffle]
model.close()
shards = [None] * world
dist.all_gather_object(shards, sampler.shard.tolist())
every = sorted(i for shard in shards for i in shard)
assert every == list(range(len(data))), "the shards stay disjoint and cover the dataset"
assert any(i % world != rank for i in sampler.shard.tolist()), "samples moved between ranks"
if rank == 0:
    print(f"shuffle: {sampler.exchange_count} ids per epoch to the partner; shards still disjoint")
dist.destroy_process_group()
