"""The outer optimizer guide's snippet: gossip with DiLoCo's outer step on each pair.

    torchrun --standalone --nproc-per-node 2 examples/snippets/outer_optimizer.py

Runs on CPU (gloo) in a few seconds, writes nothing, and asserts what the guide says: the
replicas train with AdamW inside, exchange every 8 steps with an outer Nesterov step, and end
bit-identical after ``average_replicas()``.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import gossipgrad

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same initial model on every rank
module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
torch.manual_seed(1 + rank)  # each rank its own data

# --8<-- [start:outer]
model = gossipgrad.GossipDataParallel(
    module,
    gossip_every=8,  # H local steps between exchanges, as DiLoCo's H
    outer_lr=0.7,  # DiLoCo's outer Nesterov step
    outer_momentum=0.9,
    sync=True,  # the outer step right after the H local steps (DiLoCo's timing)
)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # the inner optimizer
# --8<-- [end:outer]
for _ in range(32):
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()  # every 8th step ends with an exchange and an outer step
    optimizer.zero_grad()
model.average_replicas()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
everyone = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(everyone, flat)
assert all(torch.equal(everyone[0], other) for other in everyone), "replicas differ"
model.close()
dist.barrier()  # no rank tears its connections down while another still uses them
dist.destroy_process_group()
