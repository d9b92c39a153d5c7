"""Where a trained net comes from: `config.teacher.path` and `config.transfer.from`, resolved and loaded.

A path names one of these kinds of source (`KINDS`, tried in order):

- `keras.applications.<Name>` (ResNet50, ResNet101, ResNet152) with weights ("imagenet" or a local weights
  file): kind "application", converted to a net of our builder by `rd_keras.pretrained`;
- a `.keras` file saved by this project: kind "keras";
- a workdir of this project: its saved net (`Use.files`, in order of preference) as kind "keras", else, for
  a use that accepts unfinished runs, the ResNet in its latest checkpoint, kind "checkpoint";
- a checkpoint prefix `W/checkpoints/ckpt-N` (its run's config.json is read from `W`): kind "checkpoint".

`resolve(path, weights, use)` finds the source without loading a model (and checks a weights file's
layout), `load(source, use, target)` loads it: as saved when `target` is None (a fine-tune rebuilds it
itself), else rebuilt as the configured net `target` and checked against it, so a mismatch in architecture,
width, stem, input shape or class count is caught, named, and never silently broadcast. `channels(source)`
reads the channel count its input takes from files alone (no TensorFlow: `rd_keras.channels`).

A `Use` is who asks: `TEACHER` (the pretrained teacher, `teacher.path`/`teacher.weights`) or `TRANSFER`
(`transfer.from`/`transfer.weights`); it holds the config keys and wording of the errors, which workdir
files count, and whether checkpoints do.

Adding a kind of source is one `Kind` in `KINDS`: `find(path, use)` returns a `Source` of that kind for
`path` (or None when `path` is not one), `load(source, use, target)` returns the model, and
`channels(source)` the channel count (None when unknown). tests/test_sources.py adds a `.weights.h5` kind
that way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Callable

from rd_keras import architectures, pretrained
from rd_keras.errors import TeacherError, TransferError
from rd_keras.workdir import CHECKPOINT_DIR, CONFIG_FILE, PLAIN_FILE, RESNET_FILE, saved_model_file


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # a key of KINDS: "application", "keras", "checkpoint", ...
    path: str  # the keras.applications name, the .keras file, the checkpoint prefix, ...
    config_path: str = ""  # the source run's config.json (checkpoints only)
    weights: str = ""  # applications only: "imagenet" or the weights file ...
    classes: int = 0  # ... and the class count of its head


@dataclasses.dataclass(frozen=True)
class Use:
    """Who asks for a source: its config keys, its error type and wording, what of a workdir it takes."""

    key: str  # the config key naming the source, e.g. "teacher.path"
    weights_key: str  # the config key of keras.applications weights, e.g. "teacher.weights"
    error: type
    files: tuple  # a workdir's saved nets that count, first found wins
    checkpoints: bool  # whether an unfinished run (its latest checkpoint) or a checkpoint prefix counts
    missing: str  # the error when the key is empty
    accepted: str  # what a path may be, after "not "
    stray_weights: bool  # whether weights given with another kind of source are refused
    # a keras.applications source's error, from {path}, {weights} and the converter's {error}
    application_error: str = "config.{key}: {error}"
    unfinished_hint: str = ""  # after "a directory with neither ...": why

    def application_failed(self, source, error) -> str:
        return self.application_error.format(key=self.key, weights_key=self.weights_key, path=source.path,
                                             weights=source.weights, error=error)


TEACHER = Use("teacher.path", "teacher.weights", TeacherError, (RESNET_FILE,), checkpoints=True,
              missing="config.teacher.mode='pretrained' needs config.teacher.path: a .keras file, a workdir, or a "
                      "checkpoint prefix of a ResNet trained by this project, or "
                      f"{pretrained.PREFIX}<Name>.",
              accepted="a .keras file, a workdir, or a checkpoint prefix", stray_weights=True,
              application_error="config.teacher: {error}")
# The plain net is what this project deploys, so it wins when a workdir holds both.
TRANSFER = Use("transfer.from", "transfer.weights", TransferError, (PLAIN_FILE, RESNET_FILE), checkpoints=False,
               missing="config.train.mode='transfer' needs config.transfer.from: a plain.keras or resnet.keras "
                       f"file, a workdir of this project, or {pretrained.PREFIX}<Name>.",
               accepted=f"a .keras file, a workdir, or {pretrained.PREFIX}<Name>", stray_weights=False,
               application_error="config.{key}={path!r} with config.{weights_key}={weights!r}: {error}",
               unfinished_hint=" (is it a finished run?)")


@dataclasses.dataclass(frozen=True)
class Target:
    """The net a run wants from a source: the config's model (all shortcuts) for the data's classes and
    images. `build()` makes it in the current scope."""

    model_config: object
    num_classes: int
    input_shape: tuple

    def build(self):
        m = self.model_config
        return architectures.build(m.arch, shortcuts="all", num_classes=self.num_classes,
                                   input_shape=tuple(self.input_shape), width=m.width, stem=m.stem or None)


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of source. A kind whose `find` only ever returns sources of other kinds (a workdir holds a
    .keras file or checkpoints) has no `load`."""

    find: Callable  # (path, use) -> Source | None
    load: Callable  # (source, use, target: Target | None) -> keras.Model
    channels: Callable = lambda source: None  # (source) -> int | None, from files alone


