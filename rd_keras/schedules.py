"""Schedules driven by the global step: the learning rate and the hybrid-loss blend weight m(t).

Both are plain functions of the step, so a resumed run (which restores the step from its checkpoint)
continues exactly where it stopped. They accept Python numbers or scalar tensors. `BlendSchedule` and
`WarmupCosine` wrap them as serialisable Keras schedules for the `fit()` API (`rd_keras.distiller`).
"""

import math

import keras
import tensorflow as tf


def _as_float(x):
    return tf.cast(x, tf.float32) if tf.is_tensor(x) else float(x)


def _cos(x):
    return tf.cos(x) if tf.is_tensor(x) else math.cos(x)


def _clip01(x):
    return tf.clip_by_value(x, 0.0, 1.0) if tf.is_tensor(x) else min(max(x, 0.0), 1.0)


def blend_weight(step, *, steps_per_epoch: int, blend_epochs: float, floor: float, start_epochs: float = 0.0):
    """m(t): 0 before `start_epochs`, then cosine decay from 1 to `floor` over `blend_epochs` epochs, then
    constant at `floor`.

    t = step / steps_per_epoch is fractional, so m changes every step, not once per epoch.
    `blend_epochs=0` means the hybrid losses start (and stay) at the floor. A delayed start lets a joint
    teacher learn on its own before the hybrid paths pass its gradients to the plain net.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch!r}.")
    if blend_epochs < 0 or start_epochs < 0:
        raise ValueError(f"blend_epochs and start_epochs must be >= 0, got {blend_epochs!r} and {start_epochs!r}.")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"The blend floor must be in [0, 1], got {floor!r}.")
    t = _as_float(step)
    if start_epochs:
        t = t - steps_per_epoch * start_epochs
    if blend_epochs == 0:
        value = tf.constant(floor, tf.float32) if tf.is_tensor(step) else float(floor)
    else:
        value = floor + (1.0 - floor) * 0.5 * (1.0 + _cos(math.pi * _clip01(t / (steps_per_epoch * blend_epochs))))
    if not start_epochs:
        return value
    return tf.where(t >= 0, value, 0.0) if tf.is_tensor(step) else (value if t >= 0 else 0.0)


def warmup_cosine_lr(step, *, base_lr: float, warmup_steps: int, total_steps: int):
    """Linear warm-up from ~0 to `base_lr` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if total_steps < 1 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"Need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps!r}, "
                         f"total_steps={total_steps!r}.")
    step = _as_float(step)
    # (step + 1): the very first update already gets a non-zero learning rate.
    warm = base_lr * (step + 1.0) / max(warmup_steps, 1)
    progress = _clip01((step - warmup_steps) / (total_steps - warmup_steps))
    decayed = base_lr * 0.5 * (1.0 + _cos(math.pi * progress))
    if tf.is_tensor(step):
        return tf.where(step < warmup_steps, warm, decayed)
    return warm if step < warmup_steps else decayed


# ----------------------------------------------------------------------------- schedule objects
# The same two functions as serialisable Keras schedules, for `compile()`/`fit()` users: keras calls a
# schedule with the optimizer's `iterations`, which BackupAndRestore and ModelCheckpoint save and restore,
# so a resumed `fit` continues both curves where they stopped.


@keras.saving.register_keras_serializable(package="rd_keras")
class BlendSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """m(t) of `blend_weight` as a step-driven schedule: `BlendSchedule(...)(step)` -> float32 tensor."""

    def __init__(self, steps_per_epoch, blend_epochs, floor=0.0, start_epochs=0.0):
        if not isinstance(steps_per_epoch, int) or isinstance(steps_per_epoch, bool) or steps_per_epoch < 1:
            raise ValueError(f"`steps_per_epoch` must be a positive integer. "
                             f"Received: steps_per_epoch={steps_per_epoch!r}")
        blend_weight(0, steps_per_epoch=steps_per_epoch, blend_epochs=blend_epochs, floor=floor,
                     start_epochs=start_epochs)  # checks
        self.steps_per_epoch, self.blend_epochs, self.floor = steps_per_epoch, blend_epochs, floor
        self.start_epochs = start_epochs

    def __call__(self, step):
        return tf.cast(blend_weight(tf.convert_to_tensor(step), steps_per_epoch=self.steps_per_epoch,
                                    blend_epochs=self.blend_epochs, floor=self.floor,
                                    start_epochs=self.start_epochs), tf.float32)

    def get_config(self):
        return {"steps_per_epoch": self.steps_per_epoch, "blend_epochs": self.blend_epochs,
                "floor": self.floor, "start_epochs": self.start_epochs}


@keras.saving.register_keras_serializable(package="rd_keras")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """The trainer's learning rate (`warmup_cosine_lr`) as a Keras learning-rate schedule."""

    def __init__(self, base_lr, warmup_steps, total_steps):
        if not isinstance(base_lr, (int, float)) or isinstance(base_lr, bool) or base_lr <= 0:
            raise ValueError(f"`base_lr` must be a positive number. Received: base_lr={base_lr!r}")
        warmup_cosine_lr(0, base_lr=base_lr, warmup_steps=warmup_steps, total_steps=total_steps)  # checks
        self.base_lr, self.warmup_steps, self.total_steps = base_lr, warmup_steps, total_steps

    def __call__(self, step):
        return tf.cast(warmup_cosine_lr(tf.convert_to_tensor(step), base_lr=self.base_lr,
                                        warmup_steps=self.warmup_steps, total_steps=self.total_steps),
                       tf.float32)

    def get_config(self):
        return {"base_lr": self.base_lr, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}
