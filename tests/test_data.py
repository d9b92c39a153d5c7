"""Tests for rd_keras.data: IDX parsing, the four sources, augmentation, batching and normalisation."""

import gzip
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from rd_keras import data
from rd_keras import defaults

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def make_config(**overrides):
    config = ml_collections.ConfigDict({"data": defaults.data_config()})
    config.data.update(overrides)
    return config


def write_idx(path, array, magic=None, truncate=0, compress=False):
    magic = 0x0800 + array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    payload = payload[:len(payload) - truncate]
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if compress else payload)
    return str(path)


def write_idx_dataset(root, n_train=50, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)),
                  compress=True)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return str(root)


def batches(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 3)).astype(np.uint8)
    path = write_idx(tmp_path / "images", images, compress=compress)
    np.testing.assert_array_equal(data.read_idx(path, 3), images)
    labels = np.arange(7, dtype=np.uint8)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "labels", labels), 1), labels)


@pytest.mark.skipif(not os.path.isdir(FMNIST_DIR), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_files():
    labels = data.read_idx(os.path.join(FMNIST_DIR, "t10k-labels-idx1-ubyte.gz"), 1)
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    train_ds, eval_ds, info = data.datasets(make_config())
    assert info == data.DatasetInfo(10, (28, 28, 1), 60000, 10000, (0.2860,), (0.3530,))
    x, y = next(iter(train_ds))
    assert x.shape == (128, 28, 28, 1) and x.dtype == tf.float32 and y.dtype == tf.int32
    # The published statistics really normalise this data.
    assert abs(float(tf.reduce_mean(x))) < 0.3 and 0.7 < float(tf.math.reduce_std(x)) < 1.3


def test_wrong_magic_names_file(tmp_path):
    path = write_idx(tmp_path / "bad-images", np.zeros((2, 4, 4)), magic=0x0801)
    with pytest.raises(data.DataError, match="magic") as err:
        data.read_idx(path, 3)
    assert path in str(err.value) and "0x00000801" in str(err.value)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_file_reports_lengths(tmp_path, compress):
    path = write_idx(tmp_path / "short", np.zeros((3, 4, 4)), truncate=5, compress=compress)
    with pytest.raises(data.DataError, match=r"expected 64 bytes, got 59") as err:
        data.read_idx(path, 3)
    assert path in str(err.value)


def test_corrupt_gzip_and_missing_file(tmp_path):
    good = gzip.compress(bytes(100))
    (tmp_path / "cut.gz").write_bytes(good[:len(good) // 2])
    with pytest.raises(data.DataError, match="gzip") as err:
        data.read_idx(str(tmp_path / "cut.gz"), 1)
    assert "cut.gz" in str(err.value)
    with pytest.raises(data.DataError, match="cannot read"):
        data.read_idx(str(tmp_path / "absent"), 1)


def test_idx_source_errors(tmp_path):
    with pytest.raises(data.DataError, match="not found") as err:
        data.datasets(make_config(data_dir=str(tmp_path)))
    assert str(tmp_path) in str(err.value)
    root = write_idx_dataset(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(9))
    with pytest.raises(data.DataError, match="label count 9 != image count 10"):
        data.datasets(make_config(data_dir=root))


# ----------------------------------------------------------------------------- pipelines


def test_batching_dtypes_and_drop_remainder(tmp_path):
    config = make_config(data_dir=write_idx_dataset(tmp_path), batch_size=16)
    train_ds, eval_ds, info = data.datasets(config)
    assert (info.train_examples, info.eval_examples, info.image_shape) == (50, 10, (28, 28, 1))
    train, evals = batches(train_ds), batches(eval_ds)
    assert [x.shape for x, _ in train] == [(16, 28, 28, 1)] * 3  # 50 // 16, remainder dropped
    assert [x.shape for x, _ in evals] == [(10, 28, 28, 1)]  # remainder kept
    assert all(x.dtype == np.float32 and y.dtype == np.int32 for x, y in train + evals)
    # Not repeated: a second pass gives the same number of batches.
    assert len(batches(train_ds)) == 3


def write_sorted_idx_dataset(root, per_class=6, classes=10, n_test=10):
    """IDX files whose train labels come class by class, as an image folder lists them; each image's first
    pixel is its index, so a test can tell which examples a split holds."""
    labels = np.repeat(np.arange(classes), per_class)
    images = np.zeros((len(labels), 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(len(labels))
    write_idx(root / "train-images-idx3-ubyte", images)
    write_idx(root / "train-labels-idx1-ubyte", labels)
    write_idx(root / "t10k-images-idx3-ubyte", images[:n_test])
    write_idx(root / "t10k-labels-idx1-ubyte", labels[:n_test])
    return str(root)


def pass_examples(ds):
    """(first pixels = example indices, labels) of a pass of normalised batches."""
    xs, ys = zip(*batches(ds))
    return np.rint(np.concatenate(xs)[:, 0, 0, 0]).astype(int), np.concatenate(ys)


def test_subsets_are_stratified_seeded_random_choices(tmp_path):
    config = make_config(data_dir=write_sorted_idx_dataset(tmp_path), train_subset=20, eval_subset=5,
                         batch_size=4, augment="none", mean=(0.0,), std=(1 / 255,))
    passes, eval_ds, info = data.pipelines(config)
    assert (info.train_examples, info.eval_examples) == (20, 5)
    index, labels = pass_examples(passes.one_pass(0))
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [2] * 10)  # not the first 20 (3 classes)
    np.testing.assert_array_equal(index // 6, labels)  # each example keeps its own label
    again, _ = pass_examples(data.pipelines(config)[0].one_pass(0))
    np.testing.assert_array_equal(again, index)  # seeded: the same subset and order in a new process
    config.data.split_seed = 1
    other, _ = pass_examples(data.pipelines(config)[0].one_pass(0))
    assert set(other) != set(index)
    # raw_examples draws the same way (export: calibration and test images of every class).
    _, raw_labels = data.raw_examples(config, "train", 30)
    np.testing.assert_array_equal(np.bincount(raw_labels, minlength=10), [3] * 10)


def test_class_sorted_data_gets_a_stratified_validation_split_and_mixed_batches(tmp_path):
    # The bug this guards against: the last 10% of a class-sorted folder is one class (validation
    # accuracy 0, that class never trained), and a shuffle buffer smaller than the data feeds
    # single-class batches.
    config = make_config(data_dir=write_sorted_idx_dataset(tmp_path, per_class=20), validation_split=0.25,
                         batch_size=15, augment="none", shuffle_buffer=4, mean=(0.0,), std=(1 / 255,))
    passes, eval_ds, info = data.pipelines(config)
    assert (info.train_examples, info.eval_examples, info.eval_split) == (150, 50, "validation")
    val_index, val_labels = pass_examples(eval_ds)
    np.testing.assert_array_equal(np.bincount(val_labels, minlength=10), [5] * 10)
    train_index, train_labels = pass_examples(passes.one_pass(0))
    np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), [15] * 10)
    assert not set(train_index) & set(val_index) and len(set(train_index)) == 150  # a partition
    first_batch = train_labels[:15]
    assert len(set(first_batch)) >= 6, first_batch  # a full permutation, not the 4-example buffer
    next_pass, _ = pass_examples(passes.one_pass(1))
    assert sorted(next_pass) == sorted(train_index) and list(next_pass) != list(train_index)
    # The validation split does not move with train.seed / data.seed: runs of several seeds choose on
    # the same images.
    config.data.seed = 7
    np.testing.assert_array_equal(pass_examples(data.pipelines(config)[1])[0], val_index)
    # The test split stays reachable for the one final evaluation.
    test_ds, count = data.test_dataset(config, info)
    _, test_labels = data.raw_examples(config, "test", 10)
    assert count == 10
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches(test_ds)]), test_labels)


