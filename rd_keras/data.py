"""Input pipelines: the train passes, the eval and test batches, and the statistics of the one
normalisation used from training to serving.

The examples come from `rd_keras.data_sources` (`config.data.source`: idx, tfds, folder, synthetic); the
resize, normalisation and augmentations are `rd_keras.preprocessing`'s (`normalize`, `eval_transform` and
`read_idx` are importable from here too, as the public API of `rd_keras.data`).

Data problems (missing, corrupt or unprepared data) raise `DataError`; bad config values raise
`ValueError` quoting the received value.

Normalisation (`normalization`): `dataset` takes `mean`/`std` from the config when given, else the
published values for the known datasets (by `name`), else 0.5/0.25 per channel, which maps [0, 255]
roughly onto [-2, 2]. A pretrained teacher dictates its own: `caffe` (keras.applications ResNets:
RGB -> BGR, then the ImageNet mean subtracted from [0, 255] pixels) or `torch` (ImageNet mean/std on
[0, 1]).
"""

import dataclasses

import numpy as np
import tensorflow as tf

from rd_keras import data_sources, defaults, preprocessing, splits
from rd_keras.data_sources import SOURCES, SPLITS, read_idx  # noqa: F401 (read_idx: public API)
from rd_keras.errors import DataError  # noqa: F401 (public API: data.DataError)
from rd_keras.preprocessing import eval_transform, normalize

AUGMENTS = ("cifar", "imagenet", "none")
KNOWN_STATS = {
    **defaults.CIFAR_STATS,
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
GENERIC_MEAN, GENERIC_STD = 0.5, 0.25
NORMALIZATIONS = ("dataset", "caffe", "torch")
# keras.applications.resnet.preprocess_input: BGR pixels minus the ImageNet BGR mean, scale kept. As
# `normalize`'s (x / 255 - mean) / std, in BGR order:
CAFFE_STATS = (tuple(m / 255.0 for m in (103.939, 116.779, 123.68)), (1.0 / 255.0,) * 3)


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


def check_config(cfg):
    """Raises ValueError quoting the first `config.data` value that cannot work; reads no file."""
    if cfg.source not in SOURCES:
        raise ValueError(f"`source` must be one of {SOURCES}. Received: source={cfg.source!r}")
    if cfg.augment not in AUGMENTS:
        raise ValueError(f"`augment` must be one of {AUGMENTS}. Received: augment={cfg.augment!r}")
    for field in ("batch_size", "shuffle_buffer", "channels", "num_classes", "synthetic_examples"):
        if not isinstance(cfg[field], int) or cfg[field] < 1:
            raise ValueError(f"`{field}` must be a positive integer. Received: {field}={cfg[field]!r}")
    for field in ("train_subset", "eval_subset", "split_seed"):
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
        return preprocessing.pad_crop_flip(image, seed)
    # Without image_size the native size is static here (`_image_shape` rejects varying sizes).
    return preprocessing.random_resized_crop_flip(image, cfg.image_size or image.shape[0], seed)


def _train_examples(ds, cfg):
    """The train examples before any per-pass randomness: resized (except for the ImageNet crop, which
    samples from the full-resolution image) and cached."""
    if cfg.augment != "imagenet":
        ds = ds.map(lambda x, y: (eval_transform(x, cfg.image_size), y), tf.data.AUTOTUNE)
    return ds.cache() if cfg.cache else ds


def _train_pass(ds, cfg, epoch, skip_examples, shuffle_buffer):
    """Pass `epoch` over the train examples, shuffled and augmented, its first `skip_examples` left out.

    Order and augmentation depend on (data.seed, epoch) alone, not on how many passes this process has
    made: a resumed run rebuilds exactly the pass it stopped in and skips what it already trained on
    (before augmentation, so skipping costs no image work). A `shuffle_buffer` as large as the data set
    makes the order a full random permutation: what in-memory data gets (a smaller buffer over an image
    folder, listed class by class, would feed batches of one or two classes).
    """
    shuffle_seed, augment_seed = (int(k) for k in np.random.default_rng([cfg.seed, epoch]).integers(
        0, 2**31 - 1, size=2))
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
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

    def __init__(self, examples, cfg, mean, std, batches_per_pass, channel_order="rgb", shuffle_buffer=None):
        self._examples, self._cfg, self._mean, self._std = examples, cfg, mean, std
        self._channel_order = channel_order
        self._shuffle_buffer = shuffle_buffer or cfg.shuffle_buffer
        self.batches_per_pass = batches_per_pass

    def one_pass(self, epoch, skip_batches=0):
        """Pass `epoch` without its first `skip_batches` batches: a run resumed at global step s continues
        with exactly the batches an uninterrupted run would have seen,
        `one_pass(s // batches_per_pass, s % batches_per_pass)`, then `one_pass(s // batches_per_pass + 1)`."""
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(skip_batches, int)
                and 0 <= skip_batches < self.batches_per_pass):
            raise ValueError(f"Need an integer epoch >= 0 and 0 <= skip_batches < {self.batches_per_pass}. "
                             f"Received: epoch={epoch!r}, skip_batches={skip_batches!r}")
        ds = _train_pass(self._examples, self._cfg, epoch, skip_batches * self._cfg.batch_size,
                         self._shuffle_buffer)
        return _normalize_batches(ds.batch(self._cfg.batch_size, drop_remainder=True), self._mean, self._std,
                                  self._channel_order)


