"""Fold BatchNormalization and Dirac parameterisation into ordinary convolutions, for deployment.

In inference mode `BN(conv(x, W) + b)` is `conv(x, W * s) + (b - mean) * s + beta` with
`s = gamma / sqrt(var + eps)` per output channel, and a `DiracConv2D` is an ordinary conv whose kernel is
`effective_kernel()`. `fold(model)` re-walks a functional graph and rebuilds it with each Conv -> BN pair
replaced by one `Conv2D(use_bias=True)` and every other layer cloned with its weights, so the result has
the same inputs, the same output structure and (up to float rounding) the same outputs, but no
BatchNormalization and no DiracConv2D. The walk is generic: it handles the plain chain as well as the
`shortcuts="downsample"` graph with its Adds and projection convs.

Every layer of the folded model computes in float32, whatever dtype policy the model was trained with,
because serving and TFLite conversion both expect a float32 graph.
"""

from __future__ import annotations

import keras
import numpy as np

from rd_keras.dirac import DiracConv2D


def _producer(tensor):
    """The node that produced a KerasTensor, or None for a graph input."""
    history = tensor._keras_history
    if history.operation is None or isinstance(history.operation, keras.layers.InputLayer):
        return None
    return history.operation._inbound_nodes[history.node_index]


def nodes_in_order(model):
    """The model's call nodes, producers before consumers, found by walking back from its outputs.

    Walking from the outputs (rather than reading each layer's inbound nodes) ignores calls that belong to
    other models sharing the same layers, e.g. the dict-output model behind `classifier(model)`. The walk
    uses an explicit stack: a deep plain net (resnet1202's twin) would overflow Python's recursion limit.
    """
    ordered, done, stack = [], set(), []
    for tensor in reversed(model.outputs):
        node = _producer(tensor)
        if node is not None:
            stack.append((node, False))
    while stack:
        node, parents_done = stack.pop()
        if id(node) in done:
            continue
        if parents_done:
            done.add(id(node))
            ordered.append(node)
            continue
        stack.append((node, True))
        for tensor in reversed(node.arguments.keras_tensors):
            parent = _producer(tensor)
            if parent is not None and id(parent) not in done:
                stack.append((parent, False))
    return ordered


def _float32_config(layer):
    config = layer.get_config()
    config["dtype"] = "float32"
    return config


def _conv_kernel_and_bias(conv):
    kernel = keras.ops.convert_to_numpy(
        conv.effective_kernel() if isinstance(conv, DiracConv2D) else conv.kernel).astype(np.float64)
    bias = keras.ops.convert_to_numpy(conv.bias).astype(np.float64) if conv.use_bias \
        else np.zeros(kernel.shape[-1])
    return kernel, bias


def folded_conv_weights(conv, bn=None):
    """Kernel and bias of the single conv equal to `bn(conv(x))` in inference mode (or to `conv` alone).

    The arithmetic runs in float64 so the fold adds no rounding beyond the final float32 cast.
    """
    kernel, bias = _conv_kernel_and_bias(conv)
    if bn is not None:
        channels = kernel.shape[-1]

        def value(variable, default):
            return keras.ops.convert_to_numpy(variable).astype(np.float64) if variable is not None \
                else np.full(channels, default)

        gamma, beta = value(bn.gamma, 1.0), value(bn.beta, 0.0)
        mean, var = value(bn.moving_mean, 0.0), value(bn.moving_variance, 1.0)
        scale = gamma / np.sqrt(var + bn.epsilon)
        kernel = kernel * scale  # broadcasts over the last (output channel) axis
        bias = (bias - mean) * scale + beta
    return kernel.astype(np.float32), bias.astype(np.float32)


def _foldable_bn(bn, conv_node, consumers):
    """True when `bn` normalises the channel axis of a conv output that nothing else reads."""
    if not isinstance(bn, keras.layers.BatchNormalization) or conv_node is None:
        return False
    conv = conv_node.operation
    axis = bn.axis if isinstance(bn.axis, int) else bn.axis[0] if len(bn.axis) == 1 else None
    return (type(conv) in (keras.layers.Conv2D, DiracConv2D)
            and conv.data_format == "channels_last"
            and axis in (-1, len(conv_node.outputs[0].shape) - 1)
            and consumers[id(conv_node.outputs[0])] == 1)


