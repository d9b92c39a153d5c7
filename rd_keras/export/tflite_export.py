"""TFLite conversion of the folded classifier, and a LiteRT runner that honours each file's input contract.

Every `.tflite` has one signature, `serving_default`, with input `images` `[N, H, W, C]` (normalised images,
as `rd_keras.data.normalize` returns them) and output `probabilities` `[N, classes]` (softmax):

- `none`, `fp16`, `dynamic`: float32 input and output. `fp16` stores the weights as float16, `dynamic`
  stores them as int8 and quantises activations on the fly; both compute in float where it matters.
- `int8` (post-training) and `qat`: full-integer models. Input and output are int8 (or uint8, see
  `IO_TYPES`), quantised with the scale and zero point stored in the file: `q = round(x / scale) + zero_point`
  for the normalised input `x`, `p = (q - zero_point) * scale` for the output probabilities.

Conversion follows the Keras 3 route TensorFlow documents: `keras.export.ExportArchive` writes a SavedModel
with a single float32 endpoint, then `tf.lite.TFLiteConverter.from_saved_model` converts it. (Converting
from a concrete function keeps the weights as resource variables, which int8 calibration cannot read.)
"""

from __future__ import annotations

import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf
import tqdm

from rd_keras.export.quantize import quantization, quantize_input

QUANTIZATIONS = ("none", "fp16", "dynamic", "int8")
IO_TYPES = ("int8", "uint8")
INPUT_NAME, OUTPUT_NAME, SIGNATURE = "images", "probabilities", "serving_default"


def _float_saved_model(folded, image_shape, directory):
    archive = keras.export.ExportArchive()
    archive.track(folded)
    archive.add_endpoint(
        SIGNATURE,
        lambda images: {OUTPUT_NAME: tf.nn.softmax(folded(images, training=False))},
        input_signature=[tf.TensorSpec([None, *image_shape], tf.float32, name=INPUT_NAME)])
    archive.write_out(directory, verbose=False)


def convert(folded, image_shape, quantize, calibration=None, io_type="int8", progress=False):
    """The `.tflite` bytes of `folded` (a float32 logits model) under one of `QUANTIZATIONS`.

    `calibration`: float32 normalised images `[n, H, W, C]`, required for `int8`, fed one at a time.
    `io_type`: the integer type of the `int8` model's input and output.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"`quantize` must be one of {QUANTIZATIONS}. Received: quantize={quantize!r}")
    if io_type not in IO_TYPES:
        raise ValueError(f"`io_type` must be one of {IO_TYPES}. Received: io_type={io_type!r}")
    if quantize == "int8" and calibration is None:
        raise ValueError("Full-integer (int8) conversion needs calibration images. Received: "
                         "calibration=None")
    with tempfile.TemporaryDirectory(prefix="rd_keras-tflite-") as directory:
        _float_saved_model(folded, tuple(image_shape), directory)
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
            converter.inference_input_type = converter.inference_output_type = tf.as_dtype(io_type)
        with warnings.catch_warnings():
            # The converter's own calibrator still uses tf.lite.Interpreter and warns about it; that is
            # TensorFlow's business, and our runtime is ai_edge_litert.
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            return converter.convert()


class TFLiteRunner:
    """Runs a `.tflite` classifier on float32 normalised images, quantising/dequantising as the file says.

    Uses `ai_edge_litert` (the LiteRT runtime), not the deprecated `tf.lite.Interpreter`.
    """

    def __init__(self, path_or_bytes):
        from ai_edge_litert.interpreter import Interpreter

        if isinstance(path_or_bytes, (bytes, bytearray)):
            self.interpreter = Interpreter(model_content=bytes(path_or_bytes))
        else:
            self.interpreter = Interpreter(model_path=str(path_or_bytes))
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
                "input": describe(self._input, normalised=True), "output": describe(self._output)}

    def quantize_input(self, images):
        """float32 normalised images -> the model's input dtype (unchanged for float models)."""
        return quantize_input(images, self._input)

    def __call__(self, images):
        """float32 normalised images `[N, H, W, C]` -> float32 probabilities `[N, classes]`."""
        images = np.asarray(images, np.float32)
        if self._batch != len(images):
            self.interpreter.resize_tensor_input(self._input["index"], [len(images), *images.shape[1:]])
            self.interpreter.allocate_tensors()
            self._batch = len(images)
        self.interpreter.set_tensor(self._input["index"], self.quantize_input(images))
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self._output["index"])
        scale, zero_point = quantization(self._output)
        return ((out.astype(np.float32) - zero_point) * scale) if scale else out.astype(np.float32)

    def float_tensors(self):
        """Names of the float tensors in the graph: none in a full-integer model."""
        return [t["name"] for t in self.interpreter.get_tensor_details()
                if np.dtype(t["dtype"]).kind == "f"]
