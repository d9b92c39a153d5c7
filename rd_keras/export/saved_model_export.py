"""SavedModel export in TF Serving's layout: `<model_dir>/<version>/`, atomically, never overwriting.

TF Serving polls `<model_dir>` and loads the highest integer sub-directory. So a new version is written to a
hidden `.tmp-*` directory next to the versions (same file system, and not an integer, so the server ignores
it) and renamed into place only when complete, warm-up requests included. A failure removes the temporary
directory and leaves the existing versions untouched.

Signatures (written with `keras.export.ExportArchive`; TF Serving's loader rejects a Keras 3 model saved
with `tf.saved_model.save`):
- `serving_default`: `images` uint8 `[N, H, W, C]`, raw pixels (RGB for colour) at the training image size;
  normalisation (`rd_keras.data.normalize`, with the channel reversal of BGR-trained nets) runs inside the
  graph.
- `predict_preprocessed`: `images` float32 `[N, H, W, C]`, already normalised.
Both return `probabilities` (float32 `[N, classes]`, softmax) and `classes` (int64 `[N]`, argmax).

Each version records what it was made from (`SOURCE_FILE`: the digest of the net's weights and the
normalisation), so that a rerun of a finished export finds the newest version `up_to_date` and writes none
(TF Serving would otherwise load the same weights again as a new version).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from rd_keras import data
from rd_keras.workdir import publish_dir

INPUT_KEY = "images"
SIGNATURES = ("serving_default", "predict_preprocessed")
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
# What a version was made from; assets.extra/ is TF Serving's place for files it does not load.
SOURCE_FILE = os.path.join("assets.extra", "rd_keras_source.json")
# One warm-up request per batch size: TF Serving then has run (and compiled) both shapes before the first
# real request arrives.
WARMUP_BATCH_SIZES = (1, 8)


def existing_versions(model_dir):
    """The integer version sub-directories of `model_dir`, ascending."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(name) for name in os.listdir(model_dir)
                  if name.isdigit() and os.path.isdir(os.path.join(model_dir, name)))


def up_to_date(model_dir, source):
    """`(version, path)` of the newest version when it was made from `source` (a JSON-able dict), else
    None (no version yet, another source, or a version from before SOURCE_FILE existed)."""
    versions = existing_versions(model_dir)
    if not versions:
        return None
    path = os.path.join(model_dir, str(versions[-1]))
    try:
        with open(os.path.join(path, SOURCE_FILE)) as f:
            recorded = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return (versions[-1], path) if recorded == json.loads(json.dumps(source)) else None


def _outputs(logits):
    return {"probabilities": tf.nn.softmax(logits),
            "classes": tf.argmax(logits, axis=-1, output_type=tf.int64)}


def build_archive(folded, image_shape, mean, std, channel_order="rgb"):
    """An ExportArchive tracking only `folded` (so no teacher or optimizer variable can leak in)."""
    archive = keras.export.ExportArchive()
    archive.track(folded)
    shape = [None, *image_shape]
    archive.add_endpoint(
        "serving_default",
        lambda images: _outputs(folded(data.normalize(images, mean, std, channel_order), training=False)),
        input_signature=[tf.TensorSpec(shape, tf.uint8, name=INPUT_KEY)])
    archive.add_endpoint(
        "predict_preprocessed",
        lambda images: _outputs(folded(images, training=False)),
        input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_KEY)])
    return archive


def write_warmup(version_dir, images, model_name):
    """TF Serving warm-up records: PredictionLogs of `serving_default` requests on real images."""
    # tensorflow_serving.apis is the pip package's protos, not this repository's rd_keras_serving/ code.
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for batch_size in WARMUP_BATCH_SIZES:
            batch = np.asarray(images[:batch_size], np.uint8)
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default"))
            request.inputs[INPUT_KEY].CopyFrom(tf.make_tensor_proto(batch))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def _publish(tmp_dir, model_dir):
    """Renames `tmp_dir` to the next free version number and returns `(version, path)`.

    Anything already named like the candidate (a version, a stray file) is skipped, never replaced; a
    concurrent export that wins the same number makes the rename fail, and the next number is tried.
    """
    version = max(existing_versions(model_dir), default=0) + 1
    while True:
        target = os.path.join(model_dir, str(version))
        if not os.path.lexists(target):
            try:
                publish_dir(tmp_dir, target)
                return version, target
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        version += 1


def export_version(folded, model_dir, *, image_shape, mean, std, warmup_images, model_name, channel_order="rgb",
                   source=None):
    """Writes a complete new version of `folded` under `model_dir`; returns `(version, path)`. `source`
    (a JSON-able dict, e.g. the weights' digest) is recorded in the version as SOURCE_FILE."""
    os.makedirs(model_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".tmp-", dir=model_dir)
    try:
        # mkdtemp makes a 0700 directory; a server running as another user must still read it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_dir, 0o777 & ~umask)
        archive = build_archive(folded, tuple(image_shape), tuple(mean), tuple(std), channel_order)
        archive.write_out(tmp_dir, verbose=False)
        write_warmup(tmp_dir, warmup_images, model_name)
        if source is not None:
            with open(os.path.join(tmp_dir, SOURCE_FILE), "w") as f:
                json.dump(source, f, indent=2, sort_keys=True)
        return _publish(tmp_dir, model_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
