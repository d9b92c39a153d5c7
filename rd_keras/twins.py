"""Teacher and student pairs for Residual Distillation: the plain twin of a ResNet, and the pair check.

`make_plain(resnet)` rebuilds a ResNet made by `architectures.build` without its shortcuts. A saved and
reloaded `.keras` model carries no builder arguments, so they are read back from the layers (block type,
blocks per stage, stem, channels, input shape, classes, `architectures.options_of`) and confirmed by
rebuilding the ResNet and comparing every weight's name and shape: a model that only looks similar is
refused, never half-copied.

`check_pair(teacher, student, hybrid_points)` is what any pair of functional models must satisfy for
`hybrid.build_paths`: both return a dict with `logits`, both have a layer at every hybrid point the
teacher offers, and the tensors there (and the inputs) have equal shapes. It fails with one ValueError
naming the first mismatch and both shapes.
"""

import keras

from rd_keras import architectures, hybrid


def _layer(model, name, what):
    try:
        return model.get_layer(name)
    except ValueError:
        raise ValueError(f"{what} {model.name!r} has no layer named {name!r}: make_plain needs a ResNet "
                         f"built by rd_keras.architectures.build (shortcuts='all').") from None


def _arch(kind, blocks, model):
    """The architecture name of `architectures.SPECS` (or `resnet<6n+2>`) with these blocks per stage."""
    if kind == "basic" and len(blocks) == 3 and len(set(blocks)) == 1:
        return f"resnet{6 * blocks[0] + 2}"
    for name, spec in architectures.SPECS.items():
        if spec.block == kind and spec.blocks == blocks and len(blocks) == 4:
            return name
    raise ValueError(f"Model {model.name!r} has {kind} blocks {blocks} per stage, which no architecture "
                     f"of rd_keras.architectures.SPECS has.")


def builder_arguments(resnet) -> dict:
    """The `architectures.build` keyword arguments (without `shortcuts`) that rebuild `resnet` exactly."""
    if not isinstance(resnet, keras.Model):
        raise ValueError(f"Expected a keras.Model built by rd_keras.architectures.build. "
                         f"Received: resnet={resnet!r}")
    stem_conv = _layer(resnet, "stem_conv", "Model")
    logits = _layer(resnet, "logits", "Model")
    names = {layer.name for layer in resnet.layers}
    stages = architectures.num_stages(resnet)
    blocks = architectures.blocks_per_stage(resnet)
    if not stages or not all(blocks):
        raise ValueError(f"Model {resnet.name!r} has no stage{{i}}_block{{j}} layers: make_plain needs a "
                         f"ResNet built by rd_keras.architectures.build.")
    kind = "bottleneck" if f"{architectures.block_prefix(1, 1)}_conv3" in names else "basic"
    arch = _arch(kind, blocks, resnet)
    spec = architectures.get_spec(arch)
    base = {"arch": arch, "num_classes": int(logits.units), "input_shape": tuple(resnet.input.shape[1:]),
            "stem": architectures.stem_of(resnet), **architectures.options_of(resnet)}
    # Channels are round(base * width): the widest stage pins the multiplier best, the others are
    # fallbacks for rounding ties; the rebuild below decides.
    channels = [(resnet.get_layer(f"{architectures.block_prefix(i, 1)}_conv1").filters, spec.widths[i - 1])
                for i in range(stages, 0, -1)] + [(stem_conv.filters, spec.stem_width)]
    wanted = architectures.signature(resnet)
    for got, nominal in channels:
        width = got / nominal
        rebuilt = architectures.build(shortcuts="all", width=width, name=resnet.name, **base)
        if architectures.signature(rebuilt) == wanted:
            return {**base, "width": width}
    raise ValueError(f"Model {resnet.name!r} is not a ResNet of rd_keras.architectures.build "
                     f"(shortcuts='all'): no {arch} of any width has its layers and weight shapes.")


def make_plain(resnet, *, shortcuts="none", dirac=False, name=None):
    """The plain twin of `resnet` (a ResNet made by `architectures.build`, possibly saved and reloaded):
    the same architecture, width, stem, input shape and classes with `shortcuts="none"` (or
    `"downsample"`), freshly initialised. Build it in the scope (distribution strategy, dtype policy) that
    will train it."""
    if shortcuts not in ("none", "downsample"):
        raise ValueError(f"`shortcuts` must be 'none' or 'downsample' for a plain twin. "
                         f"Received: shortcuts={shortcuts!r}")
    return architectures.build(shortcuts=shortcuts, dirac=dirac, name=name, **builder_arguments(resnet))


def _output_dict(model, role):
    if not isinstance(model, keras.Model):
        raise ValueError(f"The {role} must be a keras.Model. Received: {role}={model!r}")
    try:
        outputs = model.output
    except (AttributeError, ValueError):
        raise ValueError(f"The {role} {model.name!r} must be a functional keras.Model (its hybrid points "
                         f"are cut out of its graph); it has no symbolic output.") from None
    if not isinstance(outputs, dict) or "logits" not in outputs:
        raise ValueError(f"The {role} {model.name!r} must return a dict with a 'logits' entry, as "
                         f"rd_keras.architectures.build does. Received outputs: {outputs!r}")
    return outputs


def check_pair(teacher, student, hybrid_points=hybrid.STAGES) -> list:
    """The hybrid points (layer names) of the pair; ValueError naming the first stage that does not fit."""
    _output_dict(teacher, "teacher")
    _output_dict(student, "student")
    if teacher is student:
        raise ValueError("The teacher and the student must be two different models; got the same one twice.")
    points = hybrid.hybrid_points(hybrid.block_outputs(teacher), hybrid_points, teacher.name)
    pairs = [("input", teacher.input.shape, student.input.shape)]
    for point in points:
        try:
            student_shape = student.get_layer(point).output.shape
        except ValueError:
            raise ValueError(f"Hybrid point {point!r} of the teacher {teacher.name!r} is missing in the "
                             f"student {student.name!r}: both need a layer named {point!r}.") from None
        pairs.append((point, teacher.get_layer(point).output.shape, student_shape))
    pairs.append(("logits", teacher.output["logits"].shape, student.output["logits"].shape))
    for stage, theirs, ours in pairs:
        if tuple(theirs) != tuple(ours):
            raise ValueError(f"Stage {stage!r} has shape {tuple(theirs)} in the teacher {teacher.name!r} "
                             f"but {tuple(ours)} in the student {student.name!r}; every hybrid point needs "
                             f"equal shapes in both.")
    return points
