"""ResNets and their plain twins, from one spec table and one builder.

`build(arch, shortcuts=...)` returns a Keras 3 functional model whose output is a dict of named endpoints
(`stem`, `stage1` .. `stageN`, `logits`). The ResNet (`shortcuts="all"`) and its plain twin
(`shortcuts="none"`) have the same layers, except the shortcut adds and projection convs, so every stage
boundary has the same shape in both: that is what lets the plain net's early stages feed the ResNet's later
stages during Residual Distillation.
"""

from __future__ import annotations

import dataclasses
import re

import keras

from rd_keras.dirac import DiracConv2D

SHORTCUT_MODES = ("all", "none", "downsample")
STEMS = ("cifar", "imagenet")
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """One architecture: block type, blocks per stage, base width per stage, stem width and default stem."""

    block: str  # "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1 with 4x expansion)
    blocks: tuple[int, ...]
    widths: tuple[int, ...]
    stem_width: int
    stem: str

    @property
    def depth(self) -> int:
        convs_per_block = 2 if self.block == "basic" else 3
        return convs_per_block * sum(self.blocks) + 2


def _cifar(n: int) -> ArchSpec:
    return ArchSpec("basic", (n, n, n), (16, 32, 64), 16, "cifar")


_IMAGENET = {
    18: ArchSpec("basic", (2, 2, 2, 2), (64, 128, 256, 512), 64, "imagenet"),
    34: ArchSpec("basic", (3, 4, 6, 3), (64, 128, 256, 512), 64, "imagenet"),
    50: ArchSpec("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), 64, "imagenet"),
    101: ArchSpec("bottleneck", (3, 4, 23, 3), (64, 128, 256, 512), 64, "imagenet"),
}

SPECS: dict[str, ArchSpec] = {
    **{f"resnet{6 * n + 2}": _cifar(n) for n in (1, 3, 5, 7, 9, 18)},  # 8, 20, 32, 44, 56, 110
    **{f"resnet{d}": spec for d, spec in _IMAGENET.items()},
}


def get_spec(arch: str) -> ArchSpec:
    """The spec of `arch`: a name in SPECS, or `resnet<D>` for any CIFAR depth D = 6n+2."""
    if arch in SPECS:
        return SPECS[arch]
    match = re.fullmatch(r"(?:resnet|plain)(\d+)", str(arch))
    if not match:
        raise ValueError(
            f"Unknown architecture {arch!r}: expected one of {sorted(SPECS)} or 'resnet<D>' with D = 6n+2.")
    depth = int(match.group(1))
    if depth in _IMAGENET:
        return _IMAGENET[depth]
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"Architecture {arch!r} is impossible: a CIFAR ResNet's depth must be 6n+2 with n >= 1 "
            f"(8, 14, 20, 26, ...), and ImageNet depths are {sorted(_IMAGENET)}; got depth {depth}.")
    return _cifar((depth - 2) // 6)


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _conv(filters, kernel, stride, name, dirac):
    # Dirac parameterisation only makes sense where there is no shortcut to carry the identity.
    cls = DiracConv2D if dirac else keras.layers.Conv2D
    return cls(filters, kernel, strides=stride, padding="same", use_bias=False,
               kernel_initializer="he_normal", name=name)


def _bn(name):
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def _shortcut(x, filters, stride, prefix):
    """Identity when shapes match, else a 1x1 projection conv + BN (ResNet option B)."""
    if stride == 1 and x.shape[-1] == filters:
        return x
    s = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False, kernel_initializer="he_normal",
                            name=f"{prefix}_proj_conv")(x)
    return _bn(f"{prefix}_proj_bn")(s)


def residual_block(x, *, kind, filters, stride, shortcut, prefix, out_name, dirac=False):
    """One basic or bottleneck block; `shortcut=False` drops the add (the plain twin's block)."""
    if kind == "basic":
        convs = [(filters, 3, stride), (filters, 3, 1)]
    else:  # bottleneck, stride on the 3x3 conv ("ResNet v1.5")
        convs = [(filters, 1, 1), (filters, 3, stride), (4 * filters, 1, 1)]
    y = x
    for k, (f, kernel, s) in enumerate(convs, start=1):
        y = _conv(f, kernel, s, f"{prefix}_conv{k}", dirac and not shortcut)(y)
        y = _bn(f"{prefix}_bn{k}")(y)
        if k < len(convs):
            y = keras.layers.ReLU(name=f"{prefix}_relu{k}")(y)
    if shortcut:
        y = keras.layers.Add(name=f"{prefix}_add")([_shortcut(x, convs[-1][0], stride, prefix), y])
    return keras.layers.ReLU(name=out_name)(y)


