"""What an exported `.tflite` says about itself: labels, input description and normalisation, in the file.

No metadata library installs beside our pins: tflite-support 0.4.4 (the last; its metadata writers) needs
protobuf < 4 and we pin protobuf 7, and mediapipe 1.2.2 (whose `tasks.python.metadata` is its LiteRT-era
successor) needs absl-py ~= 2.3 and we pin 1.4 (`pip install --dry-run -r requirements.txt <package>`
reports ResolutionImpossible for both). So the exporter writes the metadata itself, through the mechanism
the flatbuffer already has: `Model.metadata` is a vector of (name, buffer index) entries that interpreters
skip (the converter itself keeps `min_runtime_version` and `CONVERSION_METADATA` there). We add one entry,
`METADATA_NAME`, whose buffer is UTF-8 JSON (docs/deploy.md lists the fields):

    {"format": "rd_keras.tflite_metadata/1", "model_name": ..., "quantization": ..., "labels": [...],
     "labels_file": "labels.txt",
     "input": {"name": "images", "dtype": "uint8", "shape": [-1, H, W, C], "layout": "NHWC",
               "color_space": "grayscale" | "rgb", "value_range": [0, 255], "normalised": false, ...},
     "normalisation": {"inside_model": true, "mean": [...], "std": [...], "channel_order": ...,
                       "formula": ..., "implementation": ...},
     "output": {"name": "probabilities", "dtype": ..., "shape": [-1, K], "meaning": ..., ...}}

`write(payload, record)` adds (or replaces) the entry; `read(path_or_bytes)` returns it, None for a file
without one. The flatbuffer is handled with the schema module the LiteRT runtime ships
(`ai_edge_litert.schema_py_generated`), so reading needs neither TensorFlow nor a parser of our own.
"""

from __future__ import annotations

import json

import flatbuffers
import numpy as np

METADATA_NAME = "rd_keras_metadata"
FORMAT = "rd_keras.tflite_metadata/1"
_FILE_IDENTIFIER = b"TFL3"  # the TFLite flatbuffer's file identifier


def _schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def write(payload, record):
    """`payload` (.tflite bytes) with `record` (a JSON-able dict) as its `METADATA_NAME` entry."""
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(payload), 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(record, sort_keys=True).encode(), np.uint8)
    model.buffers = list(model.buffers or [])
    entries = [entry for entry in (model.metadata or []) if _name(entry) != METADATA_NAME]
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers)
    model.buffers.append(buffer)
    model.metadata = entries + [entry]
    builder = flatbuffers.Builder(len(payload) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())


def _name(entry):
    return entry.name.decode() if isinstance(entry.name, bytes) else entry.name


def read(path_or_bytes):
    """The `METADATA_NAME` record of a `.tflite` (a path or its bytes), or None when it has none."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        payload = bytes(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            payload = f.read()
    model = _schema().Model.GetRootAs(payload, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() is not None and entry.Name().decode() == METADATA_NAME:
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode())
    return None


def op_names(payload):
    """The builtin op name of every operator of a `.tflite`'s first subgraph, in order."""
    schema = _schema()
    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = _schema().Model.GetRootAs(payload, 0)
    graph = model.Subgraphs(0)
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    # builtin codes above 127 live in the newer int32 field; the deprecated int8 one is capped at 127
    return [names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
            for code in (codes[graph.Operators(i).OpcodeIndex()] for i in range(graph.OperatorsLength()))]


def describe(*, model_name, quantization, labels, labels_file, image_shape, normalisation, implementation,
             output):
    """The record of one exported file. `output` is its output's dtype/shape (and scale/zero point) as
    `TFLiteRunner.input_contract` gives it; `implementation` says how the file normalises."""
    channels = int(image_shape[-1])
    return {
        "format": FORMAT,
        "model_name": model_name,
        "quantization": quantization,
        "labels": list(labels),
        "labels_file": labels_file,
        "input": {"name": "images", "dtype": "uint8", "shape": [-1, *map(int, image_shape)], "layout": "NHWC",
                  "color_space": "grayscale" if channels == 1 else "rgb", "value_range": [0, 255],
                  "normalised": False,
                  "description": "raw pixels at the training image size (resize before), "
                                 + ("one grey channel" if channels == 1 else "channels in RGB order")},
        "normalisation": {"inside_model": True, **normalisation.describe(), "implementation": implementation},
        "output": {"name": "probabilities", **output,
                   "meaning": "softmax class probabilities, one per label in `labels` order"},
    }


def implementation(quantization, normalisation):
    """How a file of this quantisation holds the normalisation (rd_keras.export.pixels)."""
    if quantization not in ("int8", "qat"):
        return "float ops at the input: the SavedModel's normalize"
    if normalisation.uniform:
        return "the uint8 input's quantisation (scale = 1/(255 std), zero_point = round(255 mean)); no op"
    return "a 1x1 int8 conv named normalize (channel reversal and per-channel affine)"
