"""The int8 input quantiser of full-integer `.tflite` models (numpy only, so a measuring process can use it
without loading TensorFlow): used by `tflite_export.TFLiteRunner` and by the bench's LiteRT runs."""

import numpy as np


def quantization(detail):
    """`(scale, zero_point)` of an interpreter tensor `detail`; scale 0.0 for a float tensor."""
    scale, zero_point = detail["quantization"]
    return float(scale), int(zero_point)


def quantize_input(images, detail):
    """float32 normalised images -> the dtype of the interpreter input `detail` (an entry of
    `get_input_details()`): `q = round(x / scale) + zero_point`, clipped to the dtype, for a full-integer
    model; a plain cast for a float model."""
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = quantization(detail)
    if not scale:
        return images.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(images / scale) + zero_point, info.min, info.max).astype(dtype)
