"""Input pipelines: sources, augmentation and the one normalisation used from training to serving.

Four sources, chosen by `config.data.source`:

- `idx`: Fashion-MNIST style IDX files (raw or gzip), parsed here with numpy and checked strictly.
- `tfds`: any tensorflow-datasets name. It must already be prepared in `data_dir` unless
  `download=True`: offline, `tfds.load` would otherwise retry the network for minutes.
- `folder`: `data_dir/{train,test}/<class>/*.png|jpg`; class names sorted give the labels. Every file is
  decoded once, eagerly, into an in-memory array, so an unreadable file fails at start-up with its path
  rather than mid-epoch. Meant for small folders; large image sets belong in tfds.
- `synthetic`: deterministic noise images whose mean brightness band is the label, so that smoke runs
  can show learning without any files.

Data problems (missing, corrupt or unprepared data) raise `DataError`; bad config values raise
`ValueError` quoting the received value.

Normalisation (`normalization`): `dataset` takes `mean`/`std` from the config when given, else the
published values for the known datasets (by `name`), else 0.5/0.25 per channel, which maps [0, 255]
roughly onto [-2, 2]. A pretrained teacher dictates its own: `caffe` (keras.applications ResNets:
RGB -> BGR, then the ImageNet mean subtracted from [0, 255] pixels) or `torch` (ImageNet mean/std on
[0, 1]). Every mode is `normalize`'s one affine map, after an optional channel reversal, so training,
export and serving share it.
"""

import dataclasses
import gzip
import os
import zlib

import numpy as np
import tensorflow as tf

from rd_keras.errors import DataError  # noqa: F401

SOURCES = ("idx", "tfds", "folder", "synthetic")
AUGMENTS = ("cifar", "imagenet", "none")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
KNOWN_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
GENERIC_MEAN, GENERIC_STD = 0.5, 0.25
NORMALIZATIONS = ("dataset", "caffe", "torch")
CHANNEL_ORDERS = ("rgb", "bgr")
# keras.applications.resnet.preprocess_input: BGR pixels minus the ImageNet BGR mean, scale kept. As
# `normalize`'s (x / 255 - mean) / std, in BGR order:
CAFFE_STATS = (tuple(m / 255.0 for m in (103.939, 116.779, 123.68)), (1.0 / 255.0,) * 3)
# ImageNet evaluation: resize the shorter side to image_size / 0.875, then centre-crop (256 -> 224).
CENTER_CROP_FRACTION = 0.875
CIFAR_PAD = 4
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}



@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_shape: tuple  # (H, W, C) of the images fed to the model
    train_examples: int
    eval_examples: int
    mean: tuple
    std: tuple
    eval_split: str = "test"  # "validation" when `validation_split` holds out part of the train split
    channel_order: str = "rgb"  # "bgr": channels reversed before `mean`/`std` (given in BGR order) apply


# ----------------------------------------------------------------------------- preprocessing


