"""Exact conversion of a trained ResNet into a shortcut-free net with the same logits (RMNet, Meng et al. 2021).

The baseline every Residual Distillation result must beat: it needs no training, and it has the ResNet's
accuracy by construction. `convert(model)` takes a net of `rd_keras.architectures.build` (basic or
bottleneck blocks, identity and projection shortcuts; a keras.applications ResNet goes through
`rd_keras.pretrained.convert` first) and returns a `keras.Model` of Conv2D (with bias), ReLU, padding,
pooling and Dense layers only, whose logits are the ResNet's to float32 rounding.

How a residual block `y = relu(shortcut(x) + F(x))` loses its shortcut, once BN is folded into the convs
(`folding.fold`):

- Its input `x` is the output of a ReLU (the previous block's, or the stem's, possibly max-pooled or
  zero-padded), so `x >= 0` and every ReLU inside the block passes it unchanged. Each conv of the block
  but the last gets `C` extra output channels (`C` = the channels of `x`) whose filters are Dirac: a 1 at
  one kernel tap from carried channel c to carried channel c, zero bias. So the block's convs carry `x`
  along next to their own features, through their ReLUs.
- The last conv reads the carried channels as extra inputs: identity shortcut, a Dirac filter adding `x`
  to each output channel; projection shortcut (a 1x1 conv, BN folded), the projection's own kernel and
  bias there instead. The block's output ReLU then sees exactly `shortcut(x) + F(x)`.
- The projection is applied at the end rather than carried: its output can be negative and would not
  pass a ReLU (RMNet's alternative, carrying relu(p) and relu(-p), doubles the reserved channels), and
  `x` has fewer channels than the projection's output (a basic block's C/2, a bottleneck's C/4 or C/2),
  so carrying `x` is also the cheaper scheme.
- Strides: the projection reads x at pixel `s*i` (a 1x1 conv of stride `s`). The carry follows the block's
  own strided conv (ResNet v1 bottlenecks stride on their first 1x1 conv, v1.5 ones and basic blocks on
  the 3x3): there the Dirac tap is the one that reads input pixel `s*i` for output pixel `i`, which under
  "same" padding depends on the input size (`_sampling_tap`), so a strided Dirac conv is exactly the
  projection's subsampling.

The price is width: a basic block's first conv goes from C to 2C outputs (1.5C in a projection block), a
bottleneck's 1x1 and 3x3 convs from F to F + 4F in identity blocks, and every widened kernel is computed
dense, mostly zeros. `rd_keras.bench` measures it against the RD-trained plain net.
"""

from __future__ import annotations

import keras
import numpy as np

from rd_keras import architectures
from rd_keras.export import folding


def _plain_relu(layer):
    return (isinstance(layer, keras.layers.ReLU) and layer.max_value is None
            and float(layer.negative_slope) == 0.0 and float(layer.threshold) == 0.0)


def _nonnegative(tensor):
    """Whether `tensor` is >= 0 by construction: a plain ReLU's output, or zero-padded / max-pooled from one
    (the ImageNet stem)."""
    layer = tensor._keras_history.operation
    while isinstance(layer, (keras.layers.ZeroPadding2D, keras.layers.MaxPooling2D)):
        layer = layer.input._keras_history.operation
    return _plain_relu(layer)


