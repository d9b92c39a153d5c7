"""TFLite conversion of the folded classifier, and a LiteRT runner that honours each file's input contract.

Every `.tflite` has one signature, `serving_default`, with input `images` `[N, H, W, C]` and output
`probabilities` `[N, classes]` (softmax). With a `pixels.Normalisation` (what the exporter always gives),
`images` are uint8 pixels and the normalisation is inside the file (`rd_keras.export.pixels` says how, per
variant); without one (the bench's timing of the bare net), `images` are normalised float32 images, as
`rd_keras.data.normalize` returns them:

- `none`, `fp16`, `dynamic`: float32 probabilities. `fp16` stores the weights as float16, `dynamic`
  stores them as int8 and quantises activations on the fly; both compute in float where it matters.
- `int8` (post-training) and `qat`: full-integer models, no float tensor. Their output is int8 (or uint8,
  see `IO_TYPES`): `p = (q - zero_point) * scale` with the scale and zero point stored in the file. Their
  input is uint8 pixels; a bare file's is the normalised `x` quantised, `q = round(x / scale) + zero_point`,
  in the `io_type`.

Conversion follows the Keras 3 route TensorFlow documents: `keras.export.ExportArchive` writes a SavedModel
with a single endpoint, then `tf.lite.TFLiteConverter.from_saved_model` converts it. (Converting from a
concrete function keeps the weights as resource variables, which int8 calibration cannot read.)
"""

from __future__ import annotations

import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf
import tqdm

from rd_keras.export import metadata, pixels
from rd_keras.export.quantize import quantization, quantize_input

QUANTIZATIONS = ("none", "fp16", "dynamic", "int8")
IO_TYPES = ("int8", "uint8")
INPUT_NAME, OUTPUT_NAME, SIGNATURE = "images", "probabilities", "serving_default"


def _saved_model(model, image_shape, directory, input_dtype=tf.float32, prepare=None):
    """A SavedModel of `model` (images -> logits) whose one endpoint returns the softmax; `prepare` maps
    the endpoint's input to the model's (the normalisation of a float file that takes pixels)."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    prepare = prepare or (lambda images: images)
    archive.add_endpoint(
        SIGNATURE,
        lambda images: {OUTPUT_NAME: tf.nn.softmax(model(prepare(images), training=False))},
        input_signature=[tf.TensorSpec([None, *image_shape], input_dtype, name=INPUT_NAME)])
    archive.write_out(directory, verbose=False)


def _graph(folded, image_shape, quantize, calibration, normalisation, directory):
    """Writes the SavedModel to convert; returns the images the int8 calibration feeds it (or None)."""
    if normalisation is None:
        _saved_model(folded, image_shape, directory)
        return calibration
    if quantize != "int8":
        _saved_model(folded, image_shape, directory, tf.uint8, normalisation.normalize)
        return None
    # Full integer: the float graph's input is what the quantised uint8 input will mean (pixels.py).
    pixels_in = pixels.with_extremes(calibration)
    if normalisation.uniform:
        _saved_model(folded, image_shape, directory)
        return normalisation.normalize(pixels_in).numpy()
    _saved_model(normalisation.pixel_model(folded), image_shape, directory)
    return pixels_in.astype(np.float32)


def check_pixel_input(payload, normalisation):
    """Refuses a full-integer file whose uint8 input quantiser is not the normalisation."""
    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_content=payload).get_input_details()[0]
    got, (scale, zero_point) = quantization(detail), normalisation.input_quantization()
    if np.dtype(detail["dtype"]) != np.uint8 or got[1] != zero_point or not np.isclose(got[0], scale, rtol=1e-5):
        raise RuntimeError(f"The int8 file's input is {np.dtype(detail['dtype']).name} with (scale, zero_point)"
                           f"={got}, not uint8 pixels with {(scale, zero_point)}: calibration did not see the "
                           "full pixel range.")


def convert(folded, image_shape, quantize, calibration=None, io_type="int8", progress=False,
            normalisation=None):
    """The `.tflite` bytes of `folded` (a float32 logits model) under one of `QUANTIZATIONS`.

    `normalisation`: a `pixels.Normalisation`; the file then takes uint8 pixels and normalises inside,
    and `calibration` is uint8 pixels. Without it the file takes normalised images and `calibration` is
    float32 normalised images. `calibration` `[n, H, W, C]` is required for `int8`, fed one at a time.
    `io_type`: the integer type of the `int8` model's output, and of its input without `normalisation`.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"`quantize` must be one of {QUANTIZATIONS}. Received: quantize={quantize!r}")
    if io_type not in IO_TYPES:
        raise ValueError(f"`io_type` must be one of {IO_TYPES}. Received: io_type={io_type!r}")
    if quantize == "int8" and calibration is None:
        raise ValueError("Full-integer (int8) conversion needs calibration images. Received: "
                         "calibration=None")
    with tempfile.TemporaryDirectory(prefix="rd_keras-tflite-") as directory:
        calibration = _graph(folded, tuple(image_shape), quantize, calibration, normalisation, directory)
        converter = tf.lite.TFLiteConverter.from_saved_model(directory, signature_keys=[SIGNATURE])
        # Only builtin ops: a model that needs the Flex (select TF ops) delegate should fail here, not
        # on a phone.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "int8":
            converter.representative_dataset = lambda: (
                {INPUT_NAME: image[None]} for image in tqdm.tqdm(
                    calibration, desc="int8 calibration", disable=not progress, leave=False,
                    unit="image"))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_output_type = tf.as_dtype(io_type)
            converter.inference_input_type = tf.as_dtype(io_type if normalisation is None else "uint8")
        with warnings.catch_warnings():
            # The converter's own calibrator still uses tf.lite.Interpreter and warns about it; that is
            # TensorFlow's business, and our runtime is ai_edge_litert.
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            payload = converter.convert()
    if quantize == "int8" and normalisation is not None:
        check_pixel_input(payload, normalisation)
    return payload


