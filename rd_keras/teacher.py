"""Loading a pretrained teacher ResNet for Residual Distillation.

`config.teacher.path` may name:

- a `.keras` file saved by this project (`resnet.keras` of a supervised `shortcuts="all"` run or of a
  joint RD run);
- a workdir: its `resnet.keras` if present, else the ResNet in its latest checkpoint (an unfinished run);
- a checkpoint prefix such as `W/checkpoints/ckpt-1200` (the run's config.json is read from `W`);
- `keras.applications.ResNet50` (or ResNet101, ResNet152) with `config.teacher.weights` = "imagenet" or a
  local weights file, rebuilt by our builder (`rd_keras.pretrained`).

The teacher is rebuilt from the current config inside the current distribution scope and the weights are
copied in, so a mismatch in architecture, width, stem, input shape or class count is caught, named, and
never silently broadcast.
"""

import dataclasses
import json
import os

import keras
import tensorflow as tf

from rd_keras import architectures, pretrained
from rd_keras.errors import TeacherError  # noqa: F401
from rd_keras.workdir import CHECKPOINT_DIR, CONFIG_FILE, RESNET_FILE, saved_model_file



@dataclasses.dataclass(frozen=True)
class TeacherSource:
    kind: str  # "keras", "checkpoint" or "application"
    path: str  # the .keras file, the checkpoint prefix or the keras.applications name
    config_path: str = ""  # the source run's config.json (checkpoints only)
    weights: str = ""  # applications only: "imagenet" or the weights file ...
    classes: int = 0  # ... and the class count of its head


def resolve(path: str, weights: str = "") -> TeacherSource:
    """Finds what `path` (and, for keras.applications, `weights`) points at, without loading a model;
    raises TeacherError naming what was looked for."""
    if not path:
        raise TeacherError("config.teacher.mode='pretrained' needs config.teacher.path: a .keras file, a "
                           "workdir, or a checkpoint prefix of a ResNet trained by this project, or "
                           f"{pretrained.PREFIX}<Name>.")
    if pretrained.is_application(path):
        try:  # reads the weights file's array shapes, so a wrong file fails before the data is loaded
            classes = pretrained.check_weights(path, weights)
        except pretrained.PretrainedError as e:
            raise TeacherError(f"config.teacher: {e}") from None
        return TeacherSource("application", path, weights=weights, classes=classes)
    if weights:
        raise TeacherError(f"config.teacher.weights={weights!r} applies to {pretrained.PREFIX}<Name> teachers "
                           f"only; config.teacher.path={path!r} brings its own weights.")
    path = os.path.expanduser(path)
    if path.endswith(".keras"):
        if not os.path.isfile(path):
            raise TeacherError(f"config.teacher.path={path!r}: file not found.")
        return TeacherSource("keras", path)
    if os.path.isdir(path):
        resnet = saved_model_file(path, (RESNET_FILE,))
        if resnet:
            return TeacherSource("keras", resnet)
        prefix = tf.train.latest_checkpoint(os.path.join(path, CHECKPOINT_DIR))
        if prefix is None:
            raise TeacherError(f"config.teacher.path={path!r}: a directory with neither {RESNET_FILE} nor "
                               f"checkpoints in {CHECKPOINT_DIR}/.")
        return TeacherSource("checkpoint", prefix, os.path.join(path, CONFIG_FILE))
    if os.path.isfile(path + ".index"):
        workdir = os.path.dirname(os.path.dirname(path))  # W/checkpoints/ckpt-N -> W
        return TeacherSource("checkpoint", path, os.path.join(workdir, CONFIG_FILE))
    raise TeacherError(f"config.teacher.path={path!r}: not a .keras file, a workdir, or a checkpoint prefix.")


def describe(model) -> str:
    """'resnet20: input (28, 28, 1), stem width 8, 10 classes, 69,210 params'."""
    return (f"{model.name}: input {tuple(model.input.shape[1:])}, stem width "
            f"{model.get_layer('stem_conv').filters}, {model.get_layer('logits').units} classes, "
            f"{model.count_params():,} params")


def _signature(model):
    return [(w.path, tuple(w.shape)) for w in model.weights]


def _load_keras(source, expected):
    try:
        loaded = keras.saving.load_model(source.path, compile=False)
        described = describe(loaded)
    except Exception as e:  # a broken or foreign file fails in many ways; report them all the same way
        raise TeacherError(f"config.teacher.path: cannot load {source.path!r} as a model built by "
                           f"rd_keras.architectures ({type(e).__name__}: {e}).") from None
    if loaded.name != expected.name or _signature(loaded) != _signature(expected):
        raise TeacherError(f"The pretrained teacher does not match the config.\n  teacher {source.path}: "
                           f"{described}\n  config.model wants {describe(expected)}")
    expected.set_weights(loaded.get_weights())


def _load_checkpoint(source, expected, model_config, num_classes):
    try:
        with open(source.config_path) as f:
            run = json.load(f)
        theirs = {"arch": architectures.get_spec(run["model"]["arch"]), "width": run["model"]["width"],
                  "stem": run["model"]["stem"], "num_classes": run["dataset"]["num_classes"],
                  "image_shape": tuple(run["dataset"]["image_shape"])}
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise TeacherError(f"{source.config_path}: cannot read the teacher run's config ({e}).") from None
    ours = {"arch": architectures.get_spec(model_config.arch), "width": model_config.width,
            "stem": model_config.stem, "num_classes": num_classes,
            "image_shape": tuple(expected.input.shape[1:])}
    if theirs != ours:
        shown = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
        if "arch" in shown:  # names read better than specs
            shown["arch"] = (run["model"]["arch"], model_config.arch)
        diff = ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in shown.items())
        raise TeacherError(f"The pretrained teacher does not match the config (teacher run vs config: {diff})."
                           f"\n  teacher {source.path}: a {run['model']['arch']} run\n  config.model wants "
                           f"{describe(expected)}")
    if not any(name.startswith("resnet/") for name, _ in tf.train.list_variables(source.path)):
        raise TeacherError(f"{source.path}: holds no ResNet; its run (train.mode={run['train']['mode']!r}) "
                           "trained only a plain net. Point config.teacher.path at a supervised "
                           "shortcuts='all' run or a joint RD run.")
    # The source run's optimizers and plain net are not needed here.
    status = tf.train.Checkpoint(resnet=expected).read(source.path).expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise TeacherError(f"{source.path}: its ResNet does not fit the configured one "
                           f"({str(e)[:300]}).") from None


def load(source: TeacherSource, *, model_config, num_classes: int, input_shape) -> keras.Model:
    """Builds the configured ResNet in the current scope, fills in the pretrained weights, freezes it."""
    if source.kind == "application":
        try:
            teacher = pretrained.load(source.path, source.weights, num_classes=num_classes,
                                      input_shape=tuple(input_shape))
        except pretrained.PretrainedError as e:
            raise TeacherError(f"config.teacher: {e}") from None
        teacher.trainable = False
        return teacher
    teacher = architectures.build(model_config.arch, shortcuts="all", num_classes=num_classes,
                                  input_shape=tuple(input_shape), width=model_config.width,
                                  stem=model_config.stem or None)
    if source.kind == "keras":
        _load_keras(source, teacher)
    else:
        _load_checkpoint(source, teacher, model_config, num_classes)
    teacher.trainable = False
    return teacher