def test_validation_split_that_empties_a_part_is_refused(tmp_path):
    config = make_config(data_dir=write_idx_dataset(tmp_path, n_train=10), validation_split=0.01, batch_size=2)
    with pytest.raises(ValueError, match="holds out 0 of 10 train examples"):
        data.pipelines(config)


@pytest.mark.parametrize("augment", ["cifar", "imagenet"])
def test_augmentation_changes_train_not_eval(augment):
    common = dict(source="synthetic", image_size=12, synthetic_examples=64, batch_size=64,
                  shuffle_buffer=1)
    plain_train, _, info = data.datasets(make_config(augment="none", **common))
    config = make_config(augment=augment, **common)
    train_ds, eval_ds, aug_info = data.datasets(config)
    assert aug_info == info
    (x_plain, y_plain), = batches(plain_train)
    (x_aug, y_aug), = batches(train_ds)
    assert x_aug.shape == x_plain.shape == (64, 12, 12, 3)
    np.testing.assert_array_equal(y_aug, y_plain)
    changed = np.abs(x_aug - x_plain).reshape(64, -1).max(axis=1) > 1e-3
    assert 0 < changed.sum()
    # Fresh draws each pass; the same pass is the same, in any process.
    passes = data.pipelines(config)[0]
    assert not np.array_equal(batches(passes.one_pass(1))[0][0], x_aug)
    np.testing.assert_array_equal(batches(passes.one_pass(0))[0][0], x_aug)
    # Eval is deterministic and equals the raw examples, normalised.
    images, labels = data.raw_examples(config, "test", 12)
    (x_eval, y_eval), = batches(eval_ds)
    np.testing.assert_array_equal(y_eval, labels)
    np.testing.assert_allclose(x_eval, data.normalize(images, info.mean, info.std), rtol=1e-6)
    np.testing.assert_array_equal(batches(eval_ds)[0][0], x_eval)