class TFLiteRunner:
    """Runs a `.tflite` classifier, dequantising its output as the file says.

    A file that records (in its metadata, `rd_keras.export.metadata`) that it takes raw pixels
    (`takes_pixels`, every exported file) is fed the uint8 images unchanged: the normalisation is the
    file's business. A bare file (the bench's) takes normalised float32 images, quantised here for a
    full-integer one. Uses `ai_edge_litert` (the LiteRT runtime), not the deprecated `tf.lite.Interpreter`.
    """

    def __init__(self, path_or_bytes):
        from ai_edge_litert.interpreter import Interpreter

        if isinstance(path_or_bytes, (bytes, bytearray)):
            self._payload = bytes(path_or_bytes)
        else:
            with open(path_or_bytes, "rb") as f:
                self._payload = f.read()
        self.interpreter = Interpreter(model_content=self._payload)
        self.metadata = metadata.read(self._payload)
        self.takes_pixels = self.metadata is not None and not self.metadata["input"]["normalised"]
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._batch = None

    def input_contract(self):
        """The input and output dtypes, shapes and quantisation parameters, as written to report.json."""
        def describe(detail, **extra):
            entry = {"dtype": np.dtype(detail["dtype"]).name,
                     "shape": [int(d) for d in detail["shape_signature"]], **extra}
            scale, zero_point = quantization(detail)
            if scale:
                entry.update(scale=scale, zero_point=zero_point)
            return entry

        signature = self.interpreter.get_signature_list().get(SIGNATURE, {})
        return {"signature": SIGNATURE, "signature_inputs": signature.get("inputs", []),
                "signature_outputs": signature.get("outputs", []),
                "input": describe(self._input, normalised=not self.takes_pixels),
                "output": describe(self._output)}

    def __call__(self, images):
        """uint8 pixels (a file that takes pixels) or float32 normalised images (a bare file)
        `[N, H, W, C]` -> float32 probabilities `[N, classes]`."""
        if self.takes_pixels:
            if np.asarray(images).dtype != np.uint8:
                raise ValueError(f"This file takes uint8 pixels. Received: dtype={np.asarray(images).dtype}")
            feed = np.asarray(images)
        else:
            feed = quantize_input(np.asarray(images, np.float32), self._input)
        if self._batch != len(feed):
            self.interpreter.resize_tensor_input(self._input["index"], [len(feed), *feed.shape[1:]])
            self.interpreter.allocate_tensors()
            self._batch = len(feed)
        self.interpreter.set_tensor(self._input["index"], feed)
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self._output["index"])
        scale, zero_point = quantization(self._output)
        return ((out.astype(np.float32) - zero_point) * scale) if scale else out.astype(np.float32)

    def float_tensors(self):
        """Names of the float tensors in the graph: none in a full-integer model."""
        return [t["name"] for t in self.interpreter.get_tensor_details()
                if np.dtype(t["dtype"]).kind == "f"]

    def op_names(self):
        """The builtin op of every node of the file's graph, in execution order (read from the flatbuffer:
        the interpreter's own list shows a delegate's nodes instead)."""
        return metadata.op_names(self._payload)
