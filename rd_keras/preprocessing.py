"""Image preprocessing shared from training to serving: the one normalisation (`normalize`), the
deterministic resize of evaluation and serving (`eval_transform`), and the train-time augmentations.

Every normalisation mode of `config.data.normalization` is `normalize`'s one affine map, after an optional
channel reversal, so training, export and serving share it (`rd_keras.data` chooses its statistics). The
augmentations are stateless: their randomness is the `seed` they are given (`rd_keras.data` derives it from
(data.seed, pass, position)), so a resumed run draws exactly what an uninterrupted one would.
"""

import tensorflow as tf

CHANNEL_ORDERS = ("rgb", "bgr")
# ImageNet evaluation: resize the shorter side to image_size / 0.875, then centre-crop (256 -> 224).
CENTER_CROP_FRACTION = 0.875
CIFAR_PAD = 4


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


def pad_crop_flip(image, seed):
    # Zero (black) padding before normalisation, as in the usual CIFAR recipe.
    seeds = tf.random.experimental.stateless_split(seed, 2)
    padded = tf.pad(image, [[CIFAR_PAD, CIFAR_PAD], [CIFAR_PAD, CIFAR_PAD], [0, 0]])
    # The static shape keeps batches well-defined; it is always known here (see `_image_shape`).
    image = tf.image.stateless_random_crop(padded, image.shape, seed=seeds[0])
    return tf.image.stateless_random_flip_left_right(image, seed=seeds[1])


def random_resized_crop_flip(image, image_size, seed):
    seeds = tf.random.experimental.stateless_split(seed, 2)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seeds[0],
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.image.resize(tf.slice(image, begin, size), [image_size, image_size], antialias=True)
    return tf.image.stateless_random_flip_left_right(crop, seed=seeds[1])
