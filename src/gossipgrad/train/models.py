"""The model zoo for ``gossipgrad train``, built from a dataset's ``DatasetInfo``.

    model = build_model("resnet20", info)            # or build_model(default_model(info), info)
    model = build_model("gpt", info, n_layer=2)      # options are the builder's keyword arguments
    model = load_user_model("my_module:make", info)  # make(info) or make() -> nn.Module
    loss = task_loss(model(x), y)                    # cross-entropy for both tasks

Classification models take ``[B, *info.input_shape]`` floats and return ``[B, num_classes]``;
``gpt`` takes ``[B, T]`` token ids (``T <= block_size``) and returns ``[B, T, vocab]`` logits.
All are plain torch (no torchvision), randomly initialised (deterministic under
``torch.manual_seed``), nothing downloaded:

- ``mlp``: flatten -> hidden -> classes. ``wide-mlp``: flatten -> 4096 -> 4096 -> 4096 -> classes
  (~34M parameters and few FLOPs: the communication-heavy case; images wider than 32 pixels are
  average-pooled to 32x32 first so the size does not explode).
- ``cnn``: four 3x3 conv-BatchNorm-ReLU layers, two max-pools, global average pooling.
- ``resnet20``/``resnet56``: CIFAR ResNets of He et al. 2016 (3 stages of 16/32/64 channels,
  parameter-free "option A" shortcuts; 0.27M / 0.86M parameters).
- ``resnet18``/``resnet50``: the ImageNet ResNets (11.7M / 25.6M parameters at 1000 classes).
- ``gpt``: a small decoder-only transformer (pre-norm, causal self-attention, learned positions).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gossipgrad.train.choices import MODELS
from gossipgrad.train.data import DatasetInfo
from gossipgrad.train.plugins import check_options, import_callable


def build_model(name: str, info: DatasetInfo, **options: object) -> nn.Module:
    """A fresh model ``name`` for data described by ``info`` (``"module:function"`` is passed to
    ``load_user_model``). Raises ValueError for an unknown name or option, or a model that does
    not fit the task."""
    if ":" in name:
        if options:
            raise ValueError(f"model options {sorted(options)} apply to built-in models only")
        return load_user_model(name, info)
    if name not in _ZOO:
        raise ValueError(
            f"unknown model {name!r}; choose one of {', '.join(MODELS)}, "
            "or give your own as 'module:function'"
        )
    entry = _ZOO[name]
    if info.task != entry.task:
        fits = [m for m in MODELS if _fits(m, info)]
        raise ValueError(
            f"model {name!r} is for {entry.task} data, but dataset {info.name!r} is {info.task}; "
            f"choose one of {', '.join(fits)}"
        )
    if entry.images and len(info.input_shape) != 3:
        fits = [m for m in MODELS if _fits(m, info)]
        raise ValueError(
            f"model {name!r} needs images (channels, height, width), but dataset {info.name!r} "
            f"has input shape {info.input_shape}; choose one of {', '.join(fits)}"
        )
    check_options(entry.build, dict(options), f"model {name!r}")
    return entry.build(info, **options)


def default_model(info: DatasetInfo) -> str:
    """A sensible model for ``info``: gpt for text, mlp for small inputs (digits), resnet20 for
    CIFAR-sized images, resnet18 for larger images."""
    if info.task == "lm":
        return "gpt"
    if len(info.input_shape) == 3 and math.prod(info.input_shape) > 1024:
        return "resnet18" if min(info.input_shape[1:]) >= 64 else "resnet20"
    return "mlp"


def load_user_model(spec: str, info: DatasetInfo) -> nn.Module:
    """The module returned by the function named by ``spec`` (``"module:function"`` or
    ``"path/file.py:function"``), called as ``function(info)`` or, if it takes no parameter,
    ``function()``."""
    fn = import_callable(spec, "model")
    try:
        takes_info = bool(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        takes_info = True
    model = fn(info) if takes_info else fn()
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model function {spec!r} must return a torch.nn.Module, got {type(model).__name__}"
        )
    return model


def task_loss(
    output: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy (``--label-smoothing``); for ``lm`` output ``[B, T, V]`` against
    targets ``[B, T]``."""
    return F.cross_entropy(output.flatten(0, -2), target.flatten(), label_smoothing=label_smoothing)


# --- MLPs ---------------------------------------------------------------------------------------


def _mlp(info: DatasetInfo, *, hidden: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(info.input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, info.num_classes),
    )


def _wide_mlp(
    info: DatasetInfo, *, width: int = 4096, depth: int = 3, max_side: int = 32
) -> nn.Module:
    layers: list[nn.Module] = []
    shape = info.input_shape
    if len(shape) == 3 and max(shape[1:]) > max_side:
        shape = (shape[0], min(shape[1], max_side), min(shape[2], max_side))
        layers.append(nn.AdaptiveAvgPool2d(shape[1:]))
    layers.append(nn.Flatten())
    features = math.prod(shape)
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, info.num_classes))
    return nn.Sequential(*layers)


# --- CNN ----------------------------------------------------------------------------------------


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


