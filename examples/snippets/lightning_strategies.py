"""The Lightning guide's snippets: ``GossipStrategy`` for ``Trainer``, ``GossipFabricStrategy``
for ``Fabric``.

    torchrun --standalone --nproc-per-node 2 examples/snippets/lightning_strategies.py

Lightning starts its own processes when run with ``python``; under ``torchrun`` (as here) it uses
torchrun's. Runs on CPU (gloo) in a few seconds, writes only under a temporary folder (removed at
the end), and asserts what the guide says: ``fit`` ends with one model on every rank, and a saved
checkpoint holds it.
"""

import shutil
import tempfile
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gossipgrad.lightning import GossipFabricStrategy, GossipStrategy


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    # --8<-- [start:consensus]
    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        wrapper = self.trainer.strategy.model  # the GossipDataParallel, inside fit
        if batch_idx % 4 == 0:  # a collective: every rank, at the same step
            self.log("consensus", wrapper.consensus_distance())

    # --8<-- [end:consensus]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def same_on_every_rank(module: nn.Module) -> bool:
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(everyone[0], theirs) for theirs in everyone)


data = TensorDataset(torch.randn(512, 16), torch.randint(0, 4, (512,)))
root = Path(tempfile.mkdtemp())  # each rank its own; checkpoints go through rank 0's

# --8<-- [start:trainer]
model = Classifier()
trainer = L.Trainer(
    accelerator="cpu",
    devices=2,
    strategy=GossipStrategy(),  # was: strategy="ddp"
    max_epochs=2,
    default_root_dir=root,
)
trainer.fit(model, DataLoader(data, batch_size=32))  # Lightning adds a DistributedSampler
trainer.save_checkpoint(root / "last.ckpt")  # the replicas' exact average
# --8<-- [end:trainer]
assert same_on_every_rank(model), "fit ends with one model on every rank"
saved = (
    torch.load(root / "last.ckpt", weights_only=True)["state_dict"]
    if trainer.is_global_zero
    else {}
)
for name, tensor in saved.items():
    assert torch.equal(tensor, model.state_dict()[name]), name

# --8<-- [start:fabric]
fabric = L.Fabric(accelerator="cpu", devices=2, strategy=GossipFabricStrategy(sync=True))
fabric.launch()
module = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
module, optimizer = fabric.setup(module, optimizer)  # GossipDataParallel inside
loader = fabric.setup_dataloaders(DataLoader(data, batch_size=32))
for x, y in loader:
    fabric.backward(F.cross_entropy(module(x), y))
    optimizer.step()  # the partner's replica is mixed in here
    optimizer.zero_grad()
fabric.save(root / "fabric.ckpt", {"model": module, "optimizer": optimizer})  # the average
fabric.strategy.teardown()  # every rank: completes the last exchange, removes the hooks
# --8<-- [end:fabric]
assert same_on_every_rank(module), "fabric.save averaged the replicas"
if fabric.global_rank == 0:
    print("Trainer and Fabric: every rank ends with the same model")
shutil.rmtree(root)
