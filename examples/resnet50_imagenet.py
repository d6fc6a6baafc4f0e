"""ResNet-50 on ImageNet with gossip, for GPU clusters: SGD with momentum at 0.1 per 256 images
scaled linearly with the global batch and 5 warmup epochs (Goyal et al. 2017), then cosine decay,
label smoothing 0.1 and no weight decay on BatchNorm and biases (He et al. 2019, "Bag of Tricks"),
bf16 autocast and channels-last on GPUs.

    # 4 nodes x 8 GPUs; ImageNet in the ImageFolder layout: DIR/train/<class>/*.JPEG, DIR/val/...
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --rdzv-id resnet50 examples/resnet50_imagenet.py --data /datasets/imagenet --batch-size 64

    # a few steps on random images, on CPU, with neither a dataset nor torchvision:
    torchrun --standalone --nproc-per-node 2 examples/resnet50_imagenet.py --max-steps 2 \\
        --image-size 32 --batch-size 2 --synthetic-images 16 --workers 0

Every epoch the replicas' exact average is written into a scratch copy (the replicas train on
undisturbed), scored on the validation set (with ``--data``: random images have nothing to
score) and saved by rank 0 to ``--out`` (under runs/, which git ignores). ``--data`` needs
torchvision (``pip install 'gossipgrad[vision]'``); without torchvision the ResNet-50 is
``gossipgrad.train.models``' own (``pip install 'gossipgrad[train]'``).
"""

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import gossipgrad

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--data", help="ImageFolder root with train/ and val/ (default: random images)")
parser.add_argument("--epochs", type=int, default=90)
parser.add_argument("--batch-size", type=int, default=64, help="per GPU")
parser.add_argument("--base-lr", type=float, default=0.1, help="per 256 images")
parser.add_argument("--warmup-epochs", type=float, default=5)
parser.add_argument("--weight-decay", type=float, default=1e-4)
parser.add_argument("--label-smoothing", type=float, default=0.1)
parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                    help="autocast dtype; auto: bf16 on GPUs with it, none on CPU")  # fmt: skip
parser.add_argument("--wire-dtype", choices=("none", "bfloat16"), default="none",
                    help="the gossip payload's dtype (bfloat16: half the bytes)")  # fmt: skip
parser.add_argument("--image-size", type=int, default=224)
parser.add_argument("--workers", type=int, default=8, help="data-loading processes per GPU")
parser.add_argument("--synthetic-images", type=int, default=12800, help="without --data")
parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: none)")
parser.add_argument("--log-every", type=int, default=50)
parser.add_argument("--out", default="runs/resnet50/model.pt", help="rank 0's averaged model")
args = parser.parse_args()
if "LOCAL_RANK" not in os.environ:
    sys.exit(f"launch with torchrun: torchrun --standalone --nproc-per-node 2 {sys.argv[0]}")

# --- one process per GPU (or CPU processes with gloo) ----------------------------------------
local_rank = int(os.environ["LOCAL_RANK"])
if torch.cuda.is_available():
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    dist.init_process_group("nccl")
else:
    device = torch.device("cpu")
    dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
log = print if rank == 0 else (lambda *a, **k: None)
amp = args.amp
if amp == "auto":
    amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
if amp == "fp16" and device.type != "cuda":
    sys.exit("--amp fp16 needs CUDA (its gradient scaler); on CPU use --amp bf16 or none")
amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")  # fp16 only


