"""TF Serving warm-up requests: `<version>/assets.extra/tf_serving_warmup_requests`.

TF Serving replays these records when it loads a version, before the version takes traffic, so the first
real request does not pay for graph tracing and kernel initialisation. The file is a TFRecord of
`tensorflow_serving.apis.PredictionLog` protos, each holding a `PredictRequest`
(https://www.tensorflow.org/tfx/serving/saved_model_warmup). The dev server replays the same file, which also
checks that the file parses and that its requests are valid for the exported signatures.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


def warmup_request(
    images: np.ndarray, model_name: str, signature_name: str = "serving_default", input_key: str = "images"
) -> predict_pb2.PredictRequest:
    """A PredictRequest carrying `images` as input `input_key`, as a client would send it."""
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature_name)
    )
    request.inputs[input_key].CopyFrom(tf.make_tensor_proto(images))
    return request


def write_warmup_requests(
    export_dir: str,
    images: np.ndarray,
    model_name: str,
    signature_name: str = "serving_default",
    input_key: str = "images",
) -> str:
    """Write the warm-up file for `images` (uint8 [N, H, W, C] for the contract) into `export_dir`.

    `export_dir` is one version directory (it must already hold saved_model.pb). Two records, the first image
    alone and the whole batch, warm up both the smallest and a realistic batch shape. Call it before the
    version directory is renamed into place, so the server never sees the version without its warm-up file.
    Returns the file's path.
    """
    images = np.asarray(images)
    if images.ndim < 1 or len(images) == 0:
        raise ValueError(f"images must be a non-empty batch, got shape {images.shape}")
    if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
        raise ValueError(f"export_dir must be a SavedModel version directory, got {export_dir!r}")
    path = os.path.join(export_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    batches = [images[:1]] if len(images) == 1 else [images[:1], images]
    with tf.io.TFRecordWriter(path) as writer:
        for batch in batches:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(
                    request=warmup_request(batch, model_name, signature_name, input_key)
                )
            )
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(export_dir: str, limit: int) -> Iterator[predict_pb2.PredictRequest]:
    """The PredictRequests in `export_dir`'s warm-up file (none if it has no file); at most `limit`."""
    path = os.path.join(export_dir, WARMUP_FILE)
    if not os.path.isfile(path):
        return
    for count, record in enumerate(tf.data.TFRecordDataset(path)):
        if count >= limit:
            return
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if not log.HasField("predict_log"):
            raise ValueError(f"{path}: record {count} is not a predict_log (only Predict warm-up is supported)")
        yield log.predict_log.request
