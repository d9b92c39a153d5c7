"""The pretrained teacher of Residual Distillation (`config.teacher.mode="pretrained"`).

`config.teacher.path` may name (`rd_keras.sources`, use `sources.TEACHER`):

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

import keras

from rd_keras import sources
from rd_keras.errors import TeacherError  # noqa: F401
from rd_keras.sources import describe  # noqa: F401

TeacherSource = sources.Source


def resolve(path: str, weights: str = "") -> sources.Source:
    """Finds what `path` (and, for keras.applications, `weights`) points at, without loading a model;
    raises TeacherError naming what was looked for."""
    return sources.resolve(path, weights, sources.TEACHER)


def load(source: sources.Source, *, model_config, num_classes: int, input_shape) -> keras.Model:
    """Builds the configured ResNet in the current scope, fills in the pretrained weights, freezes it."""
    teacher = sources.load(source, sources.TEACHER, sources.Target(model_config, num_classes, tuple(input_shape)))
    teacher.trainable = False
    return teacher
