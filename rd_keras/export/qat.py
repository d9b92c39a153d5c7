"""Quantisation-aware training (QAT) of the plain net, to a full-integer `.tflite`.

    python -m rd_keras.export.qat --workdir=W --steps=N --output=W/export/tflite/plain_qat.tflite
        [--io_type=int8|uint8] [--learning_rate=1e-3]

`rd_keras.export --qat_steps=N` starts this as a subprocess; it is the only module that imports
`tensorflow_model_optimization` (tfmot). tfmot works only on tf_keras models and switches `tf.keras` to
tf_keras for the whole process on import, so it must never run inside a Keras 3 process that goes on to
train or export.

How: load `plain.keras` with Keras 3 and fold BN/Dirac into the convs (`rd_keras.export.folding`); rebuild the
folded graph layer by layer in tf_keras (same names, same weights, checked to give the same logits) with a
final softmax; `quantize_model` with tfmot's default 8-bit scheme (Conv+ReLU, Add+ReLU and Dense patterns
all quantise cleanly without BN); fine-tune N steps on the training pipeline with SGD at a small learning
rate; convert. The result has the `.tflite` contract of `rd_keras.export.tflite_export` for `int8`: signature
`serving_default`, uint8 pixel `images`, int8 (or uint8) quantised `probabilities`.

The pixels go in as `rd_keras.export.pixels` says: when one mean and std hold for every channel, the model's
input quantiser (tfmot's `QuantizeLayer` after the input) is held at the range pixels 0..255 normalise to,
so the uint8 input's quantisation is the normalisation; otherwise the `normalize` 1x1 conv comes first,
quantised with the rest but kept at its values (`_keep_normalize`; its input quantiser held at 0..255, the
pipeline's normalised images mapped back to pixels). The range is set before the fine-tune and again after
it, since the quantiser's moving average follows the batches in between.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import keras
import numpy as np

from rd_keras import architectures, data
from rd_keras import defaults
from rd_keras import workdir as wd
from rd_keras.errors import exit_with_error
from rd_keras.export import folding, pixels
from rd_keras.export.workdir_export import dataset_info, load_workdir
from rd_keras.workdir import write_atomic
from rd_keras.export.tflite_export import INPUT_NAME, IO_TYPES, OUTPUT_NAME, SIGNATURE, check_pixel_input

# Keras 3 config keys that each supported layer keeps in tf_keras (same names and meaning in both).
_LAYER_ARGS = {
    "Conv2D": ("filters", "kernel_size", "strides", "padding", "dilation_rate", "groups", "activation",
               "use_bias"),
    "Dense": ("units", "activation", "use_bias"),
    "ReLU": ("max_value", "negative_slope", "threshold"),
    "Add": (),
    "GlobalAveragePooling2D": ("keepdims",),
    "MaxPooling2D": ("pool_size", "strides", "padding"),
    "AveragePooling2D": ("pool_size", "strides", "padding"),
    "ZeroPadding2D": ("padding",),  # the symmetric stem of keras.applications-style nets
}


def _graph(folded):
    """The folded Keras 3 graph as plain data: `(class name, layer name, kwargs, input layer names,
    weights)` per layer, producers first."""
    layers = []
    for node in folding.nodes_in_order(folded):
        layer = node.operation
        kind = type(layer).__name__
        if kind not in _LAYER_ARGS:
            raise ValueError(f"QAT cannot rebuild layer {layer.name!r} of type {kind} in tf_keras; "
                             f"supported: {sorted(_LAYER_ARGS)}")
        config = layer.get_config()
        kwargs = {key: config[key] for key in _LAYER_ARGS[kind] if key in config}
        sources = [t._keras_history.operation.name for t in node.arguments.keras_tensors]
        layers.append((kind, layer.name, kwargs, sources, layer.get_weights()))
    return layers


def _tf_keras_model(tf_keras, input_shape, input_name, graph):
    """The graph in tf_keras, ending in a softmax named `probabilities`."""
    inputs = tf_keras.Input(input_shape, name=INPUT_NAME)
    tensors = {input_name: inputs}
    built = []
    for kind, name, kwargs, sources, weights in graph:
        layer = getattr(tf_keras.layers, kind)(name=name, **kwargs)
        args = [tensors[s] for s in sources]
        tensors[name] = layer(args if kind == "Add" else args[0])
        built.append((layer, weights))
    for layer, weights in built:
        layer.set_weights(weights)
    logits = tensors[graph[-1][1]]
    return tf_keras.Model(inputs, tf_keras.layers.Softmax(name=OUTPUT_NAME)(logits))


def _convert(tf, model, input_shape, io_type):
    # A SavedModel with an explicit signature gives the .tflite the same `images` -> `probabilities`
    # names as the post-training variants (from_keras_model would name the output after the wrapper).
    signature = tf.function(lambda images: {OUTPUT_NAME: model(images, training=False)},
                            input_signature=[tf.TensorSpec([None, *input_shape], tf.float32,
                                                           name=INPUT_NAME)])
    with tempfile.TemporaryDirectory(prefix="rd_keras-qat-") as directory:
        tf.saved_model.save(model, directory, signatures={SIGNATURE: signature})
        converter = tf.lite.TFLiteConverter.from_saved_model(directory, signature_keys=[SIGNATURE])
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.inference_input_type = tf.uint8  # pixels: the input quantiser is set to take them
        converter.inference_output_type = tf.as_dtype(io_type)
        return converter.convert()


def _keep_normalize(tf_keras, quantized):
    """Callbacks that keep the `normalize` conv's weights as they are: they are the data's statistics, not
    something to learn, and the conv's inputs are raw pixels up to 255, whose gradients wreck it at any
    learning rate that suits the net. (tfmot 0.8.1's QuantizeWrapperV2 lists the wrapped layer's weights
    as its own trainable ones whatever `trainable` says, so they are put back after every step instead; the
    wrapper's own list is the one to read, the wrapped layer stops tracking the kernel it quantises.)"""
    kept = [(weight, weight.numpy()) for layer in quantized.layers
            if getattr(layer, "layer", None) is not None and layer.layer.name == pixels.NORMALIZE_LAYER
            for weight in layer.weights if weight.name.startswith(f"{pixels.NORMALIZE_LAYER}/")]

    def restore(batch, logs):
        for weight, value in kept:
            weight.assign(value)

    return [tf_keras.callbacks.LambdaCallback(on_train_batch_end=restore)] if kept else []


def _hold_input_range(quantized, low, high):
    """Sets the range of the quantiser tfmot puts after the model's input (its first QuantizeLayer)."""
    layer = next(layer for layer in quantized.layers if type(layer).__name__ == "QuantizeLayer")
    layer.quantizer_vars["min_var"].assign(low)
    layer.quantizer_vars["max_var"].assign(high)


def quantization_aware_tflite(config, model, *, steps, io_type=defaults.INT8_IO,
                              learning_rate=defaults.QAT_LEARNING_RATE, verbose=1):
    """The `.tflite` bytes of `model` (a Keras 3 plain net) after `steps` steps of QAT."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive integer. Received: steps={steps!r}")
    if io_type not in IO_TYPES:
        raise ValueError(f"`io_type` must be one of {IO_TYPES}. Received: io_type={io_type!r}")
    if not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be positive. Received: learning_rate={learning_rate!r}")
    normalisation = pixels.Normalisation.of(dataset_info(config))
    folded = folding.fold(architectures.classifier(model))
    if not normalisation.uniform:
        folded = normalisation.pixel_model(folded)  # the `normalize` conv is part of what is quantised
    input_shape = tuple(folded.input.shape[1:])
    train_ds, _, _ = data.datasets(config)
    if not normalisation.uniform:
        train_ds = train_ds.map(lambda images, labels: (normalisation.from_normalised(images), labels))
    probe = next(iter(train_ds))[0].numpy()[:16]
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(folded(probe, training=False)))

    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    float_model = _tf_keras_model(tf_keras, input_shape, folded.layers[0].name, _graph(folded))
    diff = float(np.abs(float_model(probe, training=False).numpy() - expected).max())
    if diff > 1e-4:
        raise RuntimeError(f"The tf_keras rebuild differs from plain.keras by {diff} in probabilities.")
    quantized = tfmot.quantization.keras.quantize_model(float_model)
    quantized.compile(tf_keras.optimizers.SGD(learning_rate, momentum=defaults.QAT_MOMENTUM),
                      tf_keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    _hold_input_range(quantized, *normalisation.input_range())
    quantized.fit(train_ds.repeat(), steps_per_epoch=steps, epochs=1, verbose=verbose,
                  callbacks=_keep_normalize(tf_keras, quantized))
    _hold_input_range(quantized, *normalisation.input_range())
    payload = _convert(tf, quantized, input_shape, io_type)
    check_pixel_input(payload, normalisation)
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rd_keras.export.qat", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir with config.json, plain.keras")
    parser.add_argument("--steps", type=int, required=True, help="fine-tune steps on the train pipeline")
    parser.add_argument("--output", help="the .tflite path (default W/export/tflite/plain_qat.tflite)")
    parser.add_argument("--io_type", default=defaults.INT8_IO, choices=IO_TYPES)
    parser.add_argument("--learning_rate", type=float, default=defaults.QAT_LEARNING_RATE)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    output = args.output or wd.tflite_path(args.workdir, "qat")
    try:
        config, model = load_workdir(args.workdir)
        payload = quantization_aware_tflite(config, model, steps=args.steps, io_type=args.io_type,
                                            learning_rate=args.learning_rate, verbose=0 if args.quiet else 1)
    except (ValueError, FileNotFoundError) as e:
        exit_with_error(parser, e)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_atomic(output, payload)
    print(f"QAT model ({len(payload)} bytes): {output}")


if __name__ == "__main__":
    main()
