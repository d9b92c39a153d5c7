"""Schedules driven by the global step: the learning rate and the hybrid-loss blend weight m(t).

Both are plain functions of the step, so a resumed run (which restores the step from its checkpoint)
continues exactly where it stopped. They accept Python numbers or scalar tensors.
"""

import math

import tensorflow as tf


def _as_float(x):
    return tf.cast(x, tf.float32) if tf.is_tensor(x) else float(x)


def _cos(x):
    return tf.cos(x) if tf.is_tensor(x) else math.cos(x)


def _clip01(x):
    return tf.clip_by_value(x, 0.0, 1.0) if tf.is_tensor(x) else min(max(x, 0.0), 1.0)


def blend_weight(step, *, steps_per_epoch: int, blend_epochs: float, floor: float):
    """m(t): cosine decay from 1 to `floor` over `blend_epochs` epochs, then constant at `floor`.

    t = step / steps_per_epoch is fractional, so m changes every step, not once per epoch.
    `blend_epochs=0` means the hybrid losses start (and stay) at the floor.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch!r}.")
    if blend_epochs < 0:
        raise ValueError(f"blend_epochs must be >= 0, got {blend_epochs!r}.")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"The blend floor must be in [0, 1], got {floor!r}.")
    if blend_epochs == 0:
        return tf.constant(floor, tf.float32) if tf.is_tensor(step) else float(floor)
    progress = _clip01(_as_float(step) / (steps_per_epoch * blend_epochs))
    return floor + (1.0 - floor) * 0.5 * (1.0 + _cos(math.pi * progress))


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