def _sampling_tap(conv, size):
    """Per spatial axis, the kernel tap through which output pixel i reads input pixel stride*i.

    TensorFlow's "same" padding puts `pad // 2` zeros before the input, `pad = max((out - 1) * s + k - n, 0)`:
    for a stride-2 3x3 conv that is no row before an even input, one before an odd one.
    """
    taps = []
    for n, k, s in zip(size, conv.kernel_size, conv.strides):
        if n is None:
            raise ValueError(f"{conv.name}: exact conversion needs a fixed input size (the Dirac taps of "
                             f"'same'-padded strided convs depend on it); got input shape {conv.input.shape}.")
        before = 0
        if conv.padding == "same":
            out = -(-n // s)
            before = max((out - 1) * s + k - n, 0) // 2
        taps.append(before)
    return tuple(taps)


def _check_conv(conv):
    if type(conv) is not keras.layers.Conv2D or not conv.use_bias:
        raise ValueError(f"{conv.name}: expected a folded Conv2D with bias, got {type(conv).__name__}.")
    if tuple(conv.dilation_rate) != (1, 1) or conv.groups != 1 or conv.data_format != "channels_last":
        raise ValueError(f"{conv.name}: only undilated, ungrouped channels_last convs can carry a block's "
                         f"input; got dilation_rate={conv.dilation_rate}, groups={conv.groups}, "
                         f"data_format={conv.data_format!r}.")


def _clone(layer):
    return type(layer).from_config(layer.get_config()), layer.get_weights()


def _widened(conv, kernel, bias):
    """A Conv2D like `conv` (name, kernel size, strides, padding) with the given weights."""
    layer = keras.layers.Conv2D(kernel.shape[-1], conv.kernel_size, strides=conv.strides, padding=conv.padding,
                                use_bias=True, name=conv.name, dtype="float32",
                                kernel_initializer="zeros")  # zeros: cheap to create, overwritten anyway
    return layer, [kernel, bias]


def _block_layers(folded, prefix):
    names = {layer.name for layer in folded.layers}
    convs = [folded.get_layer(f"{prefix}_conv{k}") for k in range(1, 4) if f"{prefix}_conv{k}" in names]
    left = sorted(n for n in names if n.startswith(prefix + "_bn"))
    if left:  # folding keeps a BN it cannot merge; its statistics would be lost here
        raise ValueError(f"{prefix}: BatchNormalization layers {left} were not folded into their convs.")
    relus = [folded.get_layer(f"{prefix}_relu{k}") for k in range(1, len(convs))]
    proj = folded.get_layer(f"{prefix}_proj_conv") if f"{prefix}_proj_conv" in names else None
    return convs, relus, proj, f"{prefix}_add" in names


def _carry_weights(convs, proj):
    """The weights of a block's widened convs: `x` carried by Dirac filters, merged by the last conv."""
    carried = convs[0].input.shape[-1]
    strides = np.prod([conv.strides for conv in convs], axis=0)
    if proj is None:
        if tuple(strides) != (1, 1):  # an identity shortcut reads every pixel: the block cannot subsample
            raise ValueError(f"{convs[0].name}: a block with an identity shortcut must not stride; got strides "
                             f"{tuple(int(s) for s in strides)}.")
        merge = np.eye(carried, dtype=np.float32)
        merge_bias = 0.0
    else:
        _check_conv(proj)
        if tuple(proj.kernel_size) != (1, 1) or tuple(proj.strides) != tuple(strides):
            raise ValueError(f"{proj.name}: a projection shortcut must be a 1x1 conv with the block's stride "
                             f"{tuple(strides)}; got kernel {proj.kernel_size}, strides {proj.strides}.")
        p_kernel, merge_bias = proj.get_weights()
        merge = p_kernel[0, 0]
    weights, last = [], len(convs) - 1
    for k, conv in enumerate(convs):
        _check_conv(conv)
        kernel, bias = conv.get_weights()
        kh, kw, c_in, c_out = kernel.shape
        th, tw = _sampling_tap(conv, conv.input.shape[1:3])
        # The first conv reads x itself; the later ones read their own features, then the carried x.
        carry_in = slice(0, c_in) if k == 0 else slice(c_in, c_in + carried)
        new_in = c_in if k == 0 else c_in + carried
        new_out = c_out if k == last else c_out + carried
        wide = np.zeros((kh, kw, new_in, new_out), np.float32)
        wide[:, :, :c_in, :c_out] = kernel
        new_bias = np.zeros(new_out, np.float32)
        new_bias[:c_out] = bias
        if k < last:
            wide[th, tw, carry_in, c_out:] = np.eye(carried, dtype=np.float32)
        else:
            wide[th, tw, carry_in, :] = merge
            new_bias += merge_bias
        weights.append((wide, new_bias))
    return weights


def _block(folded, prefix, out_name, x):
    """The layers replacing block `prefix` of `folded`, called on `x` (the new graph's block input)."""
    convs, relus, proj, residual = _block_layers(folded, prefix)
    old_input = convs[0].input
    layers = []
    if not residual:  # a block without shortcut (a plain or "downsample" net) stays as it is
        layers = [_clone(layer) for pair in zip(convs, [*relus, folded.get_layer(out_name)]) for layer in pair]
    else:
        if not _nonnegative(old_input):
            raise ValueError(f"{prefix}: the block's input does not come from a ReLU, so it cannot be carried "
                             f"through the block's ReLUs (input from "
                             f"{old_input._keras_history.operation.name!r}).")
        bad = [r.name for r in relus if not _plain_relu(r)]
        if bad:
            raise ValueError(f"{prefix}: activations {bad} are not plain ReLUs and would change the carried input.")
        wide = _carry_weights(convs, proj)
        out_relu = folded.get_layer(out_name)
        for k, (conv, (kernel, bias)) in enumerate(zip(convs, wide)):
            layers.append(_widened(conv, kernel, bias))
            layers.append(_clone(relus[k] if k < len(relus) else out_relu))
    for layer, _ in layers:
        x = layer(x)
    return x, layers


def convert(model, name=None):
    """The shortcut-free equivalent of `model` (a net of `architectures.build`, its dict-output model or its
    `classifier`): a functional model from the same images to the same logits, without Add, BN or
    projection layers. Layer names are kept (`stage2_block1_conv1` is the widened `stage2_block1_conv1`).
    """
    folded = folding.fold(architectures.classifier(model))
    old_input = folded.inputs[0]
    inputs = keras.Input(batch_shape=old_input.shape, dtype="float32", name=old_input.name)
    x, built = inputs, []
    for node in folding.nodes_in_order(folded):  # the stem: a chain, in graph order
        if architectures.stage_index(node.operation.name) == 0:
            layer, weights = _clone(node.operation)
            x = layer(x)
            built.append((layer, weights))
    block_outputs = {}  # (stage, block), or (stage, None) for a stage's last block -> its output ReLU's name
    for layer in folded.layers:
        parsed = architectures.parse_block_output(layer.name)
        if parsed is not None:
            block_outputs[parsed] = layer.name
    for i, blocks in enumerate(architectures.blocks_per_stage(folded), start=1):
        for j in range(1, blocks + 1):
            out_name = block_outputs[(i, j) if j < blocks else (i, None)]
            x, layers = _block(folded, architectures.block_prefix(i, j), out_name, x)
            built += layers
    for head in ("pool", "logits"):
        layer, weights = _clone(folded.get_layer(head))
        x = layer(x)
        built.append((layer, weights))
    for layer, weights in built:  # weights go in once every layer is built by its call
        layer.set_weights(weights)
    return keras.Model(inputs, x, name=name or f"{folded.name}_exact")
