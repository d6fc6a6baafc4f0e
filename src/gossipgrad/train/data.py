"""Datasets for ``gossipgrad train``: three embedded ones, an image folder, and the user's own.

    train, test, info = load_dataset("digits", seed=0)
    train, test, info = load_dataset("pytext", block_size=64, max_bytes=2_000_000)
    train, test, info = load_dataset("synthetic-imagenet", image_size=224)
    train, test, info = load_dataset("imagefolder", root="path/to/images")   # needs torchvision
    train, test, info = load_user_dataset("my_module:my_function")         # or "file.py:fn"

Nothing is downloaded:

- ``digits``: scikit-learn's bundled handwritten digits (1797 images of 8x8, 10 classes),
  standardised with the training split's mean and std, stratified split from ``seed``.
- ``pytext``: next-byte prediction on the Python standard library's own ``.py`` sources, read in
  sorted path order up to ``max_bytes``; vocabulary = the 256 byte values; the last
  ``test_fraction`` of the text is the test split. Samples are ``(x, y)`` with ``y = x`` shifted
  by one position.
- ``synthetic-imagenet``: ImageNet-shaped random images with 1000 random labels, generated on
  access from ``(seed, split, index)``; for throughput runs (there is nothing to learn).

Every sample is ``(input, target)``. ``DatasetInfo`` tells a model builder what it gets.
"""

from __future__ import annotations

import inspect
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from gossipgrad.train.choices import DATASETS
from gossipgrad.train.plugins import check_options, import_callable

TASKS: tuple[str, ...] = ("classification", "lm")


@dataclass(frozen=True)
class DatasetInfo:
    """What one sample looks like: ``task`` is ``"classification"`` (target: a class index) or
    ``"lm"`` (input: ``input_shape[0]`` token ids, target: the same ids shifted by one);
    ``num_classes`` is the number of classes, or the vocabulary size for ``"lm"``."""

    name: str
    task: str
    input_shape: tuple[int, ...]
    num_classes: int

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"DatasetInfo.task must be one of {TASKS}, got {self.task!r}")
        shape = tuple(int(s) for s in self.input_shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"DatasetInfo.input_shape must be positive sizes, got {shape}")
        if self.task == "lm" and len(shape) != 1:
            raise ValueError(f"an 'lm' dataset's input_shape is (block_size,), got {shape}")
        if int(self.num_classes) < 1:
            raise ValueError(f"DatasetInfo.num_classes must be >= 1, got {self.num_classes}")
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "num_classes", int(self.num_classes))


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is missing; the message says which ``pip install`` fixes it."""


def load_dataset(
    name: str, *, seed: int = 0, **options: Any
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """``(train, test, info)`` for an embedded dataset, ``"imagefolder"``, or a
    ``"module:function"`` spec (then see ``load_user_dataset``; no options allowed)."""
    if ":" in name:
        if options:
            raise ValueError(f"dataset options {sorted(options)} apply to built-in datasets only")
        return load_user_dataset(name, seed=seed)
    loaders: dict[str, Callable[..., tuple[Dataset, Dataset, DatasetInfo]]] = {
        "digits": _digits,
        "pytext": _pytext,
        "synthetic-imagenet": _synthetic_imagenet,
        "imagefolder": _imagefolder,
    }
    if name not in loaders:
        raise ValueError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, 'imagefolder' "
            "(with root=PATH), or give your own as 'module:function'"
        )
    check_options(loaders[name], options, f"dataset {name!r}")
    return loaders[name](seed=seed, **options)


def targets_of(dataset: Any) -> torch.Tensor | None:
    """One integer label per sample when it is known without loading the samples, else None.
    Reads a ``targets`` attribute (torchvision style), TensorDataset, Subset and ConcatDataset."""
    labels: torch.Tensor | None = None
    if isinstance(dataset, Subset):
        base = targets_of(dataset.dataset)
        labels = None if base is None else base[torch.as_tensor(list(dataset.indices))]
    elif isinstance(dataset, ConcatDataset):
        parts = [targets_of(d) for d in dataset.datasets]
        known = [p for p in parts if p is not None]
        labels = torch.cat(known) if len(known) == len(parts) else None
    elif getattr(dataset, "targets", None) is not None:
        labels = torch.as_tensor(dataset.targets)
    elif isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
    if labels is None or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        return None
    return labels if len(labels) == len(dataset) else None


# --- digits -------------------------------------------------------------------------------------


def _digits(*, seed: int, test_fraction: float = 0.2) -> tuple[Dataset, Dataset, DatasetInfo]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    mean, std = x_train.mean(), x_train.std()

    def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        inputs = torch.as_tensor((x - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return TensorDataset(inputs, torch.as_tensor(y, dtype=torch.long))

    info = DatasetInfo("digits", "classification", (1, 8, 8), 10)
    return _tensors(x_train, y_train), _tensors(x_test, y_test), info


# --- pytext -------------------------------------------------------------------------------------

_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}


def stdlib_corpus(max_bytes: int = 2_000_000) -> bytes:
    """The first ``max_bytes`` of the standard library's ``.py`` sources, concatenated in sorted
    path order (deterministic for a given Python version; no third-party or test code)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in _python_files(root):
        if total >= max_bytes:
            break
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
    if not chunks:
        raise ValueError(f"pytext: no .py sources found under the standard library at {root}")
    return b"".join(chunks)[:max_bytes]


