"""Loading the splits: exact class-balanced subsets, the validation hold-out, clear errors."""

import numpy as np
import pytest
from archives import CLASSES, make_pickle_archive

from cifar_pipeline import paths
from cifar_pipeline.data import download as download_module
from cifar_pipeline.data.dataset import balanced_subset, load_split, load_splits, read_classes
from cifar_pipeline.data.download import download
from cifar_pipeline.params import DataParams
from cifar_pipeline.stage import MissingInputError, PipelineError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """data/cifar10 as the download stage writes it: 200 train (20 per class), 50 test (5 per class)."""
    tmp = tmp_path_factory.mktemp("data")
    arrays = make_pickle_archive(tmp / "cifar.tar.gz", n_train=200, n_test=50, seed=3)
    download(str(tmp / "cifar.tar.gz"), None, tmp / "cifar10")
    return tmp / "cifar10", arrays


def rows_in(subset: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Index in `full` of each image of `subset` (the random test images are all distinct)."""
    flat = full.reshape(len(full), -1)
    return np.array([np.flatnonzero((flat == row).all(axis=1))[0] for row in subset.reshape(len(subset), -1)])


def test_classes_are_the_official_order():
    assert download_module.CLASSES == CLASSES


def test_load_split_and_meta(data_dir):
    path, arrays = data_dir
    images, labels = load_split(path, "train")
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, arrays["train"][0])
    np.testing.assert_array_equal(labels, arrays["train"][1])
    assert read_classes(path) == CLASSES
    assert load_splits(path, DataParams(), seed=0).classes == CLASSES


@pytest.mark.parametrize("size", [10, 37, 100, 199, 200])
def test_balanced_subset_is_exact_sorted_and_balanced(size):
    labels = np.random.default_rng(0).permutation(np.arange(200) % 10)
    index = balanced_subset(labels, size, seed=7)
    assert len(index) == size and len(np.unique(index)) == size
    assert np.all(np.diff(index) > 0)
    per_class = np.bincount(labels[index], minlength=10)
    # The remainder goes one each to the lowest labels.
    np.testing.assert_array_equal(per_class, [size // 10 + (c < size % 10) for c in range(10)])


def test_balanced_subset_follows_the_seed():
    labels = np.arange(1000) % 10
    np.testing.assert_array_equal(balanced_subset(labels, 50, 1), balanced_subset(labels, 50, 1))
    assert not np.array_equal(balanced_subset(labels, 50, 1), balanced_subset(labels, 50, 2))


def test_balanced_subset_refuses_a_class_too_small():
    labels = np.array([0] * 10 + [1] * 2)
    with pytest.raises(PipelineError, match="class 1 has 2 images, 5 needed"):
        balanced_subset(labels, 10, 0)


def test_no_subset_and_no_hold_out_gives_the_splits_unchanged(data_dir):
    path, arrays = data_dir
    splits = load_splits(path, DataParams(), seed=0)
    np.testing.assert_array_equal(splits.train_images, arrays["train"][0])
    np.testing.assert_array_equal(splits.test_labels, arrays["test"][1])
    assert splits.val_images.shape == (0, 32, 32, 3) and splits.val_labels.shape == (0,)
    assert splits.classes == CLASSES


def test_subsets_and_hold_out_are_balanced_disjoint_and_in_order(data_dir):
    path, arrays = data_dir
    splits = load_splits(path, DataParams(train_subset=105, test_subset=20, val_size=30), seed=5)
    assert len(splits.train_labels) == 75 and len(splits.val_labels) == 30 and len(splits.test_labels) == 20
    assert np.bincount(splits.val_labels, minlength=10).tolist() == [3] * 10
    assert np.bincount(splits.test_labels, minlength=10).tolist() == [2] * 10
    # 105 = 10 * 10 + 5: classes 0..4 get one more; the hold-out takes 3 of each.
    assert np.bincount(splits.train_labels, minlength=10).tolist() == [8] * 5 + [7] * 5
    train_rows = rows_in(splits.train_images, arrays["train"][0])
    val_rows = rows_in(splits.val_images, arrays["train"][0])
    assert not set(train_rows) & set(val_rows)
    assert np.all(np.diff(train_rows) > 0) and np.all(np.diff(val_rows) > 0)  # original order kept
    np.testing.assert_array_equal(arrays["train"][1][train_rows], splits.train_labels)
    test_rows = rows_in(splits.test_images, arrays["test"][0])
    assert np.all(np.diff(test_rows) > 0)


def test_splits_are_reproducible_from_the_seed(data_dir):
    path, _ = data_dir
    params = DataParams(train_subset=50, val_size=10)
    a, b, c = (load_splits(path, params, seed) for seed in (1, 1, 2))
    np.testing.assert_array_equal(a.val_images, b.val_images)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert not np.array_equal(a.val_images, c.val_images)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (DataParams(train_subset=201), r"data.train_subset = 201 is larger than the train split \(200 images\)"),
        (DataParams(test_subset=60), r"data.test_subset = 60 is larger than the test split \(50 images\)"),
        (DataParams(val_size=200), r"data.val_size = 200 leaves no training images \(200 in the train split\)"),
    ],
)
def test_impossible_sizes_name_the_key(data_dir, params, message):
    with pytest.raises(PipelineError, match=message):
        load_splits(data_dir[0], params, seed=0)


def test_a_missing_data_folder_names_the_download_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingInputError, match=r"data/cifar10 does not exist: run the 'download' stage"):
        load_splits(paths.DATA_DIR, DataParams(), seed=0)


def test_a_damaged_split_file_is_a_clear_error(tmp_path, data_dir):
    broken = tmp_path / "cifar10"
    broken.mkdir()
    (broken / "train.npz").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match="train.npz is unreadable .*rerun the download stage"):
        load_split(broken, "train")
    with pytest.raises(MissingInputError, match="test.npz does not exist"):
        load_split(broken, "test")
