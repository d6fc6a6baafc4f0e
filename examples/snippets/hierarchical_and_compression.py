"""The hierarchical-and-compression guide's snippets: compressed payloads and the hierarchical
wrapper.

    torchrun --standalone --nproc-per-node 2 examples/snippets/hierarchical_and_compression.py

Runs on CPU (gloo) in a few seconds, writes nothing, and asserts what the guide says: bfloat16
halves the bytes a step sends, int8 sends about 3.9 times fewer, and the replicas' average stays
exact whatever the wire dtype.
"""

import torch
import torch.distributed as dist
from torch import nn

import gossipgrad


def bytes_per_step(model: nn.Module) -> int:
    """Train a few steps with the options given; return the bytes of the last step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        model(torch.randn(16, 256)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.bytes_sent_last_step


def mean_is_kept(wire_dtype: torch.dtype) -> None:
    """Mixing with a rounded payload still keeps the replicas' mean (lr 0: only mixing moves
    the replicas)."""
    torch.manual_seed(dist.get_rank())  # different replicas on purpose
    module = nn.Linear(256, 256)
    before, after = nn.Linear(256, 256), nn.Linear(256, 256)
    with gossipgrad.GossipDataParallel(module, init_sync=False, wire_dtype=wire_dtype) as model:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        model.average_replicas(into=before)
        for _ in range(3):
            model(torch.randn(4, 256)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        model.average_replicas(into=after)
    for a, b in zip(before.parameters(), after.parameters(), strict=True):
        torch.testing.assert_close(a, b)


dist.init_process_group("gloo")
torch.manual_seed(0)
sent = {}
for name, wire_dtype in (("float32", None), ("bfloat16", torch.bfloat16), ("int8", torch.int8)):
    # --8<-- [start:wire]
    module = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model = gossipgrad.GossipDataParallel(module, wire_dtype=wire_dtype)  # e.g. torch.bfloat16
    # --8<-- [end:wire]
    sent[name] = bytes_per_step(model)
    model.close()
assert sent["bfloat16"] * 2 == sent["float32"], sent
assert 3.8 < sent["float32"] / sent["int8"] < 4.0, sent
for wire_dtype in (torch.bfloat16, torch.int8):
    mean_is_kept(wire_dtype)

# --8<-- [start:hierarchical]
module = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
model = gossipgrad.HierarchicalDataParallel(
    module,
    ranks_per_node=1,  # to emulate nodes on one machine; under torchrun leave it out
    wire_dtype=torch.bfloat16,  # any GossipOptions field, for the gossip between nodes
)
# --8<-- [end:hierarchical]
bytes_per_step(model)
model.average_replicas()
model.close()
if dist.get_rank() == 0:
    print("bytes per step:", sent, "- the average stays exact with bfloat16 and int8")
dist.destroy_process_group()
