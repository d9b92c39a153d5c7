"""Copying trained weights into nets of our builder: fine-tuning on a new data set, and warm starts.

`config.train.mode="transfer"` fine-tunes a trained net on the configured data. `config.transfer.from`
names it:

- a `.keras` file saved by this project (`plain.keras` or `resnet.keras`);
- a workdir of this project: its `plain.keras`, else its `resnet.keras`;
- `keras.applications.<Name>` (ResNet50, ResNet101, ResNet152) with `transfer.weights` ("imagenet" or a
  local weights file), converted by `rd_keras.pretrained`; such a net expects `data.normalization="caffe"`.

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

import dataclasses
import os
import re

import keras
import numpy as np

from rd_keras import architectures
from rd_keras.errors import TransferError  # noqa: F401
from rd_keras.workdir import PLAIN_FILE, RESNET_FILE, saved_model_file
from rd_keras.dirac import DiracConv2D

APPLICATIONS_PREFIX = "keras.applications."
HEAD = "logits"



@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # "keras" (a .keras file of ours) or "applications" (a keras.applications name)
    path: str  # the file, or the application's full name (e.g. "keras.applications.ResNet50")
    weights: str = ""  # applications only: "imagenet" or a weights file


def resolve(path: str, weights: str = "") -> Source:
    """What `config.transfer.from` points at, without loading it; raises TransferError naming the path."""
    if not path:
        raise TransferError("config.train.mode='transfer' needs config.transfer.from: a plain.keras or "
                            "resnet.keras file, a workdir of this project, or keras.applications.<Name>.")
    if path.startswith(APPLICATIONS_PREFIX):
        return Source("applications", path, weights)
    path = os.path.expanduser(path)
    if path.endswith(".keras"):
        if not os.path.isfile(path):
            raise TransferError(f"config.transfer.from={path!r}: file not found.")
        return Source("keras", path)
    if os.path.isdir(path):
        # The plain net is what this project deploys, so it wins when a workdir holds both.
        found = saved_model_file(path, (PLAIN_FILE, RESNET_FILE))
        if found:
            return Source("keras", found)
        raise TransferError(f"config.transfer.from={path!r}: a directory with neither {PLAIN_FILE} nor "
                            f"{RESNET_FILE} (is it a finished run?).")
    raise TransferError(f"config.transfer.from={path!r}: not a .keras file, a workdir, or "
                        f"{APPLICATIONS_PREFIX}<Name>.")


def _load_application(source):
    from rd_keras import pretrained

    try:
        return pretrained.load(source.path, source.weights)
    except pretrained.PretrainedError as e:  # unknown names, weight files of other nets, no network
        raise TransferError(f"config.transfer.from={source.path!r} with config.transfer.weights={source.weights!r}: "
                            f"{e}") from None


def load(source: Source) -> keras.Model:
    """The source net as saved (a functional model of `architectures.build`, dict output)."""
    if source.kind == "applications":
        return _load_application(source)
    try:
        model = keras.saving.load_model(source.path, compile=False)
        model.get_layer("stem_conv"), model.get_layer(HEAD)
    except Exception as e:  # a broken or foreign file fails in many ways; report them all the same way
        raise TransferError(f"config.transfer.from: cannot load {source.path!r} as a model built by "
                            f"rd_keras.architectures ({type(e).__name__}: {e}).") from None
    return model


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The `architectures.build` arguments that rebuild a net (all but input shape and class count)."""

    arch: str
    shortcuts: str
    width: float
    stem: str
    dirac: bool
    options: tuple = ()  # (name, value) of the builder options (bottleneck_stride, stem_padding, bn_epsilon)

    @property
    def role(self) -> str:
        """Which file of a workdir the fine-tuned net goes to: 'plain' or 'resnet'."""
        return "resnet" if self.shortcuts == "all" else "plain"


def recipe_of(model) -> Recipe:
    """Reads the build arguments off a net of our builder; `rebuild` checks them weight by weight."""
    match = re.fullmatch(r"(?:resnet|plain)(\d+)", model.name)
    if not match:
        raise TransferError(f"{model.name!r} is not a net of rd_keras.architectures (resnet<D> or plain<D>).")
    arch = f"resnet{match.group(1)}"
    spec = architectures.get_spec(arch)
    names = [layer.name for layer in model.layers]
    shortcuts = "all" if any(n.endswith("_add") for n in names) else (
        "downsample" if any(n.endswith("_proj_conv") for n in names) else "none")
    # The widest layer gives the channel multiplier with the least rounding error.
    last = model.get_layer(architectures.block_output_names(arch)[-1]).output.shape[-1]
    width = last / (spec.widths[-1] * (4 if spec.block == "bottleneck" else 1))
    stem = "cifar" if model.get_layer("stem_conv").kernel_size == (3, 3) else "imagenet"
    dirac = any(isinstance(layer, DiracConv2D) for layer in model.layers)
    strided = spec.block == "bottleneck" and model.get_layer("stage2_block1_conv1").strides == (2, 2)
    options = (("bottleneck_stride", "1x1" if strided else "3x3"),
               ("stem_padding", "symmetric" if "stem_pad" in names else "same"),
               ("bn_epsilon", float(model.get_layer("stem_bn").epsilon)))
    return Recipe(arch, shortcuts, width, stem, dirac, options)


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
    body = [(w.path, tuple(w.shape)) for w in model.weights if not w.path.startswith(HEAD + "/")]
    if body != [(w.path, tuple(w.shape)) for w in source_model.weights if not w.path.startswith(HEAD + "/")]:
        raise TransferError(f"Cannot rebuild {source_model.name} ({recipe}) with rd_keras.architectures: its "
                            "weights differ from the rebuilt net's.")
    if copy:
        copy_shared_weights(source_model, model, skip=(HEAD,))
    return model


def stage_index(layer_name: str):
    """0 for the stem's layers, i for stage i's, None for the head (pooling and logits)."""
    if layer_name.startswith("stem"):
        return 0
    match = re.match(r"stage(\d+)", layer_name)
    return int(match.group(1)) if match else None


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