def normalize(images, mean, std, channel_order="rgb"):
    """`(images / 255 - mean) / std` as float32; pixel values in [0, 255], uint8 or float, any rank.

    `channel_order="bgr"` first reverses the channel axis (RGB images in, BGR out, as Caffe-era nets
    expect); `mean` and `std` are then in BGR order."""
    if len(mean) != len(std) or not mean:
        raise ValueError(f"`mean` and `std` must be non-empty and of equal length. "
                         f"Received: mean={mean}, std={std}")
    if min(std) <= 0:
        raise ValueError(f"`std` must be positive. Received: std={std}")
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"`channel_order` must be one of {CHANNEL_ORDERS}. "
                         f"Received: channel_order={channel_order!r}")
    images = tf.cast(images, tf.float32) / 255.0
    if channel_order == "bgr":
        images = images[..., ::-1]
    return (images - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def eval_transform(images, image_size, style="none"):
    """Deterministic resize to `image_size` for evaluation and serving; [H, W, C] or [N, H, W, C].

    `style="imagenet"` resizes the shorter side to `image_size / 0.875` then centre-crops; any other
    style resizes straight to `image_size`. Images already at that size pass through untouched. The
    output keeps the input dtype (uint8 is rounded back), so `raw_examples` and the eval pipeline
    feed `normalize` identical pixels.
    """
    images = tf.convert_to_tensor(images)
    if image_size is None:
        return images
    if style != "imagenet" and tuple(images.shape[-3:-1]) == (image_size, image_size):
        return images
    if style == "imagenet":
        hw = tf.cast(tf.shape(images)[-3:-1], tf.float32)
        scale = image_size / CENTER_CROP_FRACTION / tf.reduce_min(hw)
        new_hw = tf.cast(tf.round(hw * scale), tf.int32)
        resized = tf.image.resize(images, new_hw, antialias=True)
        top, left = (new_hw[0] - image_size) // 2, (new_hw[1] - image_size) // 2
        resized = tf.image.crop_to_bounding_box(resized, top, left, image_size, image_size)
    else:
        resized = tf.image.resize(images, [image_size, image_size], antialias=True)
    if images.dtype == tf.uint8:
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    return tf.cast(resized, images.dtype)


def _pad_crop_flip(image, seed):
    # Zero (black) padding before normalisation, as in the usual CIFAR recipe.
    seeds = tf.random.experimental.stateless_split(seed, 2)
    padded = tf.pad(image, [[CIFAR_PAD, CIFAR_PAD], [CIFAR_PAD, CIFAR_PAD], [0, 0]])
    # The static shape keeps batches well-defined; it is always known here (see `_image_shape`).
    image = tf.image.stateless_random_crop(padded, image.shape, seed=seeds[0])
    return tf.image.stateless_random_flip_left_right(image, seed=seeds[1])


def _random_resized_crop_flip(image, image_size, seed):
    seeds = tf.random.experimental.stateless_split(seed, 2)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seeds[0],
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.image.resize(tf.slice(image, begin, size), [image_size, image_size], antialias=True)
    return tf.image.stateless_random_flip_left_right(crop, seed=seeds[1])


# ----------------------------------------------------------------------------- sources


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


def _load_folder(cfg, split):
    classes = _folder_classes(cfg.data_dir)
    split_dir = os.path.join(cfg.data_dir, split)
    images, labels, paths = [], [], []
    for name in sorted(os.listdir(split_dir)) if os.path.isdir(split_dir) else []:
        if name not in classes:
            raise DataError(f"{os.path.join(split_dir, name)}: class {name!r} is not in {classes}")
        for file in sorted(os.listdir(os.path.join(split_dir, name))):
            if file.lower().endswith(IMAGE_SUFFIXES):
                paths.append(os.path.join(split_dir, name, file))
                images.append(_decode_file(paths[-1], cfg.channels, cfg.image_size))
                labels.append(classes.index(name))
    if not images:
        raise DataError(f"{split_dir}: no {'/'.join(IMAGE_SUFFIXES)} images found")
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
    builder = _tfds_builder(cfg)
    splits = builder.info.splits
    if split == "test" and splits and "test" not in splits:
        split = "validation"  # imagenet2012 has no labelled test split
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    return ds, builder.info.features["label"].num_classes


def _keep_classes(images, labels, num_classes, classes):
    """The examples whose label is in `classes`, relabelled by position there (a split of a data set into
    disjoint class sets, e.g. for transfer experiments)."""
    if max(classes) >= num_classes:
        raise ValueError(f"`classes` must be labels below num_classes={num_classes}. Received: classes={classes}")
    lookup = np.full(num_classes, -1, np.int32)
    lookup[list(classes)] = np.arange(len(classes), dtype=np.int32)
    keep = lookup[labels] >= 0
    return images[keep], lookup[labels[keep]], len(classes)


def _load(cfg, split, limit):
    """Unbatched (uint8 image, int32 label) dataset of the first `limit` examples (0 = all), its size
    and the number of classes."""
    if cfg.source == "tfds":
        ds, num_classes = _load_tfds(cfg, split)
    else:
        loader = {"idx": _load_idx, "folder": _load_folder, "synthetic": _load_synthetic}[cfg.source]
        images, labels, num_classes = loader(cfg, split)
        if cfg.classes:
            images, labels, num_classes = _keep_classes(images, labels, num_classes, tuple(cfg.classes))
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
    ds = ds.take(limit) if limit else ds
    count = int(ds.cardinality())
    if count < 0:
        raise DataError(f"Cannot count the {split!r} examples of {cfg.source}:{cfg.name}")
    return ds.map(lambda x, y: (x, tf.cast(y, tf.int32))), count, num_classes


# ----------------------------------------------------------------------------- public API


def check_config(cfg):
    """Raises ValueError quoting the first `config.data` value that cannot work; reads no file."""
    if cfg.source not in SOURCES:
        raise ValueError(f"`source` must be one of {SOURCES}. Received: source={cfg.source!r}")
    if cfg.augment not in AUGMENTS:
        raise ValueError(f"`augment` must be one of {AUGMENTS}. Received: augment={cfg.augment!r}")
    for field in ("batch_size", "shuffle_buffer", "channels", "num_classes", "synthetic_examples"):
        if not isinstance(cfg[field], int) or cfg[field] < 1:
            raise ValueError(f"`{field}` must be a positive integer. Received: {field}={cfg[field]!r}")
    for field in ("train_subset", "eval_subset"):
        if not isinstance(cfg[field], int) or cfg[field] < 0:
            raise ValueError(f"`{field}` must be an integer >= 0. Received: {field}={cfg[field]!r}")
    if not isinstance(cfg.validation_split, (int, float)) or not 0 <= cfg.validation_split < 1:
        raise ValueError(f"`validation_split` must be a fraction in [0, 1). "
                         f"Received: validation_split={cfg.validation_split!r}")
    classes = tuple(cfg.classes)
    if classes and (cfg.source == "tfds" or len(set(classes)) != len(classes) or len(classes) < 2
                    or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in classes)):
        raise ValueError(f"`classes` must be () or at least two distinct integer labels >= 0, for the idx, folder "
                         f"or synthetic source. Received: classes={cfg.classes!r} with source={cfg.source!r}")
    if cfg.image_size is not None and (not isinstance(cfg.image_size, int) or cfg.image_size < 1):
        raise ValueError(f"`image_size` must be None or a positive integer. "
                         f"Received: image_size={cfg.image_size!r}")
    if cfg.normalization not in NORMALIZATIONS:
        raise ValueError(f"`normalization` must be one of {NORMALIZATIONS}. "
                         f"Received: normalization={cfg.normalization!r}")
    if cfg.normalization != "dataset" and (cfg.mean or cfg.std):
        raise ValueError(f"`mean` and `std` apply to normalization='dataset' only; {cfg.normalization!r} "
                         f"fixes its own. Received: mean={cfg.mean!r}, std={cfg.std!r}")