def _stem(x, kind, filters, dirac):
    if kind == "cifar":
        x = _conv(filters, 3, 1, "stem_conv", dirac)(x)
        x = _bn("stem_bn")(x)
        return keras.layers.ReLU(name="stem")(x)
    x = _conv(filters, 7, 2, "stem_conv", False)(x)
    x = _bn("stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    return keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem")(x)


def _validate(arch, shortcuts, num_classes, input_shape, width, stem):
    spec = get_spec(arch)
    if shortcuts not in SHORTCUT_MODES:
        raise ValueError(f"shortcuts must be one of {SHORTCUT_MODES}, got {shortcuts!r}.")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    if not isinstance(width, (int, float)) or width <= 0:
        raise ValueError(f"width must be a positive number, got {width!r}.")
    if stem is not None and stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS} or None (the architecture's default), got {stem!r}.")
    if len(input_shape) != 3 or any(not isinstance(d, int) or d < 1 for d in input_shape):
        raise ValueError(f"input_shape must be (height, width, channels) of positive ints, got {input_shape!r}.")
    return spec


def build(arch: str, *, shortcuts: str = "all", num_classes: int = 10, input_shape=(32, 32, 3),
          width: float = 1.0, stem: str | None = None, dirac: bool = False, name: str | None = None):
    """Build a ResNet (`shortcuts="all"`), its plain twin (`"none"`), or a plain net keeping only the
    shape-changing (projection) shortcuts (`"downsample"`, as deployed by the paper's official code).

    `dirac=True` gives the convs without a shortcut the Dirac parameterisation W = a*I + b*V; export folds
    it into ordinary convs. Returns a functional model with dict output {stem, stage1..N, logits}.
    """
    input_shape = tuple(input_shape)
    spec = _validate(arch, shortcuts, num_classes, input_shape, width, stem)
    plain = shortcuts != "all"
    if name is None:
        name = f"{'plain' if plain else 'resnet'}{spec.depth}"
    inputs = keras.Input(input_shape, name="images")
    x = _stem(inputs, stem or spec.stem, _scaled(spec.stem_width, width), dirac and plain)
    endpoints = {"stem": x}
    for i, (blocks, base) in enumerate(zip(spec.blocks, spec.widths), start=1):
        filters = _scaled(base, width)
        for j in range(1, blocks + 1):
            stride = 2 if (j == 1 and i > 1) else 1
            out_channels = filters * (4 if spec.block == "bottleneck" else 1)
            changes_shape = stride != 1 or x.shape[-1] != out_channels
            keep = shortcuts == "all" or (shortcuts == "downsample" and changes_shape)
            x = residual_block(x, kind=spec.block, filters=filters, stride=stride, shortcut=keep,
                               prefix=f"stage{i}_block{j}",
                               out_name=_block_output_name(i, j, blocks),
                               dirac=dirac and plain)
        endpoints[f"stage{i}"] = x
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    # float32 logits even under mixed precision, so losses and softmax stay numerically safe.
    endpoints["logits"] = keras.layers.Dense(num_classes, name="logits", dtype="float32")(pooled)
    return keras.Model(inputs, endpoints, name=name)


def _block_output_name(stage, block, blocks_in_stage):
    # The last block's output is the stage endpoint.
    return f"stage{stage}" if block == blocks_in_stage else f"stage{stage}_block{block}_out"


def block_output_names(arch: str) -> list[str]:
    """Names of the layers ending each residual block of `arch`, in order, as `build` names them."""
    return [_block_output_name(i, j, blocks)
            for i, blocks in enumerate(get_spec(arch).blocks, start=1) for j in range(1, blocks + 1)]


def endpoint_names(model) -> list[str]:
    """["stem", "stage1", ..., "stageN"] of a model made by `build`."""
    names = {layer.name for layer in model.layers}
    stages = sorted((n for n in names if re.fullmatch(r"stage\d+", n)), key=lambda n: int(n[5:]))
    return ["stem", *stages]


def num_stages(model) -> int:
    return len(endpoint_names(model)) - 1


def classifier(model):
    """The same network with only the logits as output: what gets exported and served."""
    return keras.Model(model.input, model.get_layer("logits").output, name=model.name)
