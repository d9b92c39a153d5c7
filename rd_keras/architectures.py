"""ResNets and their plain twins, from one spec table and one builder.

`build(arch, shortcuts=...)` returns a Keras 3 functional model whose output is a dict of named endpoints
(`stem`, `stage1` .. `stageN`, `logits`). The ResNet (`shortcuts="all"`) and its plain twin
(`shortcuts="none"`) have the same layers, except the shortcut adds and projection convs, so every stage
boundary has the same shape in both: that is what lets the plain net's early stages feed the ResNet's later
stages during Residual Distillation.

Three options reproduce other ResNet implementations layer for layer (they change neither the weights'
shapes nor any stage-boundary shape, so a net of one variant can feed or initialise another):
`bottleneck_stride` ("3x3", ResNet v1.5, the default; "1x1", ResNet v1 as keras.applications),
`stem_padding` ("same", the default; "symmetric", explicit zero padding of 3 and 1 pixels before the
7x7 stem conv and the stem max-pool, as keras.applications) and `bn_epsilon`.
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
BOTTLENECK_STRIDES = ("3x3", "1x1")
STEM_PADDINGS = ("same", "symmetric")


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
    152: ArchSpec("bottleneck", (3, 8, 36, 3), (64, 128, 256, 512), 64, "imagenet"),
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


def _conv(filters, kernel, stride, name, dirac, padding="same"):
    """A conv layer; `dirac` is False or the initial b of a Dirac conv W = a*I + b*V."""
    # Dirac parameterisation only makes sense where there is no shortcut to carry the identity.
    if dirac:
        return DiracConv2D(filters, kernel, strides=stride, padding=padding, use_bias=False,
                           kernel_initializer="he_normal", name=name, beta_init=float(dirac))
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False,
                               kernel_initializer="he_normal", name=name)


def _bn(name, epsilon=BN_EPSILON):
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=epsilon, name=name)


def _shortcut(x, filters, stride, prefix, bn_epsilon=BN_EPSILON):
    """Identity when shapes match, else a 1x1 projection conv + BN (ResNet option B)."""
    if stride == 1 and x.shape[-1] == filters:
        return x
    s = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False, kernel_initializer="he_normal",
                            name=f"{prefix}_proj_conv")(x)
    return _bn(f"{prefix}_proj_bn", bn_epsilon)(s)


def residual_block(x, *, kind, filters, stride, shortcut, prefix, out_name, dirac=False,
                   bottleneck_stride="3x3", bn_epsilon=BN_EPSILON):
    """One basic or bottleneck block; `shortcut=False` drops the add (the plain twin's block).

    A bottleneck strides on its 3x3 conv ("ResNet v1.5") or, with `bottleneck_stride="1x1"`, on its first
    1x1 conv ("ResNet v1"); a strided 1x1 conv reads the same pixels whether padded "same" or not."""
    if kind == "basic":
        convs = [(filters, 3, stride), (filters, 3, 1)]
    elif bottleneck_stride == "1x1":
        convs = [(filters, 1, stride), (filters, 3, 1), (4 * filters, 1, 1)]
    else:
        convs = [(filters, 1, 1), (filters, 3, stride), (4 * filters, 1, 1)]
    y = x
    for k, (f, kernel, s) in enumerate(convs, start=1):
        y = _conv(f, kernel, s, f"{prefix}_conv{k}", False if shortcut else dirac)(y)
        y = _bn(f"{prefix}_bn{k}", bn_epsilon)(y)
        if k < len(convs):
            y = keras.layers.ReLU(name=f"{prefix}_relu{k}")(y)
    if shortcut:
        projected = _shortcut(x, convs[-1][0], stride, prefix, bn_epsilon)
        y = keras.layers.Add(name=f"{prefix}_add")([projected, y])
    return keras.layers.ReLU(name=out_name)(y)


def _stem(x, kind, filters, dirac, padding="same", bn_epsilon=BN_EPSILON):
    if kind == "cifar":  # a stride-1 3x3 conv: "same" is already symmetric
        x = _conv(filters, 3, 1, "stem_conv", dirac)(x)
        x = _bn("stem_bn", bn_epsilon)(x)
        return keras.layers.ReLU(name="stem")(x)
    symmetric = padding == "symmetric"
    # "same" pads a stride-2 layer on an even input by one pixel less at the top-left than at the
    # bottom-right; "symmetric" pads evenly, as keras.applications (and PyTorch) do. The output
    # shapes agree for every input size.
    if symmetric:
        x = keras.layers.ZeroPadding2D(3, name="stem_pad")(x)
    x = _conv(filters, 7, 2, "stem_conv", False, "valid" if symmetric else "same")(x)
    x = _bn("stem_bn", bn_epsilon)(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    if symmetric:  # zeros pad a max-pool of ReLU outputs as -inf would
        x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    return keras.layers.MaxPooling2D(3, strides=2, padding="valid" if symmetric else "same", name="stem")(x)


def _check_options(bottleneck_stride, stem_padding, bn_epsilon):
    if bottleneck_stride not in BOTTLENECK_STRIDES:
        raise ValueError(f"bottleneck_stride must be one of {BOTTLENECK_STRIDES}, got {bottleneck_stride!r}.")
    if stem_padding not in STEM_PADDINGS:
        raise ValueError(f"stem_padding must be one of {STEM_PADDINGS}, got {stem_padding!r}.")
    if isinstance(bn_epsilon, bool) or not isinstance(bn_epsilon, (int, float)) or bn_epsilon <= 0:
        raise ValueError(f"bn_epsilon must be a positive number, got {bn_epsilon!r}.")


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
          width: float = 1.0, stem: str | None = None, dirac: bool = False, name: str | None = None,
          bottleneck_stride: str = "3x3", stem_padding: str = "same", bn_epsilon: float = BN_EPSILON,
          dirac_beta: float = 1.0):
    """Build a ResNet (`shortcuts="all"`), its plain twin (`"none"`), or a plain net keeping only the
    shape-changing (projection) shortcuts (`"downsample"`, as deployed by the paper's official code).

    `dirac=True` gives the convs without a shortcut the Dirac parameterisation W = a*I + b*V (a starts at 1,
    b at `dirac_beta`: a small b starts the plain net near identity mappings, as DiracNets do); export folds
    it into ordinary convs. `bottleneck_stride`, `stem_padding` and `bn_epsilon`: see the module docstring.
    Returns a functional model with dict output {stem, stage1..N, logits}.
    """
    input_shape = tuple(input_shape)
    spec = _validate(arch, shortcuts, num_classes, input_shape, width, stem)
    _check_options(bottleneck_stride, stem_padding, bn_epsilon)
    plain = shortcuts != "all"
    if not isinstance(dirac_beta, (int, float)) or isinstance(dirac_beta, bool) or dirac_beta <= 0:
        raise ValueError(f"dirac_beta must be a positive number, got {dirac_beta!r}.")
    dirac = dirac and plain and float(dirac_beta)  # False, or the initial b of every Dirac conv
    if name is None:
        name = f"{'plain' if plain else 'resnet'}{spec.depth}"
    inputs = keras.Input(input_shape, name="images")
    x = _stem(inputs, stem or spec.stem, _scaled(spec.stem_width, width), dirac, stem_padding,
              bn_epsilon)
    endpoints = {"stem": x}
    for i, (blocks, base) in enumerate(zip(spec.blocks, spec.widths), start=1):
        filters = _scaled(base, width)
        for j in range(1, blocks + 1):
            stride = 2 if (j == 1 and i > 1) else 1
            out_channels = filters * (4 if spec.block == "bottleneck" else 1)
            changes_shape = stride != 1 or x.shape[-1] != out_channels
            keep = shortcuts == "all" or (shortcuts == "downsample" and changes_shape)
            x = residual_block(x, kind=spec.block, filters=filters, stride=stride, shortcut=keep,
                               prefix=block_prefix(i, j),
                               out_name=_block_output_name(i, j, blocks),
                               dirac=dirac, bottleneck_stride=bottleneck_stride,
                               bn_epsilon=bn_epsilon)
        endpoints[f"stage{i}"] = x
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    # float32 logits even under mixed precision, so losses and softmax stay numerically safe.
    endpoints["logits"] = keras.layers.Dense(num_classes, name="logits", dtype="float32")(pooled)
    return keras.Model(inputs, endpoints, name=name)


# --- layer names: written and parsed here only ------------------------------------------------------------

_BLOCK_OUTPUT = re.compile(r"stage(\d+)(?:_block(\d+)_out)?")
_PART = re.compile(r"(stem|stage\d+|logits)")


def block_prefix(stage: int, block: int) -> str:
    """The prefix of every layer of block `block` of stage `stage` (1-based): 'stage2_block1'."""
    return f"stage{stage}_block{block}"


def _block_output_name(stage, block, blocks_in_stage):
    # The last block's output is the stage endpoint.
    return f"stage{stage}" if block == blocks_in_stage else f"{block_prefix(stage, block)}_out"


def parse_block_output(name: str):
    """(stage, block) of a block-output layer name ('stage2_block3_out' -> (2, 3)); the stage endpoint
    'stage2' gives (2, None); any other name None."""
    match = _BLOCK_OUTPUT.fullmatch(name)
    if not match:
        return None
    stage, block = match.groups()
    return int(stage), int(block) if block else None


def is_stage_endpoint(name: str) -> bool:
    """Whether `name` is the layer ending a stage ('stage3'), as opposed to one ending an inner block."""
    parsed = parse_block_output(name)
    return parsed is not None and parsed[1] is None


def stage_index(layer_name: str):
    """0 for the stem's layers, i for stage i's, None for the head (pooling and logits)."""
    if layer_name.startswith("stem"):
        return 0
    match = re.match(r"stage(\d+)", layer_name)
    return int(match.group(1)) if match else None


def part_of(layer_name: str) -> str:
    """The part of a built net a layer belongs to: `stem`, `stage{i}` or `logits`; 'other' for the rest."""
    match = _PART.match(layer_name)
    return match.group(1) if match else "other"


def blocks_per_stage(model) -> tuple:
    """The number of residual blocks in each stage of a model of `build`, read off its layer names."""
    names = {layer.name for layer in model.layers}
    return tuple(len({j for j in range(1, len(names) + 1) if f"{block_prefix(i, j)}_conv1" in names})
                 for i in range(1, num_stages(model) + 1))


def block_output_names(arch: str) -> list[str]:
    """Names of the layers ending each residual block of `arch`, in order, as `build` names them."""
    return [_block_output_name(i, j, blocks)
            for i, blocks in enumerate(get_spec(arch).blocks, start=1) for j in range(1, blocks + 1)]


def endpoint_names(model) -> list[str]:
    """["stem", "stage1", ..., "stageN"] of a model made by `build`."""
    stages = sorted((parse_block_output(layer.name)[0] for layer in model.layers
                     if is_stage_endpoint(layer.name)))
    return ["stem", *(f"stage{i}" for i in stages)]


def num_stages(model) -> int:
    return len(endpoint_names(model)) - 1


def classifier(model):
    """The same network with only the logits as output: what gets exported and served."""
    return keras.Model(model.input, model.get_layer("logits").output, name=model.name)


def options_of(model) -> dict:
    """The `bottleneck_stride`, `stem_padding` and `bn_epsilon` a model of `build` was built with, so that
    code rebuilding a net from a loaded one (fine-tuning, a warm start) keeps its variant."""
    names = {layer.name for layer in model.layers}
    # A strided first 1x1 conv exists only in ResNet v1 bottlenecks (block 1 of stage 2 always strides).
    conv1 = model.get_layer("stage2_block1_conv1") if "stage2_block1_conv1" in names else None
    v1 = conv1 is not None and tuple(conv1.kernel_size) == (1, 1) and tuple(conv1.strides) != (1, 1)
    return {"bottleneck_stride": "1x1" if v1 else "3x3",
            "stem_padding": "symmetric" if "stem_pad" in names else "same",
            "bn_epsilon": float(model.get_layer("stem_bn").epsilon)}


def signature(model):
    """The name and shape of every weight, in order: two nets of one build have the same."""
    return [(w.path, tuple(w.shape)) for w in model.weights]


def stem_of(model) -> str:
    """The stem kind of a model of `build`: 'cifar' (a 3x3 stem conv) or 'imagenet'."""
    return "cifar" if tuple(model.get_layer("stem_conv").kernel_size) == (3, 3) else "imagenet"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The `build` arguments that rebuild a net (all but input shape and class count)."""

    arch: str
    shortcuts: str
    width: float
    stem: str
    dirac: bool
    options: tuple = ()  # (name, value) of the builder options (bottleneck_stride, stem_padding, bn_epsilon)

    @property
    def role(self) -> str:
        """Which file of a workdir the net goes to: 'plain' or 'resnet'."""
        return "resnet" if self.shortcuts == "all" else "plain"


def recipe_of(model) -> Recipe:
    """Reads the build arguments off a net of `build` named resnet<D> or plain<D> (a saved and reloaded
    `.keras` model carries none); raises ValueError for other names. Callers rebuilding from it check the
    result weight by weight."""
    match = re.fullmatch(r"(?:resnet|plain)(\d+)", model.name)
    if not match:
        raise ValueError(f"{model.name!r} is not a net of rd_keras.architectures (resnet<D> or plain<D>).")
    arch = f"resnet{match.group(1)}"
    spec = get_spec(arch)
    names = [layer.name for layer in model.layers]
    shortcuts = "all" if any(n.endswith("_add") for n in names) else (
        "downsample" if any(n.endswith("_proj_conv") for n in names) else "none")
    # The widest layer gives the channel multiplier with the least rounding error.
    last = model.get_layer(block_output_names(arch)[-1]).output.shape[-1]
    width = last / (spec.widths[-1] * (4 if spec.block == "bottleneck" else 1))
    dirac = any(isinstance(layer, DiracConv2D) for layer in model.layers)
    return Recipe(arch, shortcuts, width, stem_of(model), dirac, tuple(options_of(model).items()))