# --- keras.applications ------------------------------------------------------------------------------------

def _find_application(path, use):
    return Source("application", path) if pretrained.is_application(path) else None


def _load_application(source, use, target):
    kw = {} if target is None else {"num_classes": target.num_classes, "input_shape": tuple(target.input_shape)}
    try:
        return pretrained.load(source.path, source.weights, **kw)
    except pretrained.PretrainedError as e:  # unknown names, weight files of other nets, no network
        raise use.error(use.application_failed(source, e)) from None


# --- .keras files ------------------------------------------------------------------------------------------

def _find_keras(path, use):
    if not path.endswith(".keras"):
        return None
    if not os.path.isfile(path):
        raise use.error(f"config.{use.key}={path!r}: file not found.")
    return Source("keras", path)


def describe(model) -> str:
    """'resnet20: input (28, 28, 1), stem width 8, 10 classes, 69,210 params'."""
    return (f"{model.name}: input {tuple(model.input.shape[1:])}, stem width "
            f"{model.get_layer('stem_conv').filters}, {model.get_layer('logits').units} classes, "
            f"{model.count_params():,} params")


def _load_keras(source, use, target):
    import keras

    try:
        loaded = keras.saving.load_model(source.path, compile=False)
        described = describe(loaded)
    except Exception as e:  # a broken or foreign file fails in many ways; report them all the same way
        raise use.error(f"config.{use.key}: cannot load {source.path!r} as a model built by "
                        f"rd_keras.architectures ({type(e).__name__}: {e}).") from None
    if target is None:
        return loaded
    expected = target.build()
    if loaded.name != expected.name or architectures.signature(loaded) != architectures.signature(expected):
        raise use.error(f"The pretrained teacher does not match the config.\n  teacher {source.path}: "
                        f"{described}\n  config.model wants {describe(expected)}")
    expected.set_weights(loaded.get_weights())
    return expected


def keras_file_channels(path):
    """The channel count of the input of the model saved in the .keras file `path`, or None if unreadable."""
    try:
        with zipfile.ZipFile(path) as archive:
            layers = json.loads(archive.read("config.json"))["config"]["layers"]
        (shape,) = [layer["config"]["batch_shape"] for layer in layers if layer["class_name"] == "InputLayer"]
        return int(shape[-1])
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile):
        return None


# --- workdirs and checkpoints ------------------------------------------------------------------------------

