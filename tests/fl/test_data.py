import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fl.data import (
    IMAGE_MAGIC,
    LABEL_MAGIC,
    DataError,
    evaluation_order,
    load_mnist,
    parse_idx,
    resolve_data_root,
)

# Pinned: changing the order would silently change every published figure.
EVALUATION_ORDER_HEAD = [1928, 3298, 6045, 5452, 4396]


def idx_images(count: int, rows: int = 2, cols: int = 3, magic: int = IMAGE_MAGIC) -> bytes:
    body = bytes(i % 256 for i in range(count * rows * cols))
    return struct.pack(">IIII", magic, count, rows, cols) + body


def idx_labels(labels: list[int], magic: int = LABEL_MAGIC) -> bytes:
    return struct.pack(">II", magic, len(labels)) + bytes(labels)


def write_fake_mnist(root: Path, *, n_train: int = 20, n_test: int = 12, gz: bool = True) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    files = {
        "train-images-idx3-ubyte": idx_images(n_train, 28, 28),
        "train-labels-idx1-ubyte": idx_labels([i % 10 for i in range(n_train)]),
        "t10k-images-idx3-ubyte": idx_images(n_test, 28, 28),
        "t10k-labels-idx1-ubyte": idx_labels([i % 10 for i in range(n_test)]),
    }
    for name, content in files.items():
        if gz:
            (raw / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (raw / name).write_bytes(content)


def test_parse_idx_images_reads_shape_and_values():
    # Prepare
    content = idx_images(2)
    # Execute
    arr = parse_idx(content, expected_magic=IMAGE_MAGIC)
    # Assert
    assert arr.shape == (2, 2, 3)
    assert arr.dtype == np.uint8
    assert arr[1, 1, 2] == 11


def test_parse_idx_labels():
    arr = parse_idx(idx_labels([3, 1, 4]), expected_magic=LABEL_MAGIC)
    assert arr.tolist() == [3, 1, 4]


def test_parse_idx_truncated_names_source():
    content = idx_images(2)[:-1]
    with pytest.raises(DataError, match=r"train-x: truncated: expected 28 bytes, found 27"):
        parse_idx(content, expected_magic=IMAGE_MAGIC, source="train-x")


def test_parse_idx_short_header():
    with pytest.raises(DataError, match="shorter than an IDX header"):
        parse_idx(b"\x00\x00", expected_magic=LABEL_MAGIC)


def test_parse_idx_wrong_magic():
    with pytest.raises(DataError, match="wrong magic number 2049"):
        parse_idx(idx_labels([1]), expected_magic=IMAGE_MAGIC)


def test_parse_idx_trailing_bytes():
    with pytest.raises(DataError, match="trailing bytes"):
        parse_idx(idx_labels([1]) + b"\x00", expected_magic=LABEL_MAGIC)


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_splits_sizes(tmp_path, gz):
    # Prepare
    write_fake_mnist(tmp_path, gz=gz)
    # Execute
    splits = load_mnist(tmp_path, train_size=20, val_size=4, test_size=8)
    # Assert
    assert splits.train.x.shape == (20, 1, 28, 28)
    assert len(splits.validation) == 4
    assert len(splits.test) == 8
    # Labels of the fake test file are i % 10, so they name the images taken.
    order = [int(i) for i in evaluation_order(12)]
    assert splits.validation.y.tolist() == [i % 10 for i in order[:4]]
    assert splits.test.y.tolist() == [i % 10 for i in order[4:12]]


def test_evaluation_order_is_a_fixed_shuffle():
    # Execute
    order = evaluation_order(10_000)
    # Assert: a permutation, not the file's order, and the same on every call
    assert sorted(order.tolist()) == list(range(10_000))
    assert order.tolist() != list(range(10_000))
    assert order[:5].tolist() == EVALUATION_ORDER_HEAD
    assert evaluation_order(10_000).tolist() == order.tolist()
    # Both halves of MNIST's test file are about evenly represented in any prefix.
    assert 450 <= int((order[:1_000] < 5_000).sum()) <= 550


def test_validation_set_does_not_depend_on_test_size(tmp_path):
    write_fake_mnist(tmp_path, n_test=12)
    small = load_mnist(tmp_path, train_size=20, val_size=4, test_size=2)
    large = load_mnist(tmp_path, train_size=20, val_size=4, test_size=8)
    assert torch.equal(small.validation.x, large.validation.x)
    assert torch.equal(small.test.x, large.test.x[:2])


def test_load_mnist_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="data fetch"):
        load_mnist(tmp_path)


def test_load_mnist_corrupt_gzip_names_file(tmp_path):
    write_fake_mnist(tmp_path)
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_mnist(tmp_path, train_size=20, val_size=4, test_size=8)


def test_load_mnist_rejects_oversized_splits(tmp_path):
    write_fake_mnist(tmp_path)
    with pytest.raises(DataError, match="must be positive and fit"):
        load_mnist(tmp_path, train_size=20, val_size=10, test_size=10)


def test_resolve_data_root_precedence(monkeypatch):
    monkeypatch.setenv("LLBCFL_DATA", "/env/dir")
    assert resolve_data_root("/flag/dir") == Path("/flag/dir")
    assert resolve_data_root(None) == Path("/env/dir")
    monkeypatch.delenv("LLBCFL_DATA")
    assert resolve_data_root(None) == Path("data")
