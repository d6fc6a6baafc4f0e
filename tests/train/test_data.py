"""Embedded datasets, user dataset specs and label lookup (gossipgrad.train.data)."""

from __future__ import annotations

import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from gossipgrad.train.data import (
    DATASETS,
    DatasetInfo,
    MissingExtraError,
    load_dataset,
    load_user_dataset,
    stdlib_corpus,
    targets_of,
)

SMALL_TEXT = 200_000


# --- digits -------------------------------------------------------------------------------------


def test_digits_shapes_and_stratified_split() -> None:
    train, test, info = load_dataset("digits", seed=0)
    assert info == DatasetInfo("digits", "classification", (1, 8, 8), 10)
    assert (len(train), len(test)) == (1437, 360)
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert abs(float(train.tensors[0].mean())) < 1e-5
    assert abs(float(train.tensors[0].std()) - 1.0) < 1e-2
    counts = torch.bincount(targets_of(test), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of ~180 per class


def test_digits_split_is_a_partition_of_the_raw_data() -> None:
    train, test, _ = load_dataset("digits", seed=3)
    rows = torch.cat([train.tensors[0], test.tensors[0]]).reshape(-1, 64).double().numpy()
    raw = load_digits().data.astype(np.float64)
    # the normalisation is x -> (x - m) / s with s > 0, which keeps the lexicographic order
    ours, theirs = rows[np.lexsort(rows.T[::-1])], raw[np.lexsort(raw.T[::-1])]
    scale, shift = np.polyfit(ours.ravel(), theirs.ravel(), 1)
    np.testing.assert_allclose(ours * scale + shift, theirs, atol=1e-4)


def test_digits_is_deterministic_per_seed() -> None:
    a, _, _ = load_dataset("digits", seed=1)
    b, _, _ = load_dataset("digits", seed=1)
    c, _, _ = load_dataset("digits", seed=2)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[1], c.tensors[1])


# --- pytext -------------------------------------------------------------------------------------


def test_pytext_samples_are_shifted_python_bytes() -> None:
    train, test, info = load_dataset("pytext", max_bytes=SMALL_TEXT, block_size=32)
    assert info == DatasetInfo("pytext", "lm", (32,), 256)
    x, y = train[5]
    assert x.shape == y.shape == (32,) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[1:], y[:-1])
    assert torch.equal(train[6][0][0:1], y[-1:])  # non-overlapping windows, stride = block_size
    assert int(x.min()) >= 0 and int(x.max()) < info.num_classes
    text = bytes(torch.cat([train[i][0] for i in range(len(train))]).to(torch.uint8).tolist())
    assert b"def " in text and b"import " in text


def test_pytext_split_by_position_covers_the_corpus() -> None:
    train, test, _ = load_dataset("pytext", max_bytes=SMALL_TEXT)
    corpus = torch.frombuffer(bytearray(stdlib_corpus(SMALL_TEXT)), dtype=torch.uint8)
    assert len(corpus) == SMALL_TEXT
    assert torch.equal(torch.cat([train.tokens, test.tokens]), corpus)
    assert len(test.tokens) == pytest.approx(0.1 * SMALL_TEXT, abs=1)
    assert len(train) == (len(train.tokens) - 65) // 64 + 1
    last_x, last_y = train[len(train) - 1]
    assert torch.equal(last_y[-1:], train.tokens[(len(train) - 1) * 64 + 64].long().view(1))


def test_pytext_is_deterministic_and_stride_option_overlaps() -> None:
    a, _, _ = load_dataset("pytext", max_bytes=SMALL_TEXT)
    b, _, _ = load_dataset("pytext", max_bytes=SMALL_TEXT)
    assert torch.equal(a.tokens, b.tokens)
    dense, _, _ = load_dataset("pytext", max_bytes=SMALL_TEXT, block_size=8, stride=1)
    assert torch.equal(dense[0][0][1:], dense[1][0][:-1])
    assert targets_of(dense) is None


def test_pytext_default_is_a_few_megabytes() -> None:
    train, test, _ = load_dataset("pytext")
    assert len(train.tokens) + len(test.tokens) == 2_000_000


# --- synthetic-imagenet -------------------------------------------------------------------------


def test_synthetic_is_lazy_and_deterministic_per_index() -> None:
    train, test, info = load_dataset("synthetic-imagenet", seed=7)
    assert info == DatasetInfo("synthetic-imagenet", "classification", (3, 224, 224), 1000)
    assert (len(train), len(test)) == (1024, 256)
    assert len(pickle.dumps(train)) < 100_000  # 1024 images would be 600 MB
    x, y = train[3]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and 0 <= int(y) < 1000
    assert torch.equal(train[3][0], x)  # same index, same image
    again, _, _ = load_dataset("synthetic-imagenet", seed=7)
    assert torch.equal(again[3][0], x) and int(again[3][1]) == int(y)
    assert not torch.equal(train[4][0], x)
    assert not torch.equal(test[3][0], x)
    other, _, _ = load_dataset("synthetic-imagenet", seed=8)
    assert not torch.equal(other[3][0], x)


def test_synthetic_options_and_targets() -> None:
    train, test, info = load_dataset(
        "synthetic-imagenet", image_size=32, num_classes=10, train_size=40, test_size=8
    )
    assert info.input_shape == (3, 32, 32) and info.num_classes == 10
    assert (len(train), len(test)) == (40, 8)
    labels = targets_of(train)
    assert labels is not None and len(labels) == 40
    assert [int(train[i][1]) for i in range(40)] == labels.tolist()
    with pytest.raises(IndexError):
        train[40]
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("synthetic-imagenet", image_size=0)


