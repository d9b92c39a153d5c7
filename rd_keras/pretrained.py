"""keras.applications ResNets (v1: ResNet50, ResNet101, ResNet152) rebuilt by our builder, weights copied.

The teacher of Residual Distillation must be a net of `rd_keras.architectures.build`: hybrid paths cut
its graph at our block names, and the plain twin is the same builder without shortcuts. So a
keras.applications ResNet is not used as is; it is rebuilt with the builder options that reproduce it
layer for layer (`OPTIONS`: stride on the first 1x1 conv, symmetric stem padding, its BN epsilon) and its
weights are copied across by layer name (`layer_pairs`).

keras.applications' convs carry a bias that our convs do not. Each is followed by a BatchNormalization,
and in inference mode BN(conv(x) + b) = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta, which is
BN'(conv(x)) with mean' = mean - b and every other BN parameter unchanged: the bias goes into the moving
mean, exactly.

Weights: "imagenet" (Keras downloads them once into ~/.keras/models) or a local `.h5` / `.weights.h5`
file saved from the same keras.applications model (`include_top=True`, any class count). A file is
checked before any model is built: the shapes of all its arrays must be those of the named net, and its
classifier head gives the class count. Such a teacher expects `keras.applications.resnet.preprocess_input`,
i.e. `config.data.normalization="caffe"`.
"""

from __future__ import annotations

import collections
import os

import keras

from rd_keras import architectures

from rd_keras.errors import PretrainedError  # noqa: F401

PREFIX = "keras.applications."
# keras.applications name -> our architecture name.
APPLICATIONS = {"ResNet50": "resnet50", "ResNet101": "resnet101", "ResNet152": "resnet152"}
OPTIONS = {"bottleneck_stride": "1x1", "stem_padding": "symmetric", "bn_epsilon": 1.001e-5}
NORMALIZATION = "caffe"
IMAGENET, IMAGENET_CLASSES = "imagenet", 1000
WEIGHT_SUFFIXES = (".weights.h5", ".h5")



def is_application(path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def application_name(path: str) -> str:
    """'keras.applications.ResNet50' or 'ResNet50' -> 'ResNet50'; anything else is refused, quoted."""
    name = path[len(PREFIX):] if is_application(path) else path
    if name not in APPLICATIONS:
        raise PretrainedError(f"Unknown keras.applications teacher {path!r}: expected one of "
                              f"{[PREFIX + n for n in APPLICATIONS]}.")
    return name


def arch_of(path: str) -> str:
    """Our architecture name of the keras.applications net `path` ('keras.applications.ResNet50' -> 'resnet50')."""
    return APPLICATIONS[application_name(path)]


def _head_width(spec) -> int:
    return spec.widths[-1] * 4


def layout(arch: str, classes: int | None) -> collections.Counter:
    """The shapes of every weight array of the keras.applications net for `arch` (a multiset: files keep
    arrays in different orders and under different names, but the shapes are the same), head included
    when `classes` is given."""
    spec = architectures.get_spec(arch)
    shapes = collections.Counter()

    def conv(kernel, c_in, c_out):  # kernel, bias, and the BN's gamma, beta, moving mean and variance
        shapes[(kernel, kernel, c_in, c_out)] += 1
        shapes[(c_out,)] += 5

    conv(7, 3, spec.stem_width)
    c_in = spec.stem_width
    for blocks, width in zip(spec.blocks, spec.widths):
        for j in range(blocks):
            if j == 0:
                conv(1, c_in, 4 * width)
            conv(1, c_in, width)
            conv(3, width, width)
            conv(1, width, 4 * width)
            c_in = 4 * width
    if classes:
        shapes[(c_in, classes)] += 1
        shapes[(classes,)] += 1
    return shapes


def _file_layout(path):
    """The shapes of every array in an HDF5 weights file (both Keras formats)."""
    import h5py  # a dependency of Keras itself

    shapes = collections.Counter()
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, item: shapes.update(
                [tuple(item.shape)] if isinstance(item, h5py.Dataset) and item.shape else []))
    except OSError as e:
        raise PretrainedError(f"weights={path!r}: not a readable HDF5 weights file ({e}).") from None
    return shapes


def _split_head(shapes, width):
    """(body shapes, class count or None): the head is the one 2-D array, (width, classes), and its bias."""
    matrices = [s for s in shapes if len(s) == 2]
    if len(matrices) != 1 or matrices[0][0] != width or shapes[matrices[0]] != 1:
        return shapes, None
    classes = matrices[0][1]
    body = shapes - collections.Counter({matrices[0]: 1, (classes,): 1})
    return body, classes


def _describe(body):
    convs = sum(n for s, n in body.items() if len(s) == 4)
    return f"{sum(body.values())} arrays besides the head, {convs} of them conv kernels"


