"""Client inputs: a folder of images or an IDX file -> uint8 [N, H, W, C] at the model's input size.

Kept local to rd_keras_serving/ so the clients need neither the training stack nor TensorFlow's data pipeline.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_IDX_UINT8 = 0x08


def _check_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(not isinstance(d, int) or d < 1 for d in shape) or shape[2] not in _PIL_MODES:
        raise ValueError(f"image shape must be (H, W, C) with C in 1, 3 or 4, got {shape!r}")
    return shape


def _resize(image: Image.Image, shape: tuple[int, int, int]) -> np.ndarray:
    height, width, channels = shape
    image = image.convert(_PIL_MODES[channels])
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8).reshape(shape)


def load_image_dir(directory: str, shape: tuple[int, int, int], limit: int | None = None):
    """(file names, uint8 [N, H, W, C]) for the image files in `directory`, in sorted name order."""
    shape = _check_shape(tuple(shape))
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS))[:limit]
    if not names:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {directory!r}")
    images = []
    for name in names:
        try:
            with Image.open(os.path.join(directory, name)) as image:
                images.append(_resize(image, shape))
        except OSError as error:
            raise ValueError(f"cannot decode image {os.path.join(directory, name)!r}: {error}") from error
    return names, np.stack(images)


def load_idx(path: str, limit: int | None = None) -> np.ndarray:
    """The uint8 array in an IDX file (gzipped or raw), e.g. Fashion-MNIST images [N, 28, 28]; first `limit`."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    with (gzip.open if gzipped else open)(path, "rb") as f:
        header = f.read(4)
        if len(header) != 4 or header[:2] != b"\x00\x00":
            raise ValueError(f"{path!r} is not an IDX file (header {header!r})")
        if header[2] != _IDX_UINT8:
            raise ValueError(f"{path!r} holds IDX type 0x{header[2]:02x}, only unsigned bytes (0x08) are supported")
        dims = [int.from_bytes(f.read(4), "big") for _ in range(header[3])]
        if not dims:
            raise ValueError(f"{path!r} is a zero-dimensional IDX file")
        if limit is not None:
            dims[0] = min(dims[0], limit)
        count = int(np.prod(dims))
        data = f.read(count)
    if len(data) != count:
        raise ValueError(f"{path!r} is truncated: expected {count} bytes of data for shape {dims}, got {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def fit_images(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 [N, h, w] or [N, h, w, c] -> [N, H, W, C], resizing and converting channels only when needed."""
    shape = _check_shape(tuple(shape))
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in _PIL_MODES:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C] with C in 1, 3, 4, got {images.shape}")
    if images.shape[1:] == shape:
        return images
    # PIL wants single-channel images as 2-D arrays.
    planes = images[..., 0] if images.shape[3] == 1 else images
    return np.stack([_resize(Image.fromarray(plane), shape) for plane in planes])