def _find_workdir(path, use):
    if not os.path.isdir(path):
        return None
    found = saved_model_file(path, use.files)
    if found:
        return Source("keras", found)
    if use.checkpoints:
        import tensorflow as tf

        prefix = tf.train.latest_checkpoint(os.path.join(path, CHECKPOINT_DIR))
        if prefix is not None:
            return Source("checkpoint", prefix, os.path.join(path, CONFIG_FILE))
    wanted = list(use.files) + ([f"checkpoints in {CHECKPOINT_DIR}/"] if use.checkpoints else [])
    raise use.error(f"config.{use.key}={path!r}: a directory with neither {' nor '.join(wanted)}"
                    f"{use.unfinished_hint}.")


def _find_checkpoint(path, use):
    if not use.checkpoints or not os.path.isfile(path + ".index"):
        return None
    workdir = os.path.dirname(os.path.dirname(path))  # W/checkpoints/ckpt-N -> W
    return Source("checkpoint", path, os.path.join(workdir, CONFIG_FILE))


def _load_checkpoint(source, use, target):
    import tensorflow as tf

    model_config, num_classes = target.model_config, target.num_classes
    expected = target.build()
    try:
        with open(source.config_path) as f:
            run = json.load(f)
        theirs = {"arch": architectures.get_spec(run["model"]["arch"]), "width": run["model"]["width"],
                  "stem": run["model"]["stem"], "num_classes": run["dataset"]["num_classes"],
                  "image_shape": tuple(run["dataset"]["image_shape"])}
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise use.error(f"{source.config_path}: cannot read the teacher run's config ({e}).") from None
    ours = {"arch": architectures.get_spec(model_config.arch), "width": model_config.width,
            "stem": model_config.stem, "num_classes": num_classes,
            "image_shape": tuple(expected.input.shape[1:])}
    if theirs != ours:
        shown = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
        if "arch" in shown:  # names read better than specs
            shown["arch"] = (run["model"]["arch"], model_config.arch)
        diff = ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in shown.items())
        raise use.error(f"The pretrained teacher does not match the config (teacher run vs config: {diff})."
                        f"\n  teacher {source.path}: a {run['model']['arch']} run\n  config.model wants "
                        f"{describe(expected)}")
    if not any(name.startswith("resnet/") for name, _ in tf.train.list_variables(source.path)):
        raise use.error(f"{source.path}: holds no ResNet; its run (train.mode={run['train']['mode']!r}) "
                        "trained only a plain net. Point config.teacher.path at a supervised "
                        "shortcuts='all' run or a joint RD run.")
    # The source run's optimizers and plain net are not needed here.
    status = tf.train.Checkpoint(resnet=expected).read(source.path).expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise use.error(f"{source.path}: its ResNet does not fit the configured one "
                        f"({str(e)[:300]}).") from None
    return expected


def run_channels(config_path):
    """The channel count of the images a run of this project trained on (its config.json), or None."""
    try:
        with open(config_path) as f:
            return int(json.load(f)["dataset"]["image_shape"][-1])
    except (OSError, KeyError, TypeError, ValueError, IndexError):
        return None


# Tried in this order by `find`; "keras" and "checkpoint" are also what a workdir resolves to.
KINDS = {
    "application": Kind(_find_application, _load_application, lambda source: 3),
    "keras": Kind(_find_keras, _load_keras, lambda source: keras_file_channels(source.path)),
    "workdir": Kind(_find_workdir, None),
    "checkpoint": Kind(_find_checkpoint, _load_checkpoint, lambda source: run_channels(source.config_path)),
}


# --- the entry points --------------------------------------------------------------------------------------

def stray_weights(path, weights, use):
    """The error message when `weights` come with a source that brings its own weights, else None."""
    if use.stray_weights and weights and not pretrained.is_application(path):
        return (f"config.{use.weights_key}={weights!r} applies to {pretrained.PREFIX}<Name> teachers only; "
                f"config.{use.key}={path!r} brings its own weights.")
    return None