def _python_files(folder: Path) -> Iterator[Path]:
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.is_dir() and entry.name not in _SKIPPED_DIRS and not entry.is_symlink():
            yield from _python_files(entry)
        elif entry.suffix == ".py" and not entry.name.startswith("_sysconfigdata"):
            yield entry


class TokenBlocks(Dataset):
    """Windows of ``block_size`` ids every ``stride`` positions of ``tokens``; sample ``i`` is
    ``(tokens[s : s + block_size], tokens[s + 1 : s + block_size + 1])`` with ``s = i * stride``."""

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int) -> None:
        self.tokens, self.block_size, self.stride = tokens, block_size, stride

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - self.block_size - 1) // self.stride + 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        start = index * self.stride
        window = self.tokens[start : start + self.block_size + 1].long()
        return window[:-1], window[1:]


def _pytext(
    *,
    seed: int,
    block_size: int = 64,
    max_bytes: int = 2_000_000,
    stride: int | None = None,
    test_fraction: float = 0.1,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    del seed  # the corpus and its split are fixed; shuffling is the sampler's job
    stride = block_size if stride is None else stride
    if block_size < 1 or stride < 1:
        raise ValueError(f"pytext: block_size and stride must be >= 1, got {block_size}, {stride}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"pytext: test_fraction must be in (0, 1), got {test_fraction}")
    text = stdlib_corpus(max_bytes)
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    cut = int(len(tokens) * (1.0 - test_fraction))
    train = TokenBlocks(tokens[:cut], block_size, stride)
    test = TokenBlocks(tokens[cut:], block_size, stride)
    if len(test) == 0:
        raise ValueError(
            f"pytext: {len(text)} bytes give no test sample of block_size {block_size}; "
            "raise max_bytes or lower block_size"
        )
    return train, test, DatasetInfo("pytext", "lm", (block_size,), 256)


# --- synthetic-imagenet -------------------------------------------------------------------------


class SyntheticImages(Dataset):
    """``length`` random ``(channels, size, size)`` float images with labels in ``num_classes``;
    image ``i`` is drawn on access from a generator seeded by ``(seed, split, i)``."""

    def __init__(
        self, length: int, shape: tuple[int, ...], num_classes: int, seed: int, split: int
    ) -> None:
        self.shape, self.seed, self.split = shape, seed, split
        labels = torch.Generator().manual_seed(_mix(seed, split, -1))
        self.targets = torch.randint(num_classes, (length,), generator=labels)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        generator = torch.Generator().manual_seed(_mix(self.seed, self.split, index))
        return torch.randn(self.shape, generator=generator), self.targets[index]


def _mix(*values: int) -> int:
    entropy = [v % 2**64 for v in values]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def _synthetic_imagenet(
    *,
    seed: int,
    image_size: int = 224,
    channels: int = 3,
    num_classes: int = 1000,
    train_size: int = 1024,
    test_size: int = 256,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    sizes = dict(image_size=image_size, channels=channels, num_classes=num_classes)
    for option, value in {**sizes, "train_size": train_size, "test_size": test_size}.items():
        if value < 1:
            raise ValueError(f"synthetic-imagenet: {option} must be >= 1, got {value}")
    shape = (channels, image_size, image_size)
    train = SyntheticImages(train_size, shape, num_classes, seed, split=0)
    test = SyntheticImages(test_size, shape, num_classes, seed, split=1)
    return train, test, DatasetInfo("synthetic-imagenet", "classification", shape, num_classes)


# --- image folder (optional torchvision) --------------------------------------------------------


def _imagefolder(
    *, seed: int, root: str | None = None, image_size: int = 224, test_fraction: float = 0.1
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """``root/<class>/<image>``, or ``root/train/<class>/...`` with ``root/val`` or ``root/test``
    (then that is the test split; otherwise a seeded ``test_fraction`` of the images is)."""
    if root is None:
        raise ValueError("imagefolder needs root=PATH (a folder with one sub-folder per class)")
    try:
        from torchvision import datasets, transforms
    except ImportError as error:
        raise MissingExtraError(
            "the imagefolder dataset needs torchvision: pip install gossipgrad[vision]"
        ) from error
    folder = Path(root)
    if not folder.is_dir():
        raise ValueError(f"imagefolder: root {str(folder)!r} is not a folder")
    transform = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    held_out = [folder / s for s in ("val", "test") if (folder / s).is_dir()]
    if (folder / "train").is_dir() and held_out:
        images = datasets.ImageFolder(str(folder / "train"), transform=transform)
        train: Dataset = images
        test: Dataset = datasets.ImageFolder(str(held_out[0]), transform=transform)
        classes = len(images.classes)
    else:
        everything = datasets.ImageFolder(str(folder), transform=transform)
        order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, int(len(everything) * test_fraction))
        train = Subset(everything, order[n_test:].tolist())
        test = Subset(everything, order[:n_test].tolist())
        classes = len(everything.classes)
    shape = (3, image_size, image_size)
    return train, test, DatasetInfo(folder.name, "classification", shape, classes)


# --- user datasets ------------------------------------------------------------------------------


def load_user_dataset(spec: str, *, seed: int = 0) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Call the function named by ``spec`` (``"module:function"`` or ``"path/file.py:function"``);
    it is given ``seed=`` if it takes a ``seed`` parameter, and returns ``(train, test, info)`` or
    ``(train, test)``; in the latter case the info is inferred from ``train[0]`` and the labels."""
    fn = import_callable(spec, "dataset")
    accepts_seed = _accepts(fn, "seed")
    result = fn(seed=seed) if accepts_seed else fn()
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise ValueError(
            f"dataset function {spec!r} must return (train, test) or (train, test, DatasetInfo); "
            f"it returned {type(result).__name__}"
        )
    train, test = result[0], result[1]
    for split, dataset in (("train", train), ("test", test)):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise ValueError(f"{spec!r}: the {split} dataset must support len() and indexing")
        if len(dataset) == 0:
            raise ValueError(f"{spec!r}: the {split} dataset is empty")
    if len(result) == 3:
        if not isinstance(result[2], DatasetInfo):
            raise ValueError(
                f"{spec!r}: the third value must be a gossipgrad.train.data.DatasetInfo"
            )
        return train, test, result[2]
    return train, test, _infer_info(spec, train, test)


def _infer_info(spec: str, train: Any, test: Any) -> DatasetInfo:
    advice = (
        "return (train, test, gossipgrad.train.data.DatasetInfo(name, task, input_shape, classes))"
    )
    sample = train[0]
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        raise ValueError(f"{spec!r}: samples must be (input, target) pairs; or {advice}")
    x, y = torch.as_tensor(sample[0]), torch.as_tensor(sample[1])
    if y.dim() != 0 or y.is_floating_point():
        raise ValueError(f"{spec!r}: cannot infer the task from a non-class target; {advice}")
    train_labels, test_labels = targets_of(train), targets_of(test)
    if train_labels is None or test_labels is None:
        raise ValueError(
            f"{spec!r}: cannot infer the number of classes (give the datasets a 'targets' "
            f"attribute or use TensorDataset), or {advice}"
        )
    classes = max(int(train_labels.max()), int(test_labels.max())) + 1
    return DatasetInfo(spec, "classification", tuple(x.shape), classes)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