def test_imagenet_style_resizes_to_image_size():
    config = make_config(source="synthetic", image_size=10, synthetic_examples=8, batch_size=4,
                         augment="imagenet")
    train_ds, _, info = data.datasets(config)
    assert info.image_shape == (10, 10, 3)
    assert next(iter(train_ds))[0].shape == (4, 10, 10, 3)
    crop = data.eval_transform(tf.zeros([2, 40, 60, 3], tf.uint8), 16, "imagenet")
    assert crop.shape == (2, 16, 16, 3) and crop.dtype == tf.uint8


def test_synthetic_is_deterministic_and_learnable():
    config = make_config(source="synthetic", image_size=8, num_classes=4, synthetic_examples=200)
    images, labels = data.raw_examples(config, "train", 200)
    again, _ = data.raw_examples(config, "train", 200)
    np.testing.assert_array_equal(images, again)
    assert images.shape == (200, 8, 8, 3) and images.dtype == np.uint8
    brightness = images.reshape(200, -1).mean(axis=1)
    # Every image of class k is brighter than every image of class k - 1.
    for k in range(1, 4):
        assert brightness[labels == k].min() > brightness[labels == k - 1].max()


# ----------------------------------------------------------------------------- normalize


def test_normalize_numbers():
    images = tf.constant([[[[0, 255], [51, 102]]]], tf.uint8)  # [1, 1, 2, 2]
    out = tf.function(data.normalize)(images, (0.2, 0.4), (0.5, 0.2)).numpy()
    np.testing.assert_allclose(out, [[[[-0.4, 3.0], [0.0, 0.0]]]], atol=1e-6)
    assert out.dtype == np.float32
    np.testing.assert_allclose(data.normalize(np.float32([[127.5]]), (0.5,), (0.25,)), [[0.0]])
    with pytest.raises(ValueError, match=r"Received: std=\(0.0,\)"):
        data.normalize(images, (0.5,), (0.0,))


@settings(max_examples=20, deadline=None)
@given(height=st.integers(1, 12), width=st.integers(1, 12), channels=st.sampled_from([1, 3]),
       size=st.integers(1, 10), style=st.sampled_from(data.AUGMENTS))
def test_eval_transform_and_normalize_invariants(height, width, channels, size, style):
    images = tf.random.uniform([2, height, width, channels], 0, 256, tf.int32, seed=1)
    out = data.eval_transform(tf.cast(images, tf.uint8), size, style)
    assert out.shape == (2, size, size, channels) and out.dtype == tf.uint8
    normed = data.normalize(out, (0.5,) * channels, (0.25,) * channels).numpy()
    assert normed.shape == (2, size, size, channels)
    assert normed.min() >= -2.0 - 1e-6 and normed.max() <= 2.0 + 1e-6


# ----------------------------------------------------------------------------- folder