def find(path: str, use: Use) -> Source:
    """The source at `path` (weights not checked, no model loaded); raises `use.error` naming the path."""
    if not path:
        raise use.error(use.missing)
    if not pretrained.is_application(path):
        path = os.path.expanduser(path)
    for kind in KINDS.values():
        source = kind.find(path, use)
        if source is not None:
            return source
    raise use.error(f"config.{use.key}={path!r}: not {use.accepted}.")


def resolve(path: str, weights: str, use: Use) -> Source:
    """`find`, with the weights: a keras.applications source gets them after its file's layout is checked
    (a wrong file fails before any data is loaded); other sources refuse them where `use` says so."""
    if path:  # an empty path is named as such by `find`
        message = stray_weights(path, weights, use)
        if message:
            raise use.error(message)
    source = find(path, use)
    if source.kind == "application":
        source = dataclasses.replace(source, weights=weights)
        try:
            classes = pretrained.check_weights(path, weights)
        except pretrained.PretrainedError as e:
            raise use.error(use.application_failed(source, e)) from None
        return dataclasses.replace(source, classes=classes)
    return source


def load(source: Source, use: Use, target: Target | None = None):
    """The net of `source`: as saved when `target` is None, else the configured net `target` with the
    source's weights (checked against it)."""
    return KINDS[source.kind].load(source, use, target)


def channels(path: str, use: Use):
    """The channel count of the input of the net at `path`, from files alone; None when unknown or when the
    path names no source (the run reports that, naming the path, when it resolves it)."""
    try:
        source = find(path, use)
    except (TeacherError, TransferError):
        # A run that has written its config.json but no checkpoint yet is still a run of known images.
        if not path or not use.checkpoints or pretrained.is_application(path) or path.endswith(".keras"):
            return None
        path = os.path.expanduser(path)
        workdir = path if os.path.isdir(path) else os.path.dirname(os.path.dirname(path))  # W/checkpoints/ckpt-N
        return run_channels(os.path.join(workdir, CONFIG_FILE))
    return KINDS[source.kind].channels(source)


# --- what the rest of a config must be for a source ---------------------------------------------------------

def check_teacher_config(config):
    """Refuses a config whose model or normalisation cannot be the twin of its keras.applications teacher,
    or that gives teacher weights to a teacher that brings its own, naming both sides; touches no file.
    Raises ConfigError."""
    from rd_keras.errors import ConfigError

    t = config.teacher
    weights = t.get("weights", "")
    message = stray_weights(t.path, weights, TEACHER)
    if message:
        raise ConfigError(message)
    if not pretrained.is_application(t.path):
        return
    try:
        arch = pretrained.arch_of(t.path)
    except pretrained.PretrainedError as e:
        raise ConfigError(str(e)) from None
    m = config.model
    wanted = {"model.arch": arch, "model.width": 1.0, "model.stem": "imagenet",
              "data.normalization": pretrained.NORMALIZATION}
    # "resnet50" and "plain50" name the same spec; model.arch was validated before this runs.
    given = {"model.arch": arch if architectures.get_spec(m.arch) == architectures.get_spec(arch) else m.arch,
             "model.width": m.width, "model.stem": m.stem or architectures.get_spec(m.arch).stem,
             "data.normalization": config.data.get("normalization", "dataset")}
    bad = [f"config.{k}={given[k]!r} but the teacher needs {wanted[k]!r}" for k in wanted if given[k] != wanted[k]]
    if bad:
        raise ConfigError(f"config.teacher.path={t.path!r} does not fit the config: {'; '.join(bad)}.")


def build_options(path: str) -> dict:
    """The builder options of a student of the teacher at `path`: those of a keras.applications teacher, so
    that the plain net is the teacher minus its shortcuts, layer for layer; {} for every other source."""
    return dict(pretrained.OPTIONS) if pretrained.is_application(path) else {}