def _cnn(info: DatasetInfo, *, width: int = 32) -> nn.Module:
    channels, height, wide = info.input_shape
    if min(height, wide) < 4:
        raise ValueError(f"model 'cnn' needs images of at least 4x4, got {height}x{wide}")
    return nn.Sequential(
        *_conv_bn(channels, width),
        *_conv_bn(width, width),
        nn.MaxPool2d(2),
        *_conv_bn(width, 2 * width),
        *_conv_bn(2 * width, 2 * width),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, info.num_classes),
    )


# --- ResNets ------------------------------------------------------------------------------------


class _PadShortcut(nn.Module):
    """CIFAR ResNet "option A": subsample, then zero-pad the new channels (no parameters)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.pad))


def _projection(c_in: int, c_out: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class _Basic(nn.Module):
    """Two 3x3 convolutions and a shortcut (a projection, or CIFAR's zero padding)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, pad_shortcut: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(c_in, width, stride),
            nn.Conv2d(width, width, 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != width:
            make = _PadShortcut if pad_shortcut else _projection
            self.shortcut = make(c_in, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class _Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in torchvision's ResNet v1.5), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            *_conv_bn(width, width, stride),
            nn.Conv2d(width, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = _projection(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _init_resnet(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def _cifar_resnet(info: DatasetInfo, depth: int, in_channels: int | None) -> nn.Module:
    blocks = (depth - 2) // 6
    layers: list[nn.Module] = list(_conv_bn(in_channels or info.input_shape[0], 16))
    c_in = 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(blocks):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(_Basic(c_in, width, stride, pad_shortcut=True))
            c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, info.num_classes)]
    return _init_resnet(nn.Sequential(*layers))


def _resnet20(info: DatasetInfo, *, in_channels: int | None = None) -> nn.Module:
    return _cifar_resnet(info, 20, in_channels)


def _resnet56(info: DatasetInfo, *, in_channels: int | None = None) -> nn.Module:
    return _cifar_resnet(info, 56, in_channels)


def _imagenet_resnet(
    info: DatasetInfo, block: type[_Basic] | type[_Bottleneck], counts: tuple[int, ...]
) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(info.input_shape[0], 64, 7, 2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, padding=1),
    ]
    c_in = 64
    for stage, count in enumerate(counts):
        width = 64 * 2**stage
        for i in range(count):
            layers.append(block(c_in, width, 2 if stage > 0 and i == 0 else 1))
            c_in = width * block.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, info.num_classes)]
    return _init_resnet(nn.Sequential(*layers))


def _resnet18(info: DatasetInfo) -> nn.Module:
    return _imagenet_resnet(info, _Basic, (2, 2, 2, 2))


def _resnet50(info: DatasetInfo) -> nn.Module:
    return _imagenet_resnet(info, _Bottleneck, (3, 4, 6, 3))


# --- GPT ----------------------------------------------------------------------------------------


class _SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, time, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time, d_model))


class _TransformerBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = _SelfAttention(d_model, n_head, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token and position embeddings, ``n_layer`` pre-norm blocks, a linear head to the vocabulary
    (not tied to the embedding, so every parameter is a separate tensor)."""

    def __init__(
        self, vocab_size: int, block_size: int, n_layer: int, n_head: int, d_model: int, drop: float
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(drop)
        self.blocks = nn.ModuleList(
            _TransformerBlock(d_model, n_head, drop) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2 init; residual projections scaled down by depth
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        time = idx.shape[1]
        if time > self.block_size:
            raise ValueError(f"GPT got {time} tokens, more than its block_size {self.block_size}")
        x = self.tokens(idx) + self.positions(torch.arange(time, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _gpt(
    info: DatasetInfo,
    *,
    n_layer: int = 4,
    n_head: int = 4,
    d_model: int = 128,
    dropout: float = 0.0,
    block_size: int | None = None,
) -> nn.Module:
    block_size = block_size or info.input_shape[0]
    if d_model % n_head:
        raise ValueError(f"gpt: d_model ({d_model}) must be a multiple of n_head ({n_head})")
    if block_size < info.input_shape[0]:
        raise ValueError(f"gpt: block_size {block_size} < the data's {info.input_shape[0]}")
    return GPT(info.num_classes, block_size, n_layer, n_head, d_model, dropout)


# --- registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., nn.Module]
    task: str = "classification"
    images: bool = False  # needs (channels, height, width) inputs


_ZOO: dict[str, _Entry] = {
    "mlp": _Entry(_mlp),
    "cnn": _Entry(_cnn, images=True),
    "resnet20": _Entry(_resnet20, images=True),
    "resnet56": _Entry(_resnet56, images=True),
    "resnet18": _Entry(_resnet18, images=True),
    "resnet50": _Entry(_resnet50, images=True),
    "gpt": _Entry(_gpt, task="lm"),
    "wide-mlp": _Entry(_wide_mlp),
}


def _fits(name: str, info: DatasetInfo) -> bool:
    entry = _ZOO[name]
    return entry.task == info.task and (not entry.images or len(info.input_shape) == 3)