def _new_conv(conv, kernel, bias):
    """A plain Conv2D with bias, named like `conv`, and the weights to give it once built."""
    config = _float32_config(conv)
    config.update(use_bias=True, kernel_regularizer=None, bias_regularizer=None,
                  kernel_constraint=None, bias_constraint=None)
    config.pop("beta_init", None)  # a DiracConv2D's own argument: the folded conv is an ordinary Conv2D
    layer = keras.layers.Conv2D.from_config(config)
    return layer, [kernel, bias]


def fold(model, name=None):
    """A new functional model equal to `model` in inference mode, with BN and Dirac folded into convs.

    Each folded conv keeps the conv's name (so `stage1_block1_conv1` is still `stage1_block1_conv1`);
    every other layer keeps its name, config and weights.
    """
    return _rebuild(model, name, fold_layers=True)


def float32_copy(model, name=None):
    """`model` rebuilt layer for layer (BN and Dirac kept) with every layer computing in float32.

    The reference that `fold` must match: a net trained under mixed precision computes in float16, and
    differs from its float32 fold by half-precision rounding, not by a folding error.
    """
    return _rebuild(model, name, fold_layers=False)


def behind(front, weights, model, name=None):
    """`model` (one input) rebuilt layer for layer behind the new single-input layer `front`, which gets
    `weights`: one flat graph (a nested model would hide its layers from a layer-by-layer rebuild, QAT's)."""
    return _rebuild(model, name, fold_layers=False, front=(front, weights))


def _rebuild(model, name, fold_layers, front=None):
    if not isinstance(model, keras.Model) or not hasattr(model, "outputs") or model.outputs is None:
        raise ValueError(f"Folding needs a functional keras.Model. Received: {model!r}")
    nodes = nodes_in_order(model)
    consumers = {}
    for node in nodes:
        for tensor in node.arguments.keras_tensors:
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    for tensor in model.outputs:  # a model output is read from outside, so it cannot disappear
        consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1

    # Which BN nodes fold into their producing conv; those conv nodes are then skipped.
    fold_into = {}
    for node in nodes:
        parent = _producer(node.arguments.keras_tensors[0]) if node.arguments.keras_tensors else None
        if fold_layers and _foldable_bn(node.operation, parent, consumers):
            fold_into[id(node)] = parent
    absorbed = {id(conv_node) for conv_node in fold_into.values()}

    new_inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name) for t in model.inputs]
    values = {id(old): new for old, new in zip(model.inputs, new_inputs)}
    built = []
    if front is not None:
        layer, weights = front
        values[id(model.inputs[0])] = layer(new_inputs[0])
        built.append((layer, weights))
    for node in nodes:
        if id(node) in absorbed:
            continue
        layer, source = node.operation, node.arguments
        if id(node) in fold_into:
            conv_node = fold_into[id(node)]
            new_layer, weights = _new_conv(conv_node.operation,
                                           *folded_conv_weights(conv_node.operation, layer))
            source = conv_node.arguments
        elif fold_layers and isinstance(layer, DiracConv2D):
            new_layer, weights = _new_conv(layer, *folded_conv_weights(layer))
        else:
            new_layer, weights = type(layer).from_config(_float32_config(layer)), layer.get_weights()
        args, kwargs = source.fill_in(values)
        outputs = new_layer(*args, **kwargs)
        for old, new in zip(node.outputs, keras.tree.flatten(outputs)):
            values[id(old)] = new
        built.append((new_layer, weights))
    # Weights go in once every layer is built by its call above.
    for new_layer, weights in built:
        new_layer.set_weights(weights)
    outputs = keras.tree.map_structure(lambda t: values[id(t)], model.output)
    inputs = new_inputs[0] if len(new_inputs) == 1 else new_inputs
    return keras.Model(inputs, outputs, name=name or model.name)
