"""The choice sets of ``gossipgrad train``'s own options (the engine's are in
``gossipgrad.options``), without importing torch: ``--help``, ``--version`` and every option
error answer before torch is loaded. ``gossipgrad.train.data`` and ``gossipgrad.train.models``
build what ``DATASETS`` and ``MODELS`` name.
"""

from __future__ import annotations

from gossipgrad.options import ALGOS as ENGINE_ALGOS

# local worker processes that `gossipgrad train` starts (each a Python process with torch); more
# ranks run on several machines under torchrun, which ignores --nproc
MAX_NPROC = 1024
DATASETS: tuple[str, ...] = ("digits", "pytext", "synthetic-imagenet")
MODELS: tuple[str, ...] = (
    "mlp",
    "cnn",
    "resnet20",
    "resnet56",
    "resnet18",
    "resnet50",
    "gpt",
    "wide-mlp",
)
ALGOS: tuple[str, ...] = (*ENGINE_ALGOS, "both")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step")  # gossipgrad.train.recipe
AMP: tuple[str, ...] = ("none", "bf16", "fp16")
