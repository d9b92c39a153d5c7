"""Where the examples come from: `load(config.data, split)` -> the split's `Examples` (in its stored order;
`rd_keras.splits` chooses subsets and orders) from one of four sources (`config.data.source`):

- `idx`: Fashion-MNIST style IDX files (raw or gzip), parsed here with numpy and checked strictly.
- `tfds`: any tensorflow-datasets name. It must already be prepared in `data_dir` unless
  `download=True`: offline, `tfds.load` would otherwise retry the network for minutes.
- `folder`: `data_dir/{train,test}/<class>/*.png|jpg`; class names sorted give the labels. Every file is
  decoded once, at start-up, into an in-memory array (a parallel decode: CIFAR-10's 60,000 JPEGs in
  seconds), so an unreadable file fails before training with its path rather than mid-epoch. Meant for
  folders that fit in memory; larger image sets belong in tfds.
- `synthetic`: deterministic noise images whose mean brightness band is the label, so that smoke runs
  can show learning without any files.

Missing, corrupt or unprepared data raise `DataError` naming the file or dataset.
"""

import gzip
import os
import zlib

import numpy as np
import tensorflow as tf

from rd_keras.errors import DataError
from rd_keras.preprocessing import eval_transform

SOURCES = ("idx", "tfds", "folder", "synthetic")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path, ndim):
    """Reads an IDX file of unsigned bytes (magic 0x0800 + ndim), gzip or raw, as a numpy array."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({e.strerror})") from None
    if data[:2] == b"\x1f\x8b":  # gzip magic: detect by content, not by the file name
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header, expected {header} bytes, got {len(data)}")
    magic, expected_magic = int.from_bytes(data[:4], "big"), 0x0800 + ndim
    if magic != expected_magic:
        raise DataError(f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                        f"(IDX unsigned bytes with {ndim} dimension(s))")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path}: IDX dims {dims}: expected {expected} bytes, got {len(data)}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _idx_path(data_dir, stem):
    # Debian ships the .gz files; accept the unpacked ones too.
    for candidate in (stem + ".gz", stem):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    raise DataError(f"{os.path.join(data_dir, stem)}[.gz]: IDX file not found "
                    "(install dataset-fashion-mnist or set config.data.data_dir)")


def _load_idx(cfg, split):
    image_path, label_path = (_idx_path(cfg.data_dir, stem) for stem in _IDX_FILES[split])
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
    if len(labels) != len(images):
        raise DataError(f"{label_path}: label count {len(labels)} != image count {len(images)} "
                        f"in {image_path}")
    if labels.size and labels.max() >= cfg.num_classes:
        raise DataError(f"{label_path}: label {labels.max()} out of range for "
                        f"num_classes={cfg.num_classes}")
    return images[..., None], labels.astype(np.int32), cfg.num_classes


def _folder_classes(root):
    train_dir = os.path.join(root, "train")
    classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d))) \
        if os.path.isdir(train_dir) else []
    if not classes:
        raise DataError(f"{train_dir}: expected one sub-folder per class, found none")
    return classes


def _decode_file(path, channels, image_size):
    try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        raise DataError(f"{path}: cannot decode image ({e.message.splitlines()[0]})") from None
    return eval_transform(image, image_size).numpy()


def _decode_all(paths, channels, image_size):
    """Every file decoded (and resized to `image_size`), in order, by a parallel tf.data map: 60,000 small
    JPEGs take seconds, where a Python loop of eager decodes takes minutes. On a file that fails, the files
    are decoded one by one so that the error names it."""
    def decode(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
        return eval_transform(image, image_size) if image_size else image

    ds = tf.data.Dataset.from_tensor_slices(paths).map(decode, tf.data.AUTOTUNE, deterministic=True)
    try:
        return list(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator())
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        return [_decode_file(path, channels, image_size) for path in paths]


def _load_folder(cfg, split):
    if not cfg.data_dir:  # a config may leave it to the command line (configs/cifar10.py does)
        raise DataError("source='folder' needs config.data.data_dir, the folder holding train/<class>/ and "
                        f"test/<class>/. Received: data_dir={cfg.data_dir!r}")
    classes = _folder_classes(cfg.data_dir)
    split_dir = os.path.join(cfg.data_dir, split)
    labels, paths = [], []
    for name in sorted(os.listdir(split_dir)) if os.path.isdir(split_dir) else []:
        if name not in classes:
            raise DataError(f"{os.path.join(split_dir, name)}: class {name!r} is not in {classes}")
        for file in sorted(os.listdir(os.path.join(split_dir, name))):
            if file.lower().endswith(IMAGE_SUFFIXES):
                paths.append(os.path.join(split_dir, name, file))
                labels.append(classes.index(name))
    if not paths:
        raise DataError(f"{split_dir}: no {'/'.join(IMAGE_SUFFIXES)} images found")
    images = _decode_all(paths, cfg.channels, cfg.image_size)
    for path, image in zip(paths, images):
        if image.shape != images[0].shape:
            raise DataError(f"{path}: size {image.shape} differs from {images[0].shape} of {paths[0]}; "
                            "set config.data.image_size to resize on load")
    return np.stack(images), np.asarray(labels, np.int32), len(classes)


def _load_synthetic(cfg, split):
    if cfg.image_size is None:
        raise ValueError("The synthetic source needs `image_size`. Received: image_size=None")
    n = cfg.synthetic_examples if split == "train" else max(1, cfg.synthetic_examples // 5)
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    labels = rng.integers(0, cfg.num_classes, n).astype(np.int32)
    # Class k has mean brightness in band k of [0, 255]; the noise hides it from single pixels only.
    band = 255.0 / cfg.num_classes
    shape = (n, cfg.image_size, cfg.image_size, cfg.channels)
    images = (labels[:, None, None, None] + 0.5) * band + rng.uniform(-1.5, 1.5, shape) * band
    return np.clip(np.round(images), 0, 255).astype(np.uint8), labels, cfg.num_classes


def _tfds_builder(cfg):
    import tensorflow_datasets as tfds  # slow to import; only the tfds source needs it

    try:
        builder = tfds.builder(cfg.name, data_dir=cfg.data_dir or None)
    except tfds.core.DatasetNotFoundError:
        raise DataError(f"Unknown tensorflow-datasets name {cfg.name!r} (config.data.name); "
                        "see `tfds.list_builders()`") from None
    if not builder.is_prepared():
        if not cfg.download:
            raise DataError(f"tfds dataset {cfg.name!r} is not prepared in {builder.data_dir}: prepare "
                            "it (tfds build) or set config.data.download=True")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=cfg.manual_dir or None))
    return builder


def _load_tfds(cfg, split):
    """The tfds split as a stream, and a function that reads its labels without decoding any image."""
    import tensorflow_datasets as tfds

    builder = _tfds_builder(cfg)
    splits = builder.info.splits
    if split == "test" and splits and "test" not in splits:
        split = "validation"  # imagenet2012 has no labelled test split
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    image_key = builder.info.supervised_keys[0]

    def read_labels():
        skip = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False,
                                  decoders={image_key: tfds.decode.SkipDecoding()})
        return np.concatenate([y for y in skip.map(lambda x, y: y).batch(4096).as_numpy_iterator()])

    return ds, read_labels, builder.info.features["label"].num_classes


def _keep_classes(images, labels, num_classes, classes):
    """The examples whose label is in `classes`, relabelled by position there (a split of a data set into
    disjoint class sets, e.g. for transfer experiments)."""
    if max(classes) >= num_classes:
        raise ValueError(f"`classes` must be labels below num_classes={num_classes}. Received: classes={classes}")
    lookup = np.full(num_classes, -1, np.int32)
    lookup[list(classes)] = np.arange(len(classes), dtype=np.int32)
    keep = lookup[labels] >= 0
    return images[keep], lookup[labels[keep]], len(classes)


class Examples:
    """One split's examples, in their stored order: held in memory as uint8 `images` [N, H, W, C] and int32
    labels (idx, folder, synthetic), or streamed from tfds (labels read on demand, images undecoded).
    `select` keeps a subset by index; `dataset()` gives (uint8 image, int32 label) pairs in order."""

    def __init__(self, num_classes, images=None, labels=None, stream=None, read_labels=None, indices=None):
        self.num_classes = num_classes
        self.images, self._labels = images, labels
        self._stream, self._read_labels, self._indices = stream, read_labels, indices

    @property
    def in_memory(self):
        return self._stream is None

    @property
    def count(self):
        if self.in_memory:
            return len(self._labels)
        if self._indices is not None:
            return len(self._indices)
        count = int(self._stream.cardinality())
        if count < 0:
            raise DataError("Cannot count the examples of this tfds split")
        return count

    def labels(self):
        if self._labels is None:  # tfds: one pass over the labels, once
            self._labels = self._read_labels()
            if self._indices is not None:
                self._labels = self._labels[self._indices]
        return self._labels

    def select(self, indices):
        """The examples at `indices` (positions in this set, ascending)."""
        indices = np.asarray(indices, np.int64)
        labels = None if self._labels is None else self._labels[indices]
        if self.in_memory:
            return Examples(self.num_classes, self.images[indices], labels)
        absolute = indices if self._indices is None else self._indices[indices]
        return Examples(self.num_classes, None, labels, self._stream, self._read_labels, absolute)

    def dataset(self):
        if self.in_memory:
            ds = tf.data.Dataset.from_tensor_slices((self.images, self._labels))
        elif self._indices is None:
            ds = self._stream
        else:
            mask = np.zeros(int(self._indices[-1]) + 1 if len(self._indices) else 0, bool)
            mask[self._indices] = True
            keep = tf.constant(mask)
            ds = self._stream.take(len(mask)).enumerate().filter(lambda i, xy: keep[i]).map(lambda i, xy: xy)
        return ds.map(lambda x, y: (x, tf.cast(y, tf.int32)))


def load(cfg, split):
    """`Examples` of `split` ('train' or 'test') from `config.data.source`, `config.data.classes` applied."""
    if cfg.source == "tfds":
        stream, read_labels, num_classes = _load_tfds(cfg, split)
        return Examples(num_classes, stream=stream, read_labels=read_labels)
    loader = {"idx": _load_idx, "folder": _load_folder, "synthetic": _load_synthetic}[cfg.source]
    images, labels, num_classes = loader(cfg, split)
    if cfg.classes:
        images, labels, num_classes = _keep_classes(images, labels, num_classes, tuple(cfg.classes))
    return Examples(num_classes, images, labels.astype(np.int32))
