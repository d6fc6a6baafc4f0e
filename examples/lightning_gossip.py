"""A LightningModule trained with gossip: the one change from DDP is the ``strategy`` argument.

    python examples/lightning_gossip.py --devices 2                      # CPU processes, gloo
    python examples/lightning_gossip.py --accelerator gpu --devices 8    # one GPU each, NCCL
    python examples/lightning_gossip.py --devices 2 --strategy ddp       # the same run with DDP
    python examples/lightning_gossip.py --devices 2 --max-steps 4

Lightning starts the processes itself (or runs under ``torchrun`` / SLURM). Needs
``pip install 'gossipgrad[lightning]'``. Checkpoints and logs go to ``--out`` (under runs/,
which git ignores); the checkpoints hold the replicas' exact average, ``fit`` ends with every
replica set to it, and ``trainer.test`` scores that one model. The data is a synthetic 10-class
problem made from a fixed seed (nothing is downloaded).
"""

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gossipgrad.lightning import GossipStrategy

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--accelerator", default="cpu", help="cpu, gpu, auto")
parser.add_argument("--devices", type=int, default=2, help="processes per node")
parser.add_argument("--num-nodes", type=int, default=1)
parser.add_argument("--strategy", choices=("gossip", "ddp"), default="gossip")
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps")
parser.add_argument("--batch-size", type=int, default=64, help="per process")
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--out", default="runs/lightning_gossip", help="checkpoints and logs")
args = parser.parse_args()


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, 32, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)
    return TensorDataset(x, y)


class Classifier(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)  # rank 0's
        return loss

    def on_train_batch_start(self, _batch: object, batch_idx: int) -> None:
        wrapper = self.trainer.strategy.model  # GossipDataParallel here (DDP with --strategy ddp)
        if batch_idx % 50 == 0 and hasattr(wrapper, "consensus_distance"):
            # a collective: every rank calls it here, at the same step (not in an epoch-end hook)
            self.log("consensus", wrapper.consensus_distance(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("test_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test_accuracy", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


model = Classifier(args.lr)
train_loader = DataLoader(make_data(16384, seed=0), batch_size=args.batch_size, shuffle=True)
test_loader = DataLoader(make_data(4096, seed=1), batch_size=512)

# --8<-- [start:trainer]
strategy = GossipStrategy() if args.strategy == "gossip" else "ddp"  # the one change from DDP
trainer = L.Trainer(
    accelerator=args.accelerator,  # "gpu": one process per GPU, NCCL
    devices=args.devices,  # processes per node: Lightning starts them (or torchrun, SLURM)
    num_nodes=args.num_nodes,
    strategy=strategy,
    max_epochs=args.epochs,
    max_steps=args.max_steps,
    default_root_dir=args.out,  # its checkpoints hold the replicas' exact average
)
trainer.fit(model, train_loader)  # ends with every replica set to the exact average
trainer.test(model, test_loader)  # so this scores that one model
# --8<-- [end:trainer]
if trainer.is_global_zero:
    print(f"checkpoint (the replicas' average): {trainer.checkpoint_callback.best_model_path}")