def check_weights(path: str, weights: str) -> int:
    """The class count of `weights` for the teacher `path`, after checking, without building any model,
    that the file holds exactly that net's arrays; raises PretrainedError naming both sides."""
    name = application_name(path)
    if weights == IMAGENET:
        return IMAGENET_CLASSES
    if not weights:
        raise PretrainedError(f"{path!r} needs weights: {IMAGENET!r} "
                              "(downloaded by Keras) or a local .h5 / .weights.h5 file of that net.")
    weights = os.path.expanduser(weights)
    if not weights.endswith(WEIGHT_SUFFIXES):
        raise PretrainedError(f"weights={weights!r}: expected {IMAGENET!r} or a file ending in "
                              f"{' or '.join(WEIGHT_SUFFIXES)}.")
    if not os.path.isfile(weights):
        raise PretrainedError(f"weights={weights!r}: file not found.")
    arch = APPLICATIONS[name]
    body, classes = _split_head(_file_layout(weights), _head_width(architectures.get_spec(arch)))
    if body != layout(arch, None):
        alike = [PREFIX + n for n, a in APPLICATIONS.items() if body == layout(a, None)]
        seen = f": the layout of {alike[0]}" if alike else ": no keras.applications ResNet v1"
        raise PretrainedError(
            f"weights={weights!r} holds another network than {path!r}.\n"
            f"  weights {weights}: {_describe(body)}{seen}\n"
            f"  teacher {PREFIX}{name}: {_describe(layout(arch, None))}")
    if classes is None:
        raise PretrainedError(f"weights={weights!r}: a {PREFIX}{name} without its classifier head "
                              "(saved with include_top=False); RD trains through the teacher's head, so the file "
                              "must include it.")
    return classes


def layer_pairs(arch: str):
    """(our conv, our BN, their conv, their BN) for every conv of `arch`, in keras.applications' names."""
    pairs = [("stem_conv", "stem_bn", "conv1_conv", "conv1_bn")]
    for i, blocks in enumerate(architectures.get_spec(arch).blocks, start=1):
        for j in range(1, blocks + 1):
            ours, theirs = architectures.block_prefix(i, j), f"conv{i + 1}_block{j}"
            if j == 1:
                pairs.append((f"{ours}_proj_conv", f"{ours}_proj_bn", f"{theirs}_0_conv", f"{theirs}_0_bn"))
            pairs += [(f"{ours}_conv{k}", f"{ours}_bn{k}", f"{theirs}_{k}_conv", f"{theirs}_{k}_bn")
                      for k in (1, 2, 3)]
    return pairs


def source_model(path: str, weights: str, classes: int):
    """The keras.applications net with its weights, logits out (`classifier_activation=None`)."""
    name = application_name(path)
    factory = getattr(keras.applications, name)
    if weights == IMAGENET:
        try:
            return factory(weights=IMAGENET, classifier_activation=None)
        except Exception as e:  # offline: urllib, socket and HTTP errors all look different
            raise PretrainedError(
                f"weights='imagenet': Keras could not get the ImageNet weights of {PREFIX}{name} "
                f"({type(e).__name__}: {e}). On a machine without network, save them once elsewhere "
                f"({PREFIX}{name}(weights='imagenet').save_weights('{name.lower()}.weights.h5')) and pass "
                "that file.") from None
    model = factory(weights=None, classes=classes, classifier_activation=None)
    try:
        model.load_weights(weights)
    except Exception as e:  # the layout check passed, so this is a damaged or reordered file
        raise PretrainedError(f"weights={weights!r}: cannot be loaded into {PREFIX}{name} "
                              f"({type(e).__name__}: {e}).") from None
    return model


def convert(source, arch: str, *, input_shape=(224, 224, 3), shortcuts: str = "all", name=None):
    """Our `arch` (with `OPTIONS`), holding the weights of the keras.applications model `source`.

    `shortcuts="none"` gives the plain twin with the same weights (the projections have nowhere to go).
    Any `input_shape` works: no weight depends on the image size.
    """
    classes = source.get_layer("predictions").units
    model = architectures.build(arch, shortcuts=shortcuts, num_classes=classes, input_shape=tuple(input_shape),
                                stem="imagenet", name=name, **OPTIONS)
    ours = {layer.name for layer in model.layers}
    for conv, bn, their_conv, their_bn in layer_pairs(arch):
        if conv not in ours:  # a projection of the ResNet, absent from a plain net
            continue
        kernel, bias = source.get_layer(their_conv).get_weights()
        gamma, beta, mean, variance = source.get_layer(their_bn).get_weights()
        model.get_layer(conv).set_weights([kernel])
        model.get_layer(bn).set_weights([gamma, beta, mean - bias, variance])
    model.get_layer("logits").set_weights(source.get_layer("predictions").get_weights())
    return model


def load(path: str, weights: str = IMAGENET, *, num_classes: int | None = None, input_shape=(224, 224, 3),
         shortcuts: str = "all") -> keras.Model:
    """The keras.applications net `path` ('keras.applications.ResNet50' or 'ResNet50') with `weights`, as a
    net of our builder for `input_shape`. `num_classes`, when given, must be the class count of the
    weights' head: RD's hybrid paths end in the teacher's head, so its classes are the labels."""
    name = application_name(path)
    classes = check_weights(path, weights)
    if num_classes is not None and num_classes != classes:
        raise PretrainedError(
            f"The teacher's classes do not fit the data: {PREFIX}{name} with weights {weights!r} has a "
            f"{classes}-class head, the data has {num_classes} classes. Hybrid paths end in the teacher's head, "
            f"so the labels must be its classes, in its order: use data with those {classes} classes, or a "
            f"weights file whose head was trained on this data's {num_classes}.")
    input_shape = tuple(input_shape)
    if input_shape[-1] != 3:
        raise PretrainedError(f"{PREFIX}{name} takes RGB images (3 channels); the data has images of shape "
                              f"{input_shape}.")
    source = source_model(path, weights, classes)
    model = convert(source, APPLICATIONS[name], input_shape=input_shape, shortcuts=shortcuts)
    del source
    return model