def _stats(cfg, channels):
    """`(mean, std, channel_order)` of `normalize` for `config.data`."""
    if cfg.normalization != "dataset":
        if channels != 3:
            raise ValueError(f"normalization={cfg.normalization!r} is for RGB images (3 channels), these have "
                             f"{channels}. Received: normalization={cfg.normalization!r}")
        if cfg.normalization == "caffe":
            return (*CAFFE_STATS, "bgr")
        return (*KNOWN_STATS["imagenet2012"], "rgb")
    if cfg.mean or cfg.std:
        mean, std = tuple(map(float, cfg.mean)), tuple(map(float, cfg.std))
    elif cfg.source in ("idx", "tfds") and cfg.name in KNOWN_STATS:
        mean, std = KNOWN_STATS[cfg.name]
    else:
        mean, std = (GENERIC_MEAN,) * channels, (GENERIC_STD,) * channels
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"`mean` and `std` need one value per channel ({channels}). "
                         f"Received: mean={mean}, std={std}")
    return mean, std, "rgb"


def _image_shape(ds, cfg):
    height, width, channels = ds.element_spec[0].shape
    if cfg.image_size is None and (height is None or width is None):
        raise ValueError(f"{cfg.source}:{cfg.name} has images of varying size; set `image_size`. "
                         f"Received: image_size=None")
    size = cfg.image_size
    return (size, size, channels) if size else (height, width, channels)


def _augment(image, seed, cfg):
    if cfg.augment == "cifar":
        return _pad_crop_flip(image, seed)
    # Without image_size the native size is static here (`_image_shape` rejects varying sizes).
    return _random_resized_crop_flip(image, cfg.image_size or image.shape[0], seed)


def _train_examples(ds, cfg):
    """The train examples before any per-pass randomness: resized (except for the ImageNet crop, which
    samples from the full-resolution image) and cached."""
    if cfg.augment != "imagenet":
        ds = ds.map(lambda x, y: (eval_transform(x, cfg.image_size), y), tf.data.AUTOTUNE)
    return ds.cache() if cfg.cache else ds