def write_folder(root, sizes=((6, 5),) * 3):
    rng = np.random.default_rng(0)
    for split, classes in (("train", ("dog", "cat")), ("test", ("cat", "dog"))):
        for name in classes:
            os.makedirs(root / split / name)
            for i, (h, w) in enumerate(sizes):
                pixels = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return str(root)


def test_folder_source(tmp_path):
    config = make_config(source="folder", data_dir=write_folder(tmp_path), batch_size=4,
                         augment="none")
    train_ds, eval_ds, info = data.datasets(config)
    assert (info.num_classes, info.image_shape) == (2, (6, 5, 3))
    assert (info.train_examples, info.eval_examples) == (6, 6)
    assert info.mean == (0.5,) * 3 and info.std == (0.25,) * 3
    images, labels = data.raw_examples(config, "test", 6)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])  # sorted names: cat=0, dog=1
    expected = np.asarray(Image.open(tmp_path / "test" / "cat" / "0.png"))
    np.testing.assert_array_equal(images[0], expected)
    assert [x.shape[0] for x, _ in batches(train_ds)] == [4]


def test_folder_mixed_sizes_need_image_size(tmp_path):
    root = write_folder(tmp_path, sizes=((6, 5), (9, 4)))
    with pytest.raises(data.DataError, match="image_size"):
        data.datasets(make_config(source="folder", data_dir=root, batch_size=2))
    _, _, info = data.datasets(make_config(source="folder", data_dir=root, batch_size=2,
                                           image_size=8))
    assert info.image_shape == (8, 8, 3)


def test_folder_corrupt_image_names_file(tmp_path):
    root = write_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(data.DataError, match="cannot decode") as err:
        data.datasets(make_config(source="folder", data_dir=root, batch_size=2))
    assert str(bad) in str(err.value)


# ----------------------------------------------------------------------------- tfds


def test_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    # mock_data serves random examples but its builders still have to look prepared: give them the
    # real metadata files (written from the builder's own code, no network).
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)
    config = make_config(source="tfds", name="cifar10", data_dir="/unused", batch_size=8,
                         train_subset=20)
    with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path)):
        train_ds, eval_ds, info = data.datasets(config)
        images, labels = data.raw_examples(config, "test", 5)
        train, evals = batches(train_ds), batches(eval_ds)
    assert info == data.DatasetInfo(10, (32, 32, 3), 12, 12, *data.KNOWN_STATS["cifar10"])
    assert [x.shape for x, _ in train] == [(8, 32, 32, 3)]
    assert [x.shape for x, _ in evals] == [(8, 32, 32, 3), (4, 32, 32, 3)]
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int32


def test_tfds_not_prepared_fails_fast(tmp_path):
    config = make_config(source="tfds", name="cifar10", data_dir=str(tmp_path))
    with pytest.raises(data.DataError, match="download=True") as err:
        data.datasets(config)
    assert "'cifar10' is not prepared" in str(err.value) and str(tmp_path) in str(err.value)


def test_tfds_unknown_name(tmp_path):
    config = make_config(source="tfds", name="no_such_dataset_xyz", data_dir=str(tmp_path))
    with pytest.raises(data.DataError, match="Unknown tensorflow-datasets name 'no_such_dataset_xyz'"):
        data.datasets(config)


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("field, value, message", [
    ("source", "csv", "Received: source='csv'"),
    ("augment", "mixup", "Received: augment='mixup'"),
    ("batch_size", 0, "Received: batch_size=0"),
    ("train_subset", -1, "Received: train_subset=-1"),
    ("validation_split", 1.0, "Received: validation_split=1.0"),
])
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        data.datasets(make_config(**{field: value}))


def test_batch_larger_than_train_split_and_bad_stats(tmp_path):
    root = write_idx_dataset(tmp_path, n_train=10)
    with pytest.raises(ValueError, match="Received: batch_size=16"):
        data.datasets(make_config(data_dir=root, batch_size=16))
    with pytest.raises(ValueError, match="one value per channel"):
        data.datasets(make_config(data_dir=root, batch_size=4, mean=(0.5, 0.5), std=(0.2, 0.2)))
    with pytest.raises(ValueError, match="Received: split='val'"):
        data.raw_examples(make_config(data_dir=root), "val", 2)
