"""The model zoo (gossipgrad.train.models): shapes, sizes, determinism, fit checks, user models."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from gossipgrad.train.data import DatasetInfo, load_dataset
from gossipgrad.train.models import MODELS, build_model, default_model, load_user_model, task_loss

DIGITS = DatasetInfo("digits", "classification", (1, 8, 8), 10)
CIFAR = DatasetInfo("cifar", "classification", (3, 32, 32), 10)
IMAGENET = DatasetInfo("imagenet", "classification", (3, 224, 224), 1000)
TEXT = DatasetInfo("text", "lm", (16,), 256)


def _count(name: str, info: DatasetInfo, **options: object) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(name, info, **options)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, info",
    [
        ("mlp", DIGITS),
        ("cnn", DIGITS),
        ("cnn", CIFAR),
        ("resnet20", DIGITS),
        ("resnet20", CIFAR),
        ("resnet56", CIFAR),
        ("resnet18", CIFAR),
        ("resnet50", CIFAR),
        ("wide-mlp", DIGITS),
        ("wide-mlp", DatasetInfo("big", "classification", (3, 64, 64), 10)),
        ("mlp", DatasetInfo("flat", "classification", (7,), 3)),
    ],
)
def test_classifiers_forward_shape(name: str, info: DatasetInfo) -> None:
    torch.manual_seed(0)
    model = build_model(name, info)
    out = model(torch.randn(2, *info.input_shape))
    assert out.shape == (2, info.num_classes) and torch.isfinite(out).all()
    task_loss(out, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gpt_forward_shape_and_causality() -> None:
    torch.manual_seed(0)
    model = build_model("gpt", TEXT, n_layer=2, d_model=64).eval()
    idx = torch.randint(256, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 256)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    other = model(changed)
    torch.testing.assert_close(other[:, :10], logits[:, :10])  # the past cannot see the future
    assert not torch.allclose(other[:, 10:], logits[:, 10:])
    assert model(idx[:, :5]).shape == (2, 5, 256)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(256, (1, 17)))
    loss = task_loss(logits, torch.randint(256, (2, 16))).detach()
    assert loss.shape == () and 4.5 < float(loss) < 6.5  # about ln(256) = 5.5 at init


def test_each_model_runs_on_its_dataset() -> None:
    pairs = [
        ("digits", {}, "mlp"),
        ("pytext", {"max_bytes": 50_000, "block_size": 32}, "gpt"),
        ("synthetic-imagenet", {"image_size": 64, "train_size": 4, "test_size": 2}, "resnet18"),
    ]
    for dataset, options, model_name in pairs:
        train, _, info = load_dataset(dataset, **options)
        assert default_model(info) == model_name
        x = torch.stack([train[i][0] for i in range(2)])
        y = torch.stack([train[i][1] for i in range(2)])
        with torch.no_grad():
            assert float(task_loss(build_model(model_name, info)(x), y)) > 0


def test_parameter_counts() -> None:
    # torchvision's resnet18 / resnet50 have exactly these counts at 1000 classes
    assert _count("resnet18", IMAGENET) == 11_689_512
    assert _count("resnet50", IMAGENET) == 25_557_032
    assert _count("resnet20", CIFAR) == pytest.approx(0.27e6, rel=0.02)  # He et al. 2016
    assert _count("resnet56", CIFAR) == pytest.approx(0.85e6, rel=0.02)
    assert _count("wide-mlp", DIGITS) >= 25_000_000
    assert 25_000_000 <= _count("wide-mlp", IMAGENET) <= 60_000_000  # pooled, not 600M
    assert _count("gpt", TEXT) < 2_000_000
    assert _count("mlp", DIGITS) < 20_000


def test_init_is_deterministic_under_manual_seed() -> None:
    for name, info in [("cnn", DIGITS), ("gpt", TEXT), ("resnet20", CIFAR)]:
        states = []
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            states.append(build_model(name, info).state_dict())
        same = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
        differ = any(not torch.equal(states[0][k], states[2][k]) for k in states[0])
        assert same and differ, name


def test_mlp_learns_digits() -> None:
    torch.manual_seed(0)
    train, test, info = load_dataset("digits")
    model = build_model("mlp", info)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        task_loss(model(train.tensors[0]), train.tensors[1]).backward()
        optimizer.step()
    accuracy = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean()
    assert accuracy > 0.9


def test_names_and_fit_are_checked() -> None:
    with pytest.raises(ValueError, match="mlp, cnn, resnet20") as error:
        build_model("vgg16", DIGITS)
    assert "module:function" in str(error.value)
    with pytest.raises(ValueError, match="'gpt' is for lm data") as error:
        build_model("gpt", DIGITS)
    assert "mlp" in str(error.value) and "gpt" not in str(error.value).split("choose")[1]
    with pytest.raises(ValueError, match="choose one of gpt"):
        build_model("resnet18", TEXT)
    with pytest.raises(ValueError, match="needs images"):
        build_model("cnn", DatasetInfo("flat", "classification", (7,), 3))
    with pytest.raises(ValueError, match="allowed: hidden"):
        build_model("mlp", DIGITS, width=3)
    with pytest.raises(ValueError, match="multiple of n_head"):
        build_model("gpt", TEXT, d_model=10, n_head=4)
    assert len(MODELS) == 8 and "wide-mlp" in MODELS


def test_default_model() -> None:
    assert default_model(DIGITS) == "mlp"
    assert default_model(TEXT) == "gpt"
    assert default_model(IMAGENET) == "resnet18"
    assert default_model(CIFAR) == "resnet20"
    assert default_model(DatasetInfo("flat", "classification", (7,), 3)) == "mlp"


USER_MODELS = """
from torch import nn

def with_info(info):
    return nn.Linear(info.input_shape[0], info.num_classes)

def without_info():
    return nn.Linear(7, 3)

def not_a_module(info):
    return "linear"
"""


@pytest.fixture
def user_models(monkeypatch, tmp_path) -> str:
    (tmp_path / "gg_user_models.py").write_text(textwrap.dedent(USER_MODELS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "gg_user_models"
    sys.modules.pop("gg_user_models", None)


def test_user_models(user_models: str) -> None:
    info = DatasetInfo("flat", "classification", (5,), 2)
    model = load_user_model(f"{user_models}:with_info", info)
    assert isinstance(model, nn.Linear) and model.weight.shape == (2, 5)
    assert build_model(f"{user_models}:without_info", info).weight.shape == (3, 7)
    with pytest.raises(ValueError, match="must return a torch.nn.Module"):
        load_user_model(f"{user_models}:not_a_module", info)
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        load_user_model(f"{user_models}:nope", info)
    with pytest.raises(ValueError, match="module:function"):
        load_user_model("nocolon", info)
