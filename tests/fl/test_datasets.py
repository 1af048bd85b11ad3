"""The dataset interface (fl.datasets): every registered dataset satisfies it."""

from pathlib import Path

import pytest
import torch

from fl.config import RunConfig
from fl.datasets import DATASET_REGISTRY, DATASETS, Dataset, Splits, dataset_of, load_splits
from fl.models import MODEL_NAMES, build_model, model_for
from fl.seeds import torch_generator

SIZES = {"train_size": 40, "val_size": 6, "test_size": 9}


@pytest.fixture(
    params=[pytest.param(n, marks=pytest.mark.mnist) if n == "mnist" else n for n in DATASETS]
)
def loaded(request) -> tuple[Dataset, Splits]:
    """Each registered dataset, loaded small (MNIST from the real files: skipped without them)."""
    dataset = dataset_of(request.param)
    root = request.getfixturevalue("mnist_root") if request.param == "mnist" else Path("unused")
    return dataset, dataset.load(root, **SIZES)


def test_every_dataset_is_registered_under_its_own_name():
    for name in DATASETS:
        dataset = DATASET_REGISTRY.get(name)()
        assert isinstance(dataset, Dataset)
        assert dataset.name == name
        assert dataset.num_classes >= 2
        assert all(isinstance(v, int) and v > 0 for v in dataset.input_shape)
        assert dataset.default_model in MODEL_NAMES


def test_splits_have_the_asked_sizes_shapes_and_labels(loaded):
    dataset, splits = loaded
    for split, size in zip(
        (splits.train, splits.validation, splits.test), SIZES.values(), strict=True
    ):
        assert len(split) == size
        assert tuple(split.x.shape) == (size, *dataset.input_shape)
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert int(split.y.min()) >= 0 and int(split.y.max()) < dataset.num_classes


def test_the_default_model_builds_and_runs_a_forward_pass(loaded):
    dataset, splits = loaded
    model = build_model(
        dataset.default_model,
        generator=torch.Generator().manual_seed(0),
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
    )
    logits = model(splits.validation.x[:5])
    assert logits.shape == (5, dataset.num_classes)
    assert bool(torch.isfinite(logits).all())


def test_model_for_follows_the_configured_dataset():
    config = RunConfig(dataset="synthetic", model="mlp", train_size=100, clients=10)
    model = model_for(config, generator=torch_generator(0, "init"))
    assert model.fc3.out_features == dataset_of(config).num_classes
    # MNIST's shape: the same model as before the dataset interface.
    same = build_model("mlp", generator=torch_generator(0, "init"))
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters(), strict=True)
    )


def test_load_splits_uses_the_config_sizes_and_can_skip_training_records():
    config = RunConfig(dataset="synthetic", clients=5, train_size=50, val_size=7, test_size=8)
    full = load_splits(config)
    assert (len(full.train), len(full.validation), len(full.test)) == (50, 7, 8)
    assert len(load_splits(config, train=False).train) == 1


def test_synthetic_is_deterministic():
    a, b = (dataset_of("synthetic").load(Path("x"), **SIZES) for _ in range(2))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar' \(choices: mnist, synthetic"):
        dataset_of("cifar")
