"""Copying trained weights into nets of our builder: fine-tuning on a new data set, and warm starts.

`config.train.mode="transfer"` fine-tunes a trained net on the configured data. `config.transfer.from`
names it:

- a `.keras` file saved by this project (`plain.keras` or `resnet.keras`);
- a workdir of this project: its `plain.keras`, else its `resnet.keras`;
- `keras.applications.<Name>` (ResNet50, ResNet101, ResNet152) with `transfer.weights` ("imagenet" or a
  local weights file), converted by `rd_keras.pretrained`; such a net expects `data.normalization="caffe"`.

(`rd_keras.sources` resolves and loads them, use `sources.TRANSFER`.)

The net is rebuilt by `architectures.build` with the source's own architecture (depth, width, stem,
shortcuts, Dirac convs, builder options, read off the loaded model and checked weight by weight) for the new input shape and
class count; every weight but the classifier head (`logits`) is copied, the head starts fresh. Rebuilding,
rather than editing the loaded model, is what keeps export, folding and checkpoints working unchanged. A
fine-tuned plain net is saved as `plain.keras` (so `rd_keras.export` ships it), a fine-tuned ResNet as
`resnet.keras`.

The images take the source net's channel count where the data can give it (`rd_keras.channels`): a
Fashion-MNIST net fine-tunes on a folder of grayscale (or RGB) PNGs as they are.

`transfer.freeze_stages = k` freezes the first k stages, the stem counting as the first: their weights stay
as loaded and their BatchNormalization layers run in inference mode (Keras 3 does so for any BN layer
with `trainable=False`), so the frozen features are exactly the source net's.

`copy_shared_weights` is also the RD student's warm start (`model.student_init="teacher"`): the plain net
takes every weight of its ResNet twin whose layer it has, i.e. all but the projection shortcuts.
"""

from __future__ import annotations

import keras
import numpy as np

from rd_keras import architectures, sources
from rd_keras.errors import TransferError  # noqa: F401
from rd_keras.dirac import DiracConv2D

HEAD = "logits"


def resolve(path: str, weights: str = "") -> sources.Source:
    """What `config.transfer.from` points at, without loading it; raises TransferError naming the path."""
    return sources.resolve(path, weights, sources.TRANSFER)


def load(source: sources.Source) -> keras.Model:
    """The source net as saved (a functional model of `architectures.build`, dict output)."""
    return sources.load(source, sources.TRANSFER)


Recipe = architectures.Recipe
stage_index = architectures.stage_index


def recipe_of(model) -> Recipe:
    """Reads the build arguments off a net of our builder; `rebuild` checks them weight by weight."""
    try:
        return architectures.recipe_of(model)
    except ValueError as e:
        raise TransferError(str(e)) from None


def copy_shared_weights(source, target, skip=()):
    """Copies into `target` the weights of every layer of `source` with the same name, except those in
    `skip`; returns the names of the layers copied. A Dirac conv receiving an ordinary kernel W gets
    V = W, a = 0, b = 1, so that its effective kernel a*I + b*V is W."""
    copied = []
    for layer in target.layers:
        if not layer.weights or layer.name in skip:
            continue
        try:
            theirs = source.get_layer(layer.name)
        except ValueError:
            continue  # a layer only the target has
        weights = theirs.get_weights()
        if isinstance(layer, DiracConv2D) and not isinstance(theirs, DiracConv2D):
            weights = [weights[0], np.zeros(layer.filters, np.float32), np.ones(layer.filters, np.float32)]
        mine = [tuple(w.shape) for w in layer.weights]
        if [tuple(w.shape) for w in weights] != mine:
            raise TransferError(f"Layer {layer.name!r}: the source's weights {[w.shape for w in weights]} do not "
                                f"fit {mine}.")
        layer.set_weights(weights)
        copied.append(layer.name)
    return copied


def rebuild(source_model, *, num_classes: int, input_shape, copy: bool = True) -> keras.Model:
    """The source net rebuilt by our builder for `input_shape` and `num_classes`, with every weight but the
    head copied when `copy` (a resumed run restores them from its checkpoint instead)."""
    recipe = recipe_of(source_model)
    theirs = tuple(source_model.input.shape[1:])
    if theirs[-1] != input_shape[-1]:
        raise TransferError(f"{source_model.name} takes {theirs[-1]}-channel images but the configured data has "
                            f"{input_shape[-1]}; folder and synthetic data are read with the net's channel count "
                            f"(rd_keras.channels), other sources keep their own.")
    model = architectures.build(recipe.arch, shortcuts=recipe.shortcuts, num_classes=num_classes,
                                input_shape=tuple(input_shape), width=recipe.width, stem=recipe.stem,
                                dirac=recipe.dirac, name=source_model.name, **dict(recipe.options))
    body = [(p, shape) for p, shape in architectures.signature(model) if not p.startswith(HEAD + "/")]
    if body != [(p, shape) for p, shape in architectures.signature(source_model) if not p.startswith(HEAD + "/")]:
        raise TransferError(f"Cannot rebuild {source_model.name} ({recipe}) with rd_keras.architectures: its "
                            "weights differ from the rebuilt net's.")
    if copy:
        copy_shared_weights(source_model, model, skip=(HEAD,))
    return model


def freeze(model, stages: int) -> list:
    """Freezes the first `stages` stages (the stem is stage 0, so 1 freezes the stem alone); returns the
    names of the frozen layers. A frozen BatchNormalization layer runs in inference mode."""
    limit = architectures.num_stages(model) + 1
    if not isinstance(stages, int) or isinstance(stages, bool) or not 0 <= stages <= limit:
        raise TransferError(f"config.transfer.freeze_stages must be an integer in [0, {limit}] for "
                            f"{model.name} (stem + {limit - 1} stages), got {stages!r}.")
    frozen = []
    for layer in model.layers:
        index = stage_index(layer.name)
        if index is not None and index < stages and layer.weights:
            layer.trainable = False
            frozen.append(layer.name)
    return frozen