# --- data: ImageFolder, or random images of the same shape -----------------------------------
class RandomImages(Dataset):
    """``n`` random images (the same on every rank: seeded by index) and 1000 classes."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size, self.classes = n, size, [str(c) for c in range(1000)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.size, self.size, generator=g), i % 1000


def image_folders(root: str, size: int) -> tuple[Dataset, Dataset]:
    try:
        from torchvision import datasets
        from torchvision import transforms as T
    except ImportError:
        sys.exit("--data needs torchvision: pip install 'gossipgrad[vision]'")
    normalize = T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()])
    val_tf = T.Compose([T.Resize(size * 8 // 7), T.CenterCrop(size), T.ToTensor()])
    train = datasets.ImageFolder(os.path.join(root, "train"), T.Compose([train_tf, normalize]))
    val = datasets.ImageFolder(os.path.join(root, "val"), T.Compose([val_tf, normalize]))
    return train, val


if args.data:
    train_set, val_set = image_folders(args.data, args.image_size)
else:
    n, size = args.synthetic_images, args.image_size
    train_set, val_set = RandomImages(n, size), RandomImages(max(n // 10, 1), size)
sampler = gossipgrad.GossipShuffleSampler(train_set, seed=0, drop_last=True)
loader_options = dict(
    num_workers=args.workers,
    pin_memory=device.type == "cuda",
    persistent_workers=args.workers > 0,
)
train_loader = DataLoader(
    train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True, **loader_options
)
val_share = Subset(val_set, range(rank, len(val_set), world))  # each rank scores its share
val_loader = DataLoader(val_share, batch_size=2 * args.batch_size, **loader_options)


# --- model: torchvision's ResNet-50 if installed, else gossipgrad.train.models' ---------------
def resnet50(num_classes: int) -> nn.Module:
    try:
        from torchvision.models import resnet50 as torchvision_resnet50
    except ImportError:
        from gossipgrad.train.data import DatasetInfo
        from gossipgrad.train.models import build_model

        info = DatasetInfo("imagenet", "classification", (3, 224, 224), num_classes)
        return build_model("resnet50", info)
    return torchvision_resnet50(num_classes=num_classes, zero_init_residual=True)


torch.manual_seed(0)
module = resnet50(len(train_set.classes)).to(device, memory_format=torch.channels_last)
averaged = copy.deepcopy(module)  # scratch for the replicas' average (copied before wrapping)
wire_dtype = torch.bfloat16 if args.wire_dtype == "bfloat16" else None
model = gossipgrad.GossipDataParallel(module, wire_dtype=wire_dtype)  # rank 0's weights

decay = [p for p in module.parameters() if p.ndim > 1]  # conv and linear weights
no_decay = [p for p in module.parameters() if p.ndim <= 1]  # BatchNorm and biases
global_batch = args.batch_size * world
peak_lr = args.base_lr * global_batch / 256
optimizer = torch.optim.SGD(
    [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay}],
    lr=peak_lr,
    momentum=0.9,
    weight_decay=0.0,
)
criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

steps_per_epoch = len(train_loader)
total_steps = args.epochs * steps_per_epoch
warmup_steps = int(args.warmup_epochs * steps_per_epoch)


def lr_at(step: int) -> float:
    """Linear warmup to ``peak_lr``, then cosine decay to 0."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * peak_lr * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(net: nn.Module) -> float:
    """Top-1 accuracy over the whole validation set (collective)."""
    net.eval()
    counts = torch.zeros(2, device=device)  # correct, seen
    for x, y in val_loader:
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast:
            hits = (net(x).argmax(1) == y).sum()
        counts += torch.stack([hits.float(), torch.tensor(float(y.numel()), device=device)])
    dist.all_reduce(counts)
    return (counts[0] / counts[1].clamp(min=1)).item()


log(
    f"ResNet-50, {world} ranks on {device.type}, global batch {global_batch}, peak lr "
    f"{peak_lr:.3f}, amp {amp}, {steps_per_epoch} steps per epoch, data: {args.data or 'random'}"
)

# --- train -------------------------------------------------------------------------------------
step, t0, done = 0, time.perf_counter(), False
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    model.train()
    for x, y in train_loader:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast:
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        done = step == args.max_steps
        if step % args.log_every == 0 or done:
            rate = step * global_batch / (time.perf_counter() - t0)
            log(f"step {step}: loss {loss.item():.3f}, lr {lr_at(step - 1):.4f}, {rate:,.0f} img/s")
        if done:
            break
    model.average_replicas(into=averaged)  # collective; the replicas are left as they are
    elapsed = time.perf_counter() - t0
    if args.data:
        log(f"epoch {epoch}: top-1 {evaluate(averaged):.2%} (averaged model), {elapsed:.0f} s")
    else:  # random labels: any score would mean nothing
        log(f"epoch {epoch}: random images, no accuracy to report, {elapsed:.0f} s")
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        torch.save(averaged.state_dict(), args.out)
    if done:
        break

sampler.flush()
model.close()  # completes the exchange still in flight (collective) and removes the hooks
log(f"saved the averaged model to {args.out}")
dist.destroy_process_group()
