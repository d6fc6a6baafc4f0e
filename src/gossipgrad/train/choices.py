"""The choice sets and engine defaults that ``gossipgrad train``'s options offer, without importing
torch: ``--help``, ``--version`` and every option error answer before torch is loaded.

The engine's own definitions (``gossipgrad.engines.ALGOS``, ``gossipgrad.schedule.SCHEDULES``,
``gossipgrad.options``) stay the reference: tests/train/test_config.py checks that every set and
default here equals the engine's, so a change there that is not made here fails CI.
"""

from __future__ import annotations

# --- the engine's (gossipgrad.engines, gossipgrad.schedule, gossipgrad.options) -----------------
ENGINE_ALGOS: tuple[str, ...] = ("gossip", "allreduce", "hierarchical")
SCHEDULES: tuple[str, ...] = ("dissemination", "dissemination-fixed", "hypercube", "ring", "exact")
MODES: tuple[str, ...] = ("params", "gradients")
ON_NONFINITE: tuple[str, ...] = ("raise", "skip")
WIRE: tuple[str, ...] = ("none", "bfloat16", "float16", "int8")  # options.WIRE_DTYPES
MAX_STREAMS = 16
MAX_STALENESS = 1024  # options.MAX_STALENESS: max_staleness stays below it
# GossipOptions() field by field (timeout in seconds, wire dtype by name)
ENGINE_DEFAULTS: dict[str, object] = {
    "sync": False,
    "mode": "params",
    "schedule": "dissemination",
    "bucket_cap_mb": 25.0,
    "timeout_s": 300.0,
    "on_nonfinite": "raise",
    "wire_dtype": "none",
    "streams": 1,
    "gossip_every": 1,
    "average_every": 0,
    "tracking": False,
    "max_staleness": 0,
}

# --- the job's (gossipgrad.train.data, gossipgrad.train.models) ---------------------------------
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