def _subset(examples, n, cfg):
    """A seeded, class-stratified random `n` of `examples` (all of them for n = 0 or n >= their count)."""
    if not n or n >= examples.count:
        return examples
    return examples.select(splits.stratified_indices(examples.labels(), n, cfg.split_seed))


def _split_examples(cfg):
    """`(train, evals)` Examples: the train split's `train_subset`, less a stratified `validation_split` of
    it when set (then `evals`), else the test split; `evals` cut to `eval_subset`."""
    train = _subset(data_sources.load(cfg, "train"), cfg.train_subset, cfg)
    if cfg.validation_split:
        keep, held_out = splits.holdout(train.labels(), cfg.validation_split, cfg.split_seed)
        train, evals = train.select(keep), train.select(held_out)
    else:
        evals = data_sources.load(cfg, "test")
    return train, _subset(evals, cfg.eval_subset, cfg)


def pipelines(config):
    """Returns `(train_passes, eval_ds, info)`: a `TrainPasses`, and eval batches (the remainder kept) of
    (float32 normalised images, int32 labels). `batch_size` is the global batch size."""
    cfg = config.data
    check_config(cfg)
    train, evals = _split_examples(cfg)
    train_count, train_ds = train.count, train.dataset()
    image_shape = _image_shape(train_ds, cfg)
    mean, std, order = _stats(cfg, image_shape[-1])
    if train_count < cfg.batch_size:
        raise ValueError(f"`batch_size` exceeds the {train_count} train examples, so an epoch would be "
                         f"empty. Received: batch_size={cfg.batch_size}")
    passes = TrainPasses(_train_examples(train_ds, cfg), cfg, mean, std, train_count // cfg.batch_size, order,
                         shuffle_buffer=train_count if train.in_memory else None)
    eval_ds = _normalize_batches(_eval_pipeline(evals.dataset(), cfg).batch(cfg.batch_size), mean, std, order)
    split = "validation" if cfg.validation_split else "test"
    return passes, eval_ds, DatasetInfo(train.num_classes, image_shape, train_count, evals.count, mean, std,
                                        split, order)


def test_dataset(config, info):
    """`(test batches, count)`, normalised like the eval batches of `pipelines(config)` (whose `info` is
    given): for the one final test evaluation of a run that chose on a validation split."""
    cfg = config.data
    test = _subset(data_sources.load(cfg, "test"), cfg.eval_subset, cfg)
    return _normalize_batches(_eval_pipeline(test.dataset(), cfg).batch(cfg.batch_size), info.mean, info.std,
                              info.channel_order), test.count


def datasets(config):
    """Returns `(train_ds, eval_ds, info)` as `pipelines` does, with `train_ds` its first pass alone
    (iterating it again repeats that pass; `pipelines(config)[0].one_pass(e)` gives the others)."""
    passes, eval_ds, info = pipelines(config)
    return passes.one_pass(0), eval_ds, info


def raw_examples(config, split, n):
    """`n` examples of `split` ('train' or 'test'; all of it if smaller), a seeded class-stratified random
    choice kept in the split's order, without augmentation: uint8 images `[n, H, W, C]` after
    `eval_transform`, and int32 labels (int8 calibration images and the export's test images)."""
    cfg = config.data
    check_config(cfg)
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}. Received: split={split!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive integer. Received: n={n!r}")
    ds = _subset(data_sources.load(cfg, split), n, cfg).dataset()
    _image_shape(ds, cfg)  # rejects varying sizes without image_size
    ds = ds.map(lambda x, y: (eval_transform(x, cfg.image_size, cfg.augment), y))
    images, labels = zip(*ds.as_numpy_iterator())
    return np.stack(images), np.asarray(labels, np.int32)
