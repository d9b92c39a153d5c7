"""The normalisation inside every exported `.tflite`: the file takes uint8 pixels, as a camera gives them.

The nets are trained on `rd_keras.data.normalize(pixels, mean, std, channel_order)`. A `.tflite` that took
that normalised float would leave the mean, the standard deviation and the channel order to app code, where
a mistake is silent. So the exported files take uint8 `[N, H, W, C]` pixels (RGB for colour images, at the
training size) and do the normalisation themselves, in the cheapest exact form each variant allows:

- float files (`none`, `fp16`, `dynamic`): the graph starts with `normalize` itself (cast, subtract,
  divide, and the channel reversal of BGR-trained nets), the same function as the SavedModel's
  `serving_default`.
- full-integer files (`int8`, `qat`) when one mean and one std hold for every channel and the channels are
  not reversed (`Normalisation.uniform`; grey images, or colour nets normalised per image value): the
  uint8 input's quantisation IS the normalisation. A quantised input means `x = (q - zero_point) * scale`;
  with `scale = 1 / (255 std)` and `zero_point = round(255 mean)` that is `(q / 255 - mean) / std` for a
  pixel `q`, so no op is added at all. The zero point is an integer, which moves the mean by less than half
  a pixel level (`pixel_error`); the int8 models that took normalised input rounded the same way.
- full-integer files otherwise (per-channel statistics, BGR reversal): a 1x1 convolution named `normalize`
  (`pixel_model`) holds the reversal (a permutation of its kernel) and the per-channel affine, quantised
  like every other conv (int8 per-channel weights, int32 bias); its uint8 input has scale 1 and zero
  point 0, so it takes the pixels unchanged. One integer conv, no float op.

Calibration images always contain a black and a white pixel (`with_extremes`), so the calibrated input
range is exactly the one above; `tflite_export.convert` checks the file's input quantisation against
`input_quantization` and refuses a file whose quantiser is not the normalisation.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from rd_keras import data
from rd_keras.export import folding

NORMALIZE_LAYER = "normalize"
PIXEL_MAX = 255


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """`rd_keras.data.normalize`'s statistics: `mean`/`std` per channel (in BGR order when reversed)."""

    mean: tuple
    std: tuple
    channel_order: str = "rgb"

    @classmethod
    def of(cls, info):
        """The normalisation a `data.DatasetInfo` (config.json's `dataset` section) records."""
        return cls(tuple(float(m) for m in info.mean), tuple(float(s) for s in info.std), info.channel_order)

    @property
    def uniform(self):
        """One mean and one std for every channel, no reversal: the input quantiser can be the normalisation."""
        return len(set(self.mean)) == 1 and len(set(self.std)) == 1 and self.channel_order == "rgb"

    def normalize(self, images):
        """uint8 (or float) pixels -> the net's input, as training saw it (a tf tensor)."""
        return data.normalize(images, self.mean, self.std, self.channel_order)

    def input_range(self):
        """The real values that pixel 0 and pixel 255 take at the quantised input of a full-integer file."""
        if not self.uniform:
            return 0.0, float(PIXEL_MAX)  # raw pixels into the `normalize` conv
        return -self.mean[0] / self.std[0], (1.0 - self.mean[0]) / self.std[0]

    def input_quantization(self):
        """`(scale, zero_point)` of the uint8 pixel input of a full-integer file."""
        low, high = self.input_range()
        scale = (high - low) / PIXEL_MAX
        return scale, int(round(-low / scale))

    def pixel_error(self):
        """How far (in pixel levels) the integer zero point moves the mean: |round(255 mean) - 255 mean|."""
        if not self.uniform:
            return 0.0
        return abs(self.input_quantization()[1] - PIXEL_MAX * self.mean[0])

    def conv_weights(self, channels):
        """Kernel `[1, 1, C, C]` and bias `[C]` of the 1x1 conv computing `normalize` from float pixels."""
        if len(self.mean) != channels:
            raise ValueError(f"The normalisation has {len(self.mean)} channels, the net takes {channels}. "
                             f"Received: mean={self.mean}")
        kernel = np.zeros((1, 1, channels, channels), np.float32)
        for out in range(channels):
            source = channels - 1 - out if self.channel_order == "bgr" else out
            kernel[0, 0, source, out] = 1.0 / (PIXEL_MAX * self.std[out])
        bias = -np.asarray(self.mean, np.float32) / np.asarray(self.std, np.float32)
        return kernel, bias

    def pixel_model(self, folded):
        """`folded` (normalised images -> logits) behind the `normalize` conv: float pixels -> logits."""
        channels = int(folded.input.shape[-1])
        layer = keras.layers.Conv2D(channels, 1, name=NORMALIZE_LAYER, dtype="float32")
        return folding.behind(layer, list(self.conv_weights(channels)), folded, name=f"{folded.name}_pixels")

    def from_normalised(self, images):
        """The inverse of `normalize`: normalised images -> float pixels (QAT trains on the pipeline's)."""
        pixels = (images * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)) * PIXEL_MAX
        return pixels[..., ::-1] if self.channel_order == "bgr" else pixels

    def describe(self):
        """The normalisation as report.json and the file's metadata record it."""
        return {"mean": list(self.mean), "std": list(self.std), "channel_order": self.channel_order,
                "formula": "(pixels / 255 - mean) / std" + (", channels reversed first (RGB -> BGR)"
                                                            if self.channel_order == "bgr" else "")}


def with_extremes(images):
    """A copy of uint8 `images` whose first image has one black and one white pixel in every channel, so a
    calibration over them sees the whole pixel range."""
    images = np.array(images, np.uint8, copy=True)
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] * images.shape[2] < 2:
        raise ValueError(f"Calibration images must be [N >= 1, H, W, C] with at least 2 pixels. "
                         f"Received: shape={images.shape}")
    images[0, 0, 0, :] = 0
    images[0, -1, -1, :] = PIXEL_MAX
    return images