# --- names, options, image folder ---------------------------------------------------------------


def test_bad_name_and_option_are_explained() -> None:
    with pytest.raises(ValueError, match="digits, pytext, synthetic-imagenet") as error:
        load_dataset("cifar10")
    assert "module:function" in str(error.value)
    with pytest.raises(ValueError, match="block_size") as error:
        load_dataset("pytext", blocksize=32)
    assert "blocksize" in str(error.value)
    assert DATASETS == ("digits", "pytext", "synthetic-imagenet")


def test_imagefolder_without_torchvision_says_how_to_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    with pytest.raises(MissingExtraError, match=r"pip install gossipgrad\[vision\]"):
        load_dataset("imagefolder", root=str(tmp_path))
    with pytest.raises(ValueError, match="root=PATH"):
        load_dataset("imagefolder")


def test_dataset_info_is_validated() -> None:
    with pytest.raises(ValueError, match="task"):
        DatasetInfo("x", "regression", (3,), 2)
    with pytest.raises(ValueError, match="block_size"):
        DatasetInfo("x", "lm", (2, 3), 2)
    assert DatasetInfo("x", "classification", [1, 2], 3).input_shape == (1, 2)


def test_targets_of_understands_common_wrappers() -> None:
    data = TensorDataset(torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert targets_of(data).tolist() == [0, 1, 2, 0, 1, 2]
    assert targets_of(Subset(data, [5, 0])).tolist() == [2, 0]
    assert targets_of(ConcatDataset([data, Subset(data, [1])])).tolist() == [0, 1, 2, 0, 1, 2, 1]
    assert targets_of(TensorDataset(torch.randn(3, 2), torch.randn(3))) is None
    assert targets_of([(torch.zeros(2), 1)]) is None


# --- user datasets ------------------------------------------------------------------------------

USER_MODULE = """
import torch
from torch.utils.data import TensorDataset
from gossipgrad.train.data import DatasetInfo

def _split(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(30, 5, generator=g), torch.arange(30) % 4
    return TensorDataset(x[:20], y[:20]), TensorDataset(x[20:], y[20:])

def with_info(seed):
    return (*_split(seed), DatasetInfo("mine", "classification", (5,), 4))

def pair():
    return _split(0)

def unlabelled():
    return [(torch.zeros(5), 1)], [(torch.zeros(5), 0)]

def sequences():
    return [(torch.zeros(5), torch.zeros(5))], [(torch.zeros(5), torch.zeros(5))]

def wrong():
    return 3

NOT_CALLABLE = 1
"""


@pytest.fixture
def user_module(monkeypatch, tmp_path, request) -> str:
    name = f"gg_userdata_{request.node.name.replace('[', '_').replace(']', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_dataset_with_info_gets_the_seed(user_module: str) -> None:
    train, test, info = load_user_dataset(f"{user_module}:with_info", seed=5)
    assert info == DatasetInfo("mine", "classification", (5,), 4)
    again, _, _ = load_user_dataset(f"{user_module}:with_info", seed=5)
    other, _, _ = load_user_dataset(f"{user_module}:with_info", seed=6)
    assert torch.equal(train.tensors[0], again.tensors[0])
    assert not torch.equal(train.tensors[0], other.tensors[0])
    assert len(test) == 10


def test_user_dataset_pair_infers_the_info(user_module: str) -> None:
    spec = f"{user_module}:pair"
    train, _, info = load_dataset(spec)  # load_dataset hands specs over
    assert info == DatasetInfo(spec, "classification", (5,), 4)
    assert len(train) == 20


@pytest.mark.parametrize(
    "function, message",
    [
        ("unlabelled", "DatasetInfo"),
        ("sequences", "DatasetInfo"),
        ("wrong", "must return"),
        ("missing", "no attribute 'missing'"),
        ("NOT_CALLABLE", "not callable"),
    ],
)
def test_user_dataset_errors(user_module: str, function: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_user_dataset(f"{user_module}:{function}")


def test_bad_specs_are_explained() -> None:
    with pytest.raises(ValueError, match="module:function"):
        load_user_dataset("no_colon_here")
    with pytest.raises(ValueError, match="cannot import module 'gg_no_such_module'"):
        load_user_dataset("gg_no_such_module:fn")
    with pytest.raises(ValueError, match="not found"):
        load_user_dataset("nowhere/data.py:fn")


def test_user_module_file_path_and_cwd(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "gg_local_data.py").write_text(textwrap.dedent(USER_MODULE))
    try:
        _, _, info = load_user_dataset(f"{tmp_path / 'gg_local_data.py'}:pair")
        assert info.num_classes == 4
        sys.modules.pop("gg_local_data")
        monkeypatch.chdir(tmp_path)  # not on sys.path, but in the working folder
        _, _, info = load_user_dataset("gg_local_data:pair")
        assert info.input_shape == (5,)
    finally:
        sys.modules.pop("gg_local_data", None)


def test_missing_dependency_of_user_module_is_not_hidden(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "gg_broken_data.py").write_text("import gg_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="gg_absent_dependency"):
        load_user_dataset("gg_broken_data:fn")