def _train_pass(ds, cfg, epoch, skip_examples):
    """Pass `epoch` over the train examples, shuffled and augmented, its first `skip_examples` left out.

    Order and augmentation depend on (data.seed, epoch) alone, not on how many passes this process has
    made: a resumed run rebuilds exactly the pass it stopped in and skips what it already trained on
    (before augmentation, so skipping costs no image work).
    """
    shuffle_seed, augment_seed = (int(k) for k in np.random.default_rng([cfg.seed, epoch]).integers(
        0, 2**31 - 1, size=2))
    ds = ds.shuffle(cfg.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.enumerate().skip(skip_examples)
    if cfg.augment == "none":
        return ds.map(lambda i, xy: xy)
    # Stateless ops seeded by (pass seed, position in the pass): reproducible, fresh draws each pass.
    return ds.map(lambda i, xy: (_augment(xy[0], tf.stack([tf.constant(augment_seed, tf.int64), i]), cfg),
                                 xy[1]), tf.data.AUTOTUNE)


def _eval_pipeline(ds, cfg):
    ds = ds.map(lambda x, y: (eval_transform(x, cfg.image_size, cfg.augment), y), tf.data.AUTOTUNE)
    return ds.cache() if cfg.cache else ds


def _normalize_batches(ds, mean, std, channel_order="rgb"):
    # Normalising whole batches is cheaper than per image.
    ds = ds.map(lambda x, y: (normalize(x, mean, std, channel_order), y), tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


class TrainPasses:
    """The train split as numbered passes (epochs). Pass e is shuffled and augmented from seeds derived
    from (data.seed, e) alone, so any pass can be rebuilt exactly, in any process. A pass has
    `batches_per_pass = train_examples // batch_size` batches (the remainder is dropped)."""

    def __init__(self, examples, cfg, mean, std, batches_per_pass, channel_order="rgb"):
        self._examples, self._cfg, self._mean, self._std = examples, cfg, mean, std
        self._channel_order = channel_order
        self.batches_per_pass = batches_per_pass

    def one_pass(self, epoch, skip_batches=0):
        """Pass `epoch` without its first `skip_batches` batches: a run resumed at global step s continues
        with exactly the batches an uninterrupted run would have seen,
        `one_pass(s // batches_per_pass, s % batches_per_pass)`, then `one_pass(s // batches_per_pass + 1)`."""
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(skip_batches, int)
                and 0 <= skip_batches < self.batches_per_pass):
            raise ValueError(f"Need an integer epoch >= 0 and 0 <= skip_batches < {self.batches_per_pass}. "
                             f"Received: epoch={epoch!r}, skip_batches={skip_batches!r}")
        ds = _train_pass(self._examples, self._cfg, epoch, skip_batches * self._cfg.batch_size)
        return _normalize_batches(ds.batch(self._cfg.batch_size, drop_remainder=True), self._mean, self._std,
                                  self._channel_order)


def pipelines(config):
    """Returns `(train_passes, eval_ds, info)`: a `TrainPasses`, and eval batches (the remainder kept) of
    (float32 normalised images, int32 labels). `batch_size` is the global batch size."""
    cfg = config.data
    check_config(cfg)
    train, train_count, num_classes = _load(cfg, "train", cfg.train_subset)
    if cfg.validation_split:
        # As keras' `fit(validation_split=...)`: the last fraction of the examples, before any shuffling.
        held_out = int(round(train_count * cfg.validation_split))
        if not 0 < held_out < train_count:
            raise ValueError(f"`validation_split` holds out {held_out} of {train_count} train examples; "
                             f"both parts must be non-empty. Received: validation_split={cfg.validation_split}")
        evals, train = train.skip(train_count - held_out), train.take(train_count - held_out)
        evals = evals.take(cfg.eval_subset) if cfg.eval_subset else evals
        eval_count, train_count = min(held_out, cfg.eval_subset or held_out), train_count - held_out
    else:
        evals, eval_count, _ = _load(cfg, "test", cfg.eval_subset)
    image_shape = _image_shape(train, cfg)
    mean, std, order = _stats(cfg, image_shape[-1])
    if train_count < cfg.batch_size:
        raise ValueError(f"`batch_size` exceeds the {train_count} train examples, so an epoch would be "
                         f"empty. Received: batch_size={cfg.batch_size}")
    passes = TrainPasses(_train_examples(train, cfg), cfg, mean, std, train_count // cfg.batch_size, order)
    eval_ds = _normalize_batches(_eval_pipeline(evals, cfg).batch(cfg.batch_size), mean, std, order)
    split = "validation" if cfg.validation_split else "test"
    return passes, eval_ds, DatasetInfo(num_classes, image_shape, train_count, eval_count, mean, std, split,
                                        order)


def test_dataset(config, info):
    """`(test batches, count)`, normalised like the eval batches of `pipelines(config)` (whose `info` is
    given): for the one final test evaluation of a run that chose on a validation split."""
    cfg = config.data
    ds, count, _ = _load(cfg, "test", cfg.eval_subset)
    return _normalize_batches(_eval_pipeline(ds, cfg).batch(cfg.batch_size), info.mean, info.std,
                              info.channel_order), count


def datasets(config):
    """Returns `(train_ds, eval_ds, info)` as `pipelines` does, with `train_ds` its first pass alone
    (iterating it again repeats that pass; `pipelines(config)[0].one_pass(e)` gives the others)."""
    passes, eval_ds, info = pipelines(config)
    return passes.one_pass(0), eval_ds, info


def raw_examples(config, split, n):
    """The first `n` examples of `split` ('train' or 'test', fewer if the split is smaller), without
    augmentation: uint8 images `[n, H, W, C]` after `eval_transform`, and int32 labels."""
    cfg = config.data
    check_config(cfg)
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}. Received: split={split!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive integer. Received: n={n!r}")
    ds, _, _ = _load(cfg, split, n)
    _image_shape(ds, cfg)  # rejects varying sizes without image_size
    ds = ds.map(lambda x, y: (eval_transform(x, cfg.image_size, cfg.augment), y))
    images, labels = zip(*ds.as_numpy_iterator())
    return np.stack(images), np.asarray(labels, np.int32)
